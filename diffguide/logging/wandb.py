"""Weights & Biases: one W&B run per diffguide job, grouped by sweep.

The mode is never fixed here: WANDB_MODE from the environment wins; without it, and without credentials, the run
goes offline by itself (sync later with `wandb sync`). Any W&B failure is reported on stderr and the job goes on.
"""

import hashlib
import netrc
import os
import sys
import warnings
from pathlib import Path

from diffguide.logging.base import Logger


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def run_id(out_dir, project: str, entity: str | None) -> str:
    """The W&B run id of a point's folder: the digest of its absolute path in this project (the same folder reached
    from another node of a shared file system is the same run)."""
    where = f"{entity or ''}/{project}:{Path(out_dir).resolve()}"
    return "dg" + hashlib.sha256(where.encode()).hexdigest()[:22]


class WandbLogger(Logger):
    def __init__(self, project: str = "diffguide", entity: str | None = None, tags: list | None = None,
                 job_type: str = "sample", init_timeout: float = 60.0):
        self.project, self.entity, self.tags, self.job_type = project, entity, list(tags or []), job_type
        self.init_timeout = init_timeout
        self.run = None

    def _warn(self, what: str, exc: BaseException) -> None:
        print(f"diffguide: warning: W&B {what} failed ({exc.__class__.__name__}: {exc}); the run goes on",
              file=sys.stderr)

    def start(self, config, out_dir, name, group):
        try:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if _has_credentials() else "offline")
            # the same folder is the same W&B run: a resumed point continues its run instead of starting a second
            kwargs = dict(project=self.project, entity=self.entity, name=name, group=group, tags=self.tags,
                          id=run_id(out_dir, self.project, self.entity), resume="allow",
                          job_type=self.job_type, config=config, dir=str(out_dir), reinit="finish_previous",
                          settings=wandb.Settings(init_timeout=self.init_timeout, silent=True))
            try:
                self.run = wandb.init(mode=mode, **kwargs)
            except Exception as exc:
                if mode != "online":
                    raise
                self._warn("online init", exc)
                self.run = wandb.init(mode="offline", **kwargs)
        except Exception as exc:
            self._warn("init", exc)
            self.run = None

    def progress(self, values):
        if self.run is None:
            return
        try:
            self.run.log({f"progress/{k}": v for k, v in values.items()})
        except Exception as exc:
            self._warn("log", exc)

    def finish(self, metrics, grid):
        if self.run is None:
            return
        try:
            import wandb

            logged = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if grid is not None and Path(grid).is_file():
                logged["samples/grid"] = wandb.Image(str(grid))
            self.run.log(logged)
            for key, value in logged.items():
                if not key.startswith("samples/"):
                    self.run.summary[key] = value
        except Exception as exc:
            self._warn("final log", exc)
        finally:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.run.finish()
            except Exception as exc:
                self._warn("finish", exc)
            self.run = None
