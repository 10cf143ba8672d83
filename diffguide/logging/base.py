"""What the run tells a logger. A logger must never fail a run: implementations swallow and report their errors."""

from pathlib import Path


class Logger:
    def start(self, config: dict, out_dir: Path, name: str, group: str | None) -> None:
        pass

    def progress(self, values: dict) -> None:
        pass

    def finish(self, metrics: dict, grid: Path | None) -> None:
        pass


class NoLogger(Logger):
    pass
