"""The fault matrix's cases of the other entry points: `python -m diffguide.train`, `report`, `classify` and `edit`,
each run as a new user would (a subprocess in the repository root, WANDB_MODE=disabled, HYDRA_FULL_ERROR unset,
every stderr line counted, split on \\n and \\r). scripts/fault_matrix.py runs them after its own (`--commands`
only these, `--no-commands` none of them).

The promises they are judged by:
  user     exit 2, exactly one stderr line starting `diffguide: error:`, no traceback, no training step logged and no
           result file written.
  resume   SIGINT (Ctrl-C) or SIGKILL at an observed moment (a step logged, a batch's part on disk); a SIGINT run exits
           130 with one line starting `interrupted`; the same command again exits 0 and its result equals an
           uninterrupted run's (train: the weights' tensors; classify / edit: the JSON but its seconds).
  race     a second command on the folder a first one holds: exit 2, one line naming the holder; the first ends 0.
  skip     report over a sweep with one damaged point: exit 1, exactly one stderr line, a warning naming the
           damaged file, report.csv written for the rest, nothing outside the report folder, nothing unpickled.
  keep     the case's own check (named in `why` when it fails): git status unchanged after training without
           train.overwrite=true, the committed weights untouched, a finished training trained no more, a warning
           in one line.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 600
TINY = ["train=fmnist_unet_weak", "train.unet.block_out_channels=[8,8,8]", "train.unet.norm_num_groups=4",
        "train.batch_size=4", "train.log_every=1", "device=cpu", "train.precision=fp32"]
CLASSIFY = ["model=fmnist_unet", "num_images=40", "n_samples=[4]", "to_keep=[1]", "batch_size=2", "device=cpu",
            "precision=fp32"]
EDIT = ["images=[0,1,2,3,4,5,6,7,8,9,10,11]", "steps=40", "batch_size=2", "edit.target=3", "device=cpu"]
RESULT = {"train": "fmnist_unet_weak.safetensors", "classify": "classify.json", "edit": "edit.json",
          "report": "report/report.csv"}


def stderr_lines(err: str) -> list[str]:
    """Every non-blank line of stderr, whoever wrote it (a progress bar's carriage returns split lines too)."""
    return [line for line in re.split(r"[\r\n]", err) if line.strip()]


def has_traceback(err: str) -> bool:
    return "Traceback" in err


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return stderr_lines(self.err)

    @property
    def traceback(self) -> bool:
        return has_traceback(self.err)


@dataclass
class CommandCase:
    name: str
    command: str                     # train | report | classify | edit
    args: list[str]
    expect: str                      # user | resume | race | skip | keep
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path, list[Outcome]], list[str]] | None = None
    signal: int = signal.SIGINT      # resume: the signal
    moment: str = ""                 # resume: a stdout line prefix (train), or "part" (a batch's part on disk)


@dataclass
class CommandRow:
    case: CommandCase
    status: str = ""
    lines: str = ""
    traceback: bool = False
    why: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.why


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["WANDB_MODE"] = "disabled"
    return env


def run(command: str, args: list[str]) -> Outcome:
    proc = subprocess.run([sys.executable, "-m", f"diffguide.{command}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT, env=_env())
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def stopped(command: str, args: list[str], folder: Path, moment: str, sig: int) -> Outcome:
    proc = subprocess.Popen([sys.executable, "-m", f"diffguide.{command}", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    if moment == "part":
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None and not list((folder / "parts").glob("*.pt")) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
    else:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(moment):
                proc.send_signal(sig)
                break
    out, err = proc.communicate(timeout=TIMEOUT)
    return Outcome(proc.returncode, "".join(seen) + out, err)


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_result(command: str, a: Path, b: Path) -> str | None:
    """None where the two folders' results are equal (train: tensors; classify/edit: JSON but its seconds)."""
    fa, fb = a / RESULT[command], b / RESULT[command]
    if not fa.is_file() or not fb.is_file():
        return f"no {RESULT[command]} in {'the resumed' if not fb.is_file() else 'the whole'} run"
    if command == "train":
        wa, wb = _weights(fa), _weights(fb)
        return None if wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa) else "weights differ"

    def timeless(path):
        result = json.loads(path.read_text())
        for key in ("wall_s", "images_per_s", "settings"):
            result.pop(key, None)
        return result

    return None if timeless(fa) == timeless(fb) else f"{RESULT[command]} differs from the uninterrupted run's"


def _common(row: CommandRow, outcomes: list[Outcome]) -> None:
    row.status = " → ".join(str(o.code) for o in outcomes)
    row.lines = " → ".join(str(len(o.lines)) for o in outcomes)
    row.traceback = any(o.traceback for o in outcomes)
    if row.traceback:
        row.why.append("a traceback on stderr")


def judge(case: CommandCase, work: Path) -> CommandRow:
    row = CommandRow(case)
    folder = work / "out"
    base = {"train": [*TINY, "train.steps=6"], "classify": CLASSIFY, "edit": EDIT, "report": []}[case.command]
    place = [] if case.command == "report" else [f"out_dir={folder}"]
    if case.setup is not None:
        case.setup(work)
    args = [*base, *place, *case.args] if case.command != "report" else [str(work / "sweep"), *case.args]
    if case.expect == "user":
        result = folder / RESULT[case.command]
        before = result.read_bytes() if result.is_file() else None  # a setup's own finished result stays as it was
        o = run(case.command, args)
        _common(row, [o])
        if o.code != 2:
            row.why.append(f"exit {o.code}, not 2")
        if len(o.lines) != 1 or not o.lines[0].startswith("diffguide: error: "):
            row.why.append(f"{len(o.lines)} stderr lines: {' / '.join(o.lines)[:160]}")
        if re.search(r"^step \d", o.out, re.M) or (result.read_bytes() if result.is_file() else None) != before:
            row.why.append("work was done before the error")
    elif case.expect == "resume":
        whole = work / "whole"
        first = run(case.command, [*base, f"out_dir={whole}", *case.args])
        cut = stopped(case.command, args, folder, case.moment, case.signal)
        again = run(case.command, args)
        _common(row, [first, cut, again])
        if first.code != 0:
            row.why.append(f"the uninterrupted run exited {first.code}")
        if case.signal == signal.SIGINT and (cut.code != 130 or len(cut.lines) != 1
                                             or not cut.lines[0].startswith("interrupted")):
            row.why.append(f"Ctrl-C: exit {cut.code}, {len(cut.lines)} lines: {' / '.join(cut.lines)[:160]}")
        if again.code != 0:
            row.why.append(f"the rerun exited {again.code}: {' / '.join(again.lines)[-160:]}")
        else:
            differ = same_result(case.command, whole, folder)
            if differ:
                row.why.append(differ)
    elif case.expect == "race":
        from diffguide.store.lock import FolderLock

        with FolderLock(folder, "holder"):
            o = run(case.command, args)
        _common(row, [o])
        if o.code != 2 or len(o.lines) != 1 or "is in use by another" not in o.lines[0] or "pid" not in o.lines[0]:
            row.why.append(f"exit {o.code}, {len(o.lines)} lines: {' / '.join(o.lines)[:160]}")
    elif case.expect == "skip":
        before = {p for p in work.rglob("*")}
        o = run("report", args)
        _common(row, [o])
        if o.code != 1 or len(o.lines) != 1 or not o.lines[0].startswith("diffguide: warning: "):
            row.why.append(f"exit {o.code}, {len(o.lines)} lines: {' / '.join(o.lines)[:160]}")
        if not (work / "sweep" / "report" / "report.csv").is_file():
            row.why.append("no report.csv")
        outside = [p for p in set(work.rglob("*")) - before if (work / "sweep" / "report") not in p.parents
                   and p != work / "sweep" / "report"]
        if outside:
            row.why.append(f"wrote outside the report: {outside[0]}")
    if case.check is not None:
        outcomes = [] if case.expect != "keep" else [run(case.command, args)]
        if outcomes:
            _common(row, outcomes)
        row.why += case.check(work, outcomes)
    return row


# ------------------------------------------------------------------------------------------------ the sweeps

def _sweep(work: Path) -> Path:
    """Three finished points (cfg at two scales, apg) with synthetic features, and a sample each."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from diffguide.metrics import intervals as iv

    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, (400, 4))
    for name, guidance, scale, shift in (("cfg-1.5", "cfg", 1.5, 0.1), ("cfg-2", "cfg", 2.0, 0.4),
                                         ("apg-2", "apg", 2.0, 0.1)):
        folder = work / "sweep" / name
        (folder / "samples").mkdir(parents=True)
        features = rng.normal(shift, 1, (100, 4))
        stats = iv.PointStats(labels=np.arange(100) % 10, features=features, ref_mu=reference.mean(0),
                              ref_sigma=np.cov(reference, rowvar=False))
        stats.save(folder / "features.npz")
        fid = float(iv.replicates(stats, "fid", np.ones((1, 100)))[0])
        (folder / "metrics.json").write_text(json.dumps({"guidance": guidance, "scale": scale, "sampler": "ddim",
                                                         "steps": 25, "nfe": 50.0, "num_samples": 100,
                                                         "fid_x": fid, "config": {"seed": 0}}))
        Image.new("L", (28, 28), 100).save(folder / "samples" / "000000.png")
    return work / "sweep"


class _Planted:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def damaged(rel: str, how: Callable[[Path, Path], None]) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        sweep = _sweep(work)
        how(sweep / rel, work)
    return setup


def _object_array(path: Path, work: Path) -> None:
    import numpy as np

    np.savez(path, labels=np.array([_Planted(work / "pwned")] * 3, dtype=object))


def _unpickled(work: Path, _) -> list[str]:
    return ["a planted pickle ran"] if (work / "pwned").exists() else []


def _traversal(path: Path, work: Path) -> None:
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "guidance": "../../../x"}))


# ------------------------------------------------------------------------------------------------ train's checks

def _git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                          text=True).stdout


_STATUS: dict[str, str] = {}


def _remember_status(work: Path) -> None:
    _STATUS[str(work)] = _git_status()


def _status_unchanged(work: Path, outcomes: list[Outcome]) -> list[str]:
    why = [] if not outcomes or outcomes[0].code == 0 else [f"exit {outcomes[0].code}"]
    return why + ([] if _git_status() == _STATUS[str(work)] else ["git status changed"])


def _shipped_kept(work: Path, outcomes: list[Outcome]) -> list[str]:
    shipped = REPO / "diffguide" / "weights" / "fmnist_unet_weak.safetensors"
    digest = subprocess.run(["git", "hash-object", str(shipped)], capture_output=True, text=True).stdout.strip()
    committed = subprocess.run(["git", "rev-parse", "HEAD:diffguide/weights/fmnist_unet_weak.safetensors"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
    return [] if digest == committed else ["the committed weights changed"]


def _finished(work: Path) -> None:
    assert run("train", [*TINY, "train.steps=6", f"out_dir={work / 'out'}"]).code == 0


def _trained_nothing(work: Path, outcomes: list[Outcome]) -> list[str]:
    o = outcomes[0]
    return [] if o.code == 0 and "already trained" in o.out and not re.search(r"^step \d", o.out, re.M) else \
        [f"exit {o.code}; it trained again or said nothing"]


def _old_file(work: Path) -> None:
    (work / "model.safetensors").write_bytes(b"the old model")


def _old_file_whole(work: Path, outcomes: list[Outcome]) -> list[str]:
    return [] if (work / "model.safetensors").read_bytes() == b"the old model" else ["the old file was replaced "
                                                                                     "before training ended"]


def _kill_keeps_old(work: Path) -> None:
    _old_file(work)
    stopped("train", [*TINY, "train.steps=6", f"train.out={work / 'model.safetensors'}", "train.overwrite=true",
                      f"out_dir={work / 'o'}"], work, "step 2/", signal.SIGKILL)


def _one_warning(work: Path, outcomes: list[Outcome]) -> list[str]:
    o = outcomes[0]
    return [] if o.code == 0 and len(o.lines) == 1 and o.lines[0].startswith("diffguide: warning: steps=20") else \
        [f"exit {o.code}, {len(o.lines)} lines: {' / '.join(o.lines)[:160]}"]


def _prefilled(command: str, args: list[str]) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        stopped(command, [*args, f"out_dir={work / 'out'}"], work / "out", "part", signal.SIGKILL)
    return setup


def _cases() -> list[CommandCase]:
    U, R, K = "user", "resume", "keep"
    cases = [CommandCase(f"train: {name}", "train", args, U) for name, args in [
        ("key typo", ["train.stpes=5"]), ("unknown recipe", ["train=bogus"]), ("steps not a number", ["train.steps=abc"]),
        ("steps 0", ["train.steps=0"]), ("batch size negative", ["train.batch_size=-1"]),
        ("lr not a number", ["train.lr=abc"]), ("an option", ["--foo"]),
        ("Hydra's pickle rerun", ["--experimental-rerun", "x.pickle"]), ("out in /proc", ["train.out=/proc/x.safetensors"]),
        ("out a folder", ["train.out=/"]), ("shipped without overwrite", ["train.out=shipped"]),
        ("overwrite not a bool", ["train.overwrite=maybe"]), ("device", ["device=tpu"]),
        ("precision", ["train.precision=fp8"]), ("out_dir in /proc", ["out_dir=/proc/x"]),
        ("trainer missing", ["train._target_=diffguide.nope.f"]), ("trainer removed", ["~train._target_"]),
        ("not a trainer", ["train._target_=diffguide.data.fashion_mnist.to_model_range"]),
        ("unknown top key", ["bogus=1"]),
    ]]
    cases += [
        CommandCase("train: out_dir of other settings", "train", ["train.steps=7"], U, setup=_finished),
        CommandCase("train: Ctrl-C at step 3, resumed", "train", [], R, moment="step 3/"),
        CommandCase("train: SIGKILL after a checkpoint, resumed", "train", ["train.checkpoint_every=2"], R,
                    signal=signal.SIGKILL, moment="step 4/"),
        CommandCase("train: a second training on a held folder", "train", [], "race"),
        CommandCase("train: default output leaves git status clean", "train", [], K, setup=_remember_status,
                    check=_status_unchanged),
        CommandCase("train: shipped refused, committed weights untouched", "train", ["train.out=shipped"], K,
                    check=_shipped_kept),
        CommandCase("train: a finished training reruns as nothing", "train", [], K, setup=_finished,
                    check=_trained_nothing),
        CommandCase("train: SIGKILL with overwrite leaves the old file whole", "train", [], K, setup=_kill_keeps_old,
                    check=lambda work, o: _old_file_whole(work, o)),
    ]
    for name, rel, how in [
        ("metrics.json garbage", "apg-2/metrics.json", lambda p, w: p.write_bytes(b"\x00\xffgarbage")),
        ("metrics.json truncated", "apg-2/metrics.json", lambda p, w: p.write_bytes(p.read_bytes()[:30])),
        ("metrics.json null", "apg-2/metrics.json", lambda p, w: p.write_text("null")),
        ("metrics.json a list", "apg-2/metrics.json", lambda p, w: p.write_text("[1]")),
        ("metrics.json scale a string", "apg-2/metrics.json",
         lambda p, w: p.write_text(json.dumps({**json.loads(p.read_text()), "scale": "x"}))),
        ("metrics.json unreadable", "apg-2/metrics.json", lambda p, w: (p.unlink(), p.mkdir())),
        ("failed.json garbage", "apg-2/failed.json", lambda p, w: ((p.parent / "metrics.json").unlink(),
                                                                   p.write_bytes(b"{{{"))),
        ("features.npz truncated", "apg-2/features.npz", lambda p, w: p.write_bytes(p.read_bytes()[:90])),
        ("features.npz garbage", "apg-2/features.npz", lambda p, w: p.write_bytes(b"PK\x03\x04junk")),
        ("features.npz object array (a planted pickle)", "apg-2/features.npz", _object_array),
        ("sample PNG garbage", "apg-2/samples/000000.png", lambda p, w: p.write_bytes(b"\x89PNG junk")),
    ]:
        cases.append(CommandCase(f"report: {name}", "report", [], "skip", setup=damaged(rel, how),
                                 check=_unpickled))
    cases += [
        CommandCase("report: a method named ../../../x", "report", [], K, setup=damaged("apg-2/metrics.json",
                                                                                         _traversal),
                    check=lambda work, o: ([] if o[0].code == 0 and not list(work.glob("x*")) and not
                                           list((work / "sweep").glob("x*")) else ["wrote outside the report"])),
        CommandCase("report: no such folder", "report", [], U),
        CommandCase("report: an option", "report", ["--bogus"], U, setup=_sweep),
        CommandCase("report: --out in /proc", "report", ["--out", "/proc/x"], U, setup=_sweep),
        CommandCase("report: empty folder", "report", [], U, setup=lambda w: (w / "sweep").mkdir()),
    ]
    cases += [CommandCase(f"classify: {name}", "classify", args, U) for name, args in [
        ("unknown key", ["bogus=1"]), ("n_samples and to_keep", ["n_samples=[4,12]", "to_keep=[2]"]),
        ("split", ["split=val"]), ("num_images 0", ["num_images=0"]), ("model", ["model=bogus"]),
        ("an option", ["--foo"]), ("out_dir in /proc", ["out_dir=/proc/x"]),
        ("indices past the end", ["num_images=null", "indices=[99999]"]),
    ]]
    cases += [
        CommandCase("classify: Ctrl-C after a batch, resumed", "classify", [], R, moment="part"),
        CommandCase("classify: SIGKILL after a batch, resumed", "classify", [], R, signal=signal.SIGKILL,
                    moment="part"),
        CommandCase("classify: a second one on a held folder", "classify", [], "race"),
        CommandCase("classify: parts of other settings", "classify", ["seed=1"], U,
                    setup=_prefilled("classify", CLASSIFY)),
    ]
    cases += [CommandCase(f"edit: {name}", "edit", args, U) for name, args in [
        ("steps 0", ["steps=0"]), ("inversion", ["inversion=bogus"]), ("image past the end", ["images=[100000]"]),
        ("target not a class", ["edit.target=99"]), ("folder missing", ["folder=/nope"]), ("an option", ["--foo"]),
        ("unknown key", ["bogus=1"]), ("scale negative", ["scale=-1"]),
    ]]
    cases += [
        CommandCase("edit: Ctrl-C after a batch, resumed", "edit", [], R, moment="part"),
        CommandCase("edit: SIGKILL after a batch, resumed", "edit", [], R, signal=signal.SIGKILL, moment="part"),
        CommandCase("edit: a second one on a held folder", "edit", [], "race"),
        CommandCase("edit: too few steps warns in one line", "edit", ["steps=20", "images=[0,1]"], K,
                    check=_one_warning),
    ]
    return cases


CASES = _cases()
EXPECTED = {"user": "exit 2, 1 line, no traceback, no work", "resume": "stop; rerun exit 0, equal to a whole run",
            "race": "exit 2, 1 line naming the holder", "skip": "exit 1, 1 warning line, the rest reported",
            "keep": "its own check (why)"}


def run_case(case: CommandCase, root: Path, index: int) -> CommandRow:
    work = root / f"command-{index:03d}"
    work.mkdir(parents=True)
    start = time.monotonic()
    try:
        row = judge(case, work)
    except Exception as exc:  # a case that cannot even be judged is broken, not a crash of the audit
        row = CommandRow(case, why=[f"the audit failed: {type(exc).__name__}: {exc}"])
    row.seconds = time.monotonic() - start
    shutil.rmtree(work / "out", ignore_errors=True)
    return row


def table(rows: list[CommandRow]) -> str:
    head = ["case", "exit status", "stderr lines", "traceback", "expected", "verdict", "s", "why"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = (row.case.name, row.status, row.lines, "yes" if row.traceback else "no", EXPECTED[row.case.expect],
                 "ok" if row.ok else "BROKEN", f"{row.seconds:.1f}", "; ".join(row.why))
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("run it through scripts/fault_matrix.py --commands", file=sys.stderr)
    sys.exit(2)
