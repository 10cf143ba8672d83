"""A fault and bad-input audit of `python -m diffguide.run`, run as a new user would. Not a test: it takes minutes.
Then the other entry points' cases (train, report, classify, edit: scripts/command_faults.py, its own promises).

    python scripts/fault_matrix.py [--only SUBSTRING] [--jobs 1] [--out FILE] [--keep] [--list] [--commands]

Every case is a subprocess `python -m diffguide.run logger=none steps=5 num_samples=24 batch_size=4 out_dir=... ...`
(cwd: the repository root, WANDB_MODE=disabled), each with its own fresh out_dir under one temp folder, and
`metric=none` unless the case scores (then `metric.cache_root=` a temp cache: the one the cases share, or a case's
own copy where it damages the cache or must be checked for temp files). A case's own arguments replace the base ones
with the same key. Once, first: a reference run (24 samples, metric=none) that the fault cases copy, and a scored run
in a fresh folder that fills the shared cache (and checks that its samples equal the reference's byte for byte).

The promises the cases are judged by (the table's `expected` column names the one of each case):
  user    A user mistake: exit 2 (or, for bad paths and the environment, any non-zero exit), EXACTLY ONE non-empty
          line on stderr (every line counts: Hydra's, a traceback's, tqdm's; split on \\n and \\r), no traceback,
          and no out_dir/samples/*.png made.
  repair  A damaged run folder (a copy of the reference run), rerun with the same command: exit 0, every
          samples/NNNNNN.png byte-identical to the reference's and no other, no temp file (.*.tmp) left in the run
          folder or the case's cache; a scored case also writes metrics.json (and FID equals the clean run's).
  repair|refuse   as repair, or, where repair is impossible, exit != 0 with one line, no traceback, and the samples
          left as they were before the rerun.
  refuse  exit != 0 with one line, no traceback, the samples untouched.
  kill    SIGKILL (or SIGINT, Ctrl-C, to the process group) at a moment; the SIGINT run exits 130 with one stderr
          line starting with 'interrupted' and no traceback; then the same command again: exit 0, samples intact,
          metrics.json present, no temp file anywhere.
  race    Two processes on one out_dir: exactly one makes the images; the other exits != 0 with one line naming the
          holder (its pid), or waits and makes none; samples intact afterwards.
  sweep   `-m` with bad points: either exit 2 with one stderr line per bad point, no traceback and nothing sampled,
          or exit 1 with failed.json for each bad point (guidance: the method's lowercase name as in metrics.json;
          scale: a number, unless the guidance itself is unknown), metrics.json for each good point, no traceback.

Prints a markdown table (case, exit status, stderr lines, traceback, samples intact, expected, verdict, seconds,
why), then `N cases, K ok, B broken` and the broken ones. Exit status 0 whatever the verdicts (1 if the reference
run itself fails). HYDRA_FULL_ERROR is removed from the environment so that the counts are a new user's.
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the shared list of command-line mistakes lives with the tests
from tests.cli_mistakes import MISTAKES  # noqa: E402
sys.path.insert(0, str(REPO / "scripts"))
import command_faults  # noqa: E402  (the other entry points' cases)

WEIGHTS = REPO / "diffguide" / "weights" / "fmnist_unet.safetensors"
GUIDANCES = {p.stem for p in (REPO / "conf" / "guidance").glob("*.yaml")}
BASE = ["logger=none", "steps=5", "num_samples=24", "batch_size=4"]
NUM_SAMPLES = 24
SAMPLE_NAME = re.compile(r"^\d{6,}\.png$")
TIMEOUT = 300       # seconds for one command: the script never hangs
USER_TIMEOUT = 120  # a user mistake still running by then has long gone past "stops before any work"
INTERRUPTED_PREFIX = "interrupted"

USER, REPAIR, REPAIR_OR_REFUSE, REFUSE, KILL, RACE, SWEEP = (
    "user", "repair", "repair|refuse", "refuse", "kill", "race", "sweep")
EXPECTED = {
    USER: "exit 2, 1 line, no traceback, nothing sampled",
    REPAIR: "rerun exit 0, samples intact, no temp file",
    REPAIR_OR_REFUSE: "rerun exit 0 + intact, or exit!=0 + 1 line; no temp file",
    REFUSE: "exit!=0, 1 line, no traceback, samples untouched",
    KILL: "rerun exit 0, intact, metrics.json, no temp file",
    RACE: "one makes the images, other refuses (1 line, holder) or waits; intact",
    SWEEP: "exit 2 + 1 line per bad point, or failed.json (name, scale) + rest done, exit 1",
}


# ---------------------------------------------------------------------------------------------------------- cases

@dataclass
class Shared:
    root: Path        # the temp folder of the whole matrix
    ref: Path         # the reference run (24 samples, metric=none)
    cache: Path       # the metric cache the cases share (filled once)
    fid: float | None  # the clean scored run's fid_fmnist


@dataclass
class Ctx:
    shared: Shared
    root: Path        # the case's own folder (logs, helper files); out_dir is root/run
    out: Path
    cache: Path
    own_cache: bool   # a cache of the case's own (checked for temp files and damage)
    reference: dict[str, bytes]                               # the reference run's samples
    count: int = NUM_SAMPLES                                  # the samples the case's command asks for
    before: set[str] = field(default_factory=set)             # samples in out_dir before the judged command
    damaged_cache: dict[str, bytes] = field(default_factory=dict)  # cache files the setup damaged: their bytes

    def folders(self) -> list[Path]:
        """Where no temp file may be left: the run folder, and the case's own cache."""
        return [self.out, self.cache] if self.own_cache else [self.out]


@dataclass
class Case:
    name: str
    args: list[str]
    setup: Callable[[Ctx], None] | None = None
    expect: str = USER
    code: int | None = 2                 # user: the exit status required (None: any non-zero)
    metric: bool = False                 # score, with metric.cache_root=; else metric=none
    cache: str = "shared"                # shared | copy (of the filled shared cache) | empty
    kill: tuple[int, str] | None = None  # (signal, moment: start | claimed | sampling | scoring)
    second_at: str | None = None         # race: the second process starts at this moment of the first
    env: dict = field(default_factory=dict)  # a value None removes the variable
    max_s: float | None = None           # the case's command must end within this many seconds
    timeout: float | None = None         # seconds for one command; None: USER_TIMEOUT for user mistakes, else TIMEOUT
    before: list[str] | None = None      # a first command (its args) run in the same out_dir before the judged one
    bad_points: int = 0                  # sweep: how many points are bad
    good_points: int = 0                 # sweep: how many are good

    @property
    def limit(self) -> float:
        return self.timeout or (USER_TIMEOUT if self.expect == USER else TIMEOUT)


# Damages and helper files; each returns a setup step taking the case's Ctx.

def from_reference(*steps: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        shutil.copytree(ctx.shared.ref, ctx.out)
        for step in steps:
            step(ctx)
    return setup


def truncate(rel: str, keep: float = 0.5):
    def step(ctx):
        path = ctx.out / rel
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * keep)])
    return step


def garbage(rel: str):
    def step(ctx):
        path = ctx.out / rel
        path.write_bytes(random.Random(rel).randbytes(max(path.stat().st_size, 64)))
    return step


def flip_middle(path: Path, count: int = 8) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def flip(rel: str):
    return lambda ctx: flip_middle(ctx.out / rel)


def delete(rel: str):
    def step(ctx):
        path = ctx.out / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return step


def write(rel: str, data: bytes):
    def step(ctx):
        path = ctx.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return step


def copy_over(src: str, dst: str):
    return lambda ctx: shutil.copyfile(ctx.out / src, ctx.out / dst)


def swap(a: str, b: str):
    def step(ctx):
        pa, pb = ctx.out / a, ctx.out / b
        tmp = pa.with_name("swap.partial")
        pa.rename(tmp)
        pb.rename(pa)
        tmp.rename(pb)
    return step


def mkdir(rel: str):
    return lambda ctx: (ctx.out / rel).mkdir(parents=True)


def damage_cache(how: str):
    """Every file of the case's cache copy: truncated to half, garbage, or 0 bytes."""
    def step(ctx):
        for path in sorted(p for p in ctx.cache.rglob("*") if p.is_file()):
            size = path.stat().st_size
            data = {"truncate": path.read_bytes()[:size // 2], "empty": b"",
                    "garbage": random.Random(path.name).randbytes(max(size, 64))}[how]
            path.write_bytes(data)
    return step


def cache_file(name: str, data: bytes):
    return lambda ctx: (ctx.cache / name).write_bytes(data)


def helper(name: str, make: Callable[[Path], None]):
    """A helper file root/name for the case's arguments ({root}/name)."""
    return lambda ctx: make(ctx.root / name)


def text_file(path: Path) -> None:
    path.write_text("these are not weights\n")


def truncated_weights(path: Path) -> None:
    data = WEIGHTS.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def flipped_weights(path: Path) -> None:
    shutil.copyfile(WEIGHTS, path)
    flip_middle(path, 16)


def hub_offline_env() -> dict:
    return {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_ENDPOINT": "http://127.0.0.1:9"}


K, I = signal.SIGKILL, signal.SIGINT

CASES: list[Case] = [
    # ---- user mistakes: the list tests/test_config_errors.py checks too (tests/cli_mistakes.py)
    *[Case(m.name, list(m.args), code=m.status, metric=m.metric, env=dict(m.env)) for m in MISTAKES],
    # ---- user mistakes that need a file made first, or limits of their own
    Case("out_dir is an existing regular file", ["out_dir={root}/a_file"], code=None,
         setup=helper("a_file", lambda p: p.write_text("a file\n"))),
    Case("model.weights=a text file", ["model.weights={root}/weights.txt"], code=None,
         setup=helper("weights.txt", text_file)),
    Case("model.weights=a truncated copy", ["model.weights={root}/truncated.safetensors"], code=None,
         setup=helper("truncated.safetensors", truncated_weights)),
    Case("model.weights=a copy with bytes flipped", ["model.weights={root}/flipped.safetensors"], code=None,
         setup=helper("flipped.safetensors", flipped_weights)),
    Case("model=ddpm_cifar10 model.source=some/hubid (no network)",
         ["model=ddpm_cifar10", "model.source=some/hubid", "metric=none"], code=None, env=hub_offline_env(),
         max_s=20, timeout=60),
    Case("metric.reference=a text file .npz", ["metric.reference={root}/ref.npz"], metric=True, code=None,
         setup=helper("ref.npz", lambda p: p.write_text("not an npz\n"))),
    Case("metric.cache_root=a regular file", ["metric.cache_root={root}/cache_file"], metric=True, code=None,
         setup=helper("cache_file", lambda p: p.write_text("a file\n"))),

    # ---- faults on an existing run folder (a copy of the reference run), rerun with the same command
    Case("fault: 000004.png truncated to half", [], from_reference(truncate("samples/000004.png")), REPAIR),
    Case("fault: 000006.png empty (0 bytes)", [], from_reference(write("samples/000006.png", b"")), REPAIR),
    Case("fault: garbage bytes in 000008.png", [], from_reference(garbage("samples/000008.png")), REPAIR),
    Case("fault: 8 bytes flipped in 000011.png", [], from_reference(flip("samples/000011.png")), REPAIR),
    Case("fault: 000003.png and 000005.png swapped", [],
         from_reference(swap("samples/000003.png", "samples/000005.png")), REPAIR),
    Case("fault: 000002.png replaced by a copy of 000001.png", [],
         from_reference(copy_over("samples/000001.png", "samples/000002.png")), REPAIR),
    Case("fault: 000010.png deleted", [], from_reference(delete("samples/000010.png")), REPAIR),
    Case("fault: samples/ deleted, sampling.json kept", [], from_reference(delete("samples")), REPAIR),
    Case("fault: a directory named 000009.png", [],
         from_reference(delete("samples/000009.png"), mkdir("samples/000009.png")), REPAIR_OR_REFUSE),
    Case("fault: sampling.json deleted (samples kept)", [], from_reference(delete("sampling.json")),
         REPAIR_OR_REFUSE),
    Case("fault: sampling.json truncated", [], from_reference(truncate("sampling.json")), REPAIR_OR_REFUSE),
    Case("fault: sampling.json garbage", [], from_reference(garbage("sampling.json")), REPAIR_OR_REFUSE),
    Case("fault: metrics.json garbage", [], from_reference(garbage("metrics.json")), REPAIR),
    Case("fault: labels.csv truncated", [], from_reference(truncate("labels.csv")), REPAIR),
    Case("fault: scale=3 on a scale=2 folder", ["scale=3"], from_reference(), REFUSE),
    Case("fault: stale temp files (.000007.png.abc.tmp, .metrics.json.xyz.tmp)", [],
         from_reference(write("samples/.000007.png.abc.tmp", b"\x89PNG half"),
                        write(".metrics.json.xyz.tmp", b'{"fid'),
                        delete("samples/000007.png")), REPAIR),
    Case("fault: scored, every cache file truncated", [], from_reference(damage_cache("truncate")), REPAIR,
         metric=True, cache="copy"),
    Case("fault: scored, every cache file garbage", [], from_reference(damage_cache("garbage")), REPAIR,
         metric=True, cache="copy"),
    Case("fault: scored, stale temp file in the cache", [],
         from_reference(cache_file(".fmnist-test-stat.pt.abc.tmp", b"half")), REPAIR, metric=True, cache="copy"),
    Case("fault: scored, 000004.png truncated", [], from_reference(truncate("samples/000004.png")), REPAIR,
         metric=True, cache="copy"),
    Case("fault: NaN-diverged run, then scale=2 in the same out_dir", ["scale=2"], None, REPAIR,
         before=["scale=1e38", "precision=fp32", "sampler.clip_x0=false"]),

    # ---- kills at several moments, then the same command again
    *[Case(f"{sig.name} {when}", [], expect=KILL, kill=(sig, moment), **scoring)
      for sig in (K, I)
      for when, moment, scoring in (("at the start", "start", {}),
                                    ("after sampling.json appears", "claimed", {}),
                                    ("during sampling (3 PNGs written)", "sampling", {}),
                                    ("during scoring", "scoring", {"metric": True, "cache": "copy"}),
                                    ("during scoring, cache being filled", "scoring",
                                     {"metric": True, "cache": "empty"}))],

    # ---- two processes on one out_dir
    Case("race: two identical runs started together", [], expect=RACE),
    Case("race: a second run starts when the first has 3 of 48 PNGs", ["num_samples=48"], expect=RACE,
         second_at="sampling"),
    Case("race: two runs resume a half-made folder together", [],
         from_reference(*(delete(f"samples/{i:06d}.png") for i in range(12, 24))), RACE),

    # ---- sweeps with bad points
    Case("sweep -m scale=1,nan", ["-m", "scale=1,nan"], expect=SWEEP, bad_points=1, good_points=1),
    Case("sweep -m guidance=cfg,bogus", ["-m", "guidance=cfg,bogus"], expect=SWEEP, bad_points=1, good_points=1),
    Case("sweep -m foo=1,2", ["-m", "foo=1,2"], expect=SWEEP, bad_points=2),
    Case("sweep -m steps=5,-1", ["-m", "steps=5,-1"], expect=SWEEP, bad_points=1, good_points=1),
    Case("sweep -m scale=2,1e38 (a NaN point)", ["-m", "scale=2,1e38", "precision=fp32", "sampler.clip_x0=false"],
         expect=SWEEP, bad_points=1, good_points=1),
]


# --------------------------------------------------------------------------------------------------- processes

def env_for(case: Case) -> dict:
    env = dict(os.environ, WANDB_MODE="disabled")
    env.pop("HYDRA_FULL_ERROR", None)
    for key, value in case.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def arg_key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def command(case: Case, ctx: Ctx, args: list[str] | None = None) -> list[str]:
    """The base arguments, less those the case sets itself; flags (-m, --config-name) first, as argparse needs."""
    args = [a.format(out=ctx.out, root=ctx.root, cache=ctx.cache) for a in (case.args if args is None else args)]
    defaults = BASE + [f"out_dir={ctx.out}"] + ([f"metric.cache_root={ctx.cache}"] if case.metric else ["metric=none"])
    keys = {arg_key(a) for a in args}
    flags = [a for a in args if a.startswith("-")]
    rest = [a for a in args if not a.startswith("-")]
    return [sys.executable, "-m", "diffguide.run", *flags, *(a for a in defaults if arg_key(a) not in keys), *rest]


@dataclass
class Result:
    code: int | None   # None: timed out (killed)
    stdout: str
    stderr: str
    seconds: float
    pid: int = 0

    @property
    def lines(self) -> list[str]:
        return command_faults.stderr_lines(self.stderr)

    @property
    def traceback(self) -> bool:
        return command_faults.has_traceback(self.stderr)

    def status(self) -> str:
        return "timeout" if self.code is None else str(self.code)

    def generated(self) -> int:
        """Images this process made: its stdout JSON's images_generated, else tqdm's 'sampling N of M', else 0."""
        for line in reversed(self.stdout.splitlines()):
            try:
                value = json.loads(line).get("images_generated")
            except (ValueError, AttributeError):
                continue
            if isinstance(value, int):
                return value
        made = re.findall(r"sampling (\d+) of \d+", self.stderr)
        return int(made[-1]) if made else 0


class Proc:
    """One `python -m diffguide.run` in its own process group, output to files (pipes could fill up)."""

    count = 0
    lock = threading.Lock()

    def __init__(self, cmd: list[str], env: dict, log_dir: Path):
        with Proc.lock:
            Proc.count += 1
            tag = Proc.count
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log_dir / f"{tag}.stdout", log_dir / f"{tag}.stderr"
        (log_dir / f"{tag}.cmd").write_text(" ".join(cmd) + "\n")
        self.start = time.monotonic()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                          start_new_session=True)

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """To the whole group, as a terminal's Ctrl-C does; only while the leader is not reaped (its pid is ours)."""
        if self.popen.returncode is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> Result:
        try:
            code = self.popen.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait()
            code = None
        seconds = time.monotonic() - self.start
        read = lambda p: p.read_bytes().decode("utf-8", "replace")
        return Result(code, read(self.out_path), read(self.err_path), seconds, self.popen.pid)


def run_once(case: Case, ctx: Ctx, args: list[str] | None = None) -> Result:
    return Proc(command(case, ctx, args), env_for(case), ctx.root / "logs").wait(case.limit)


# --------------------------------------------------------------------------------------------------- checks

def pngs(out: Path) -> dict[str, bytes | None]:
    """Every NNNNNN.png entry of out/samples: its bytes, or None for something that is not a file."""
    folder = out / "samples"
    if not folder.is_dir():
        return {}
    return {p.name: (p.read_bytes() if p.is_file() else None) for p in folder.iterdir() if SAMPLE_NAME.match(p.name)}


def temp_files(*folders: Path) -> list[str]:
    return [str(p) for folder in folders if folder.is_dir() for p in folder.rglob("*")
            if p.name.startswith(".") and p.name.endswith(".tmp")]


def count_pngs(out: Path) -> int:
    folder = out / "samples"
    return sum(1 for p in folder.iterdir() if SAMPLE_NAME.match(p.name)) if folder.is_dir() else 0


def intact(ctx: Ctx) -> tuple[bool, str]:
    """Samples 0..count-1 exist and no other; those the reference run made are its bytes exactly."""
    have, reference = pngs(ctx.out), ctx.reference
    want = {f"{i:06d}.png" for i in range(ctx.count)}
    missing = sorted(want - set(have))
    extra = sorted(set(have) - want)
    differ = sorted(n for n in want & set(have) & set(reference) if have[n] != reference[n])
    problems = [f"{label} {', '.join(names[:4])}{'...' if len(names) > 4 else ''}"
                for label, names in (("missing", missing), ("extra", extra), ("differ", differ)) if names]
    return not problems, "; ".join(problems)


def no_temp(ctx: Ctx) -> list[str]:
    temps = temp_files(*ctx.folders())
    return [f"temp files left: {', '.join(Path(t).name for t in temps[:3])}"] if temps else []


def one_line(result: Result) -> list[str]:
    """Reasons a run is not 'exactly one non-empty stderr line, no traceback'."""
    why = []
    if len(result.lines) != 1:
        why.append(f"{len(result.lines)} stderr lines")
    if result.traceback:
        why.append("traceback")
    return why


def metrics_ok(out: Path, scored: bool, fid: float | None) -> list[str]:
    path = out / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        return ["no metrics.json"]
    except ValueError:
        return ["metrics.json unreadable"]
    if scored and fid is not None:
        got = metrics.get("fid_fmnist")
        if not isinstance(got, (int, float)) or not math.isclose(got, fid, rel_tol=1e-4):
            return [f"fid_fmnist {got} != clean run's {fid:.6g}"]
    return []


@dataclass
class Row:
    case: Case
    status: str = ""
    lines: str = ""
    traceback: bool = False
    intact: str = "-"
    why: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.why

    def note(self, results: list[Result]) -> None:
        self.status = " → ".join(r.status() for r in results)
        self.lines = " → ".join(str(len(r.lines)) for r in results)
        self.traceback = any(r.traceback for r in results)


# --------------------------------------------------------------------------------------------------- judges

def judge_user(case: Case, ctx: Ctx, row: Row) -> None:
    result = run_once(case, ctx)
    row.note([result])
    if result.code is None:
        row.why.append(f"still running after {case.limit:.0f} s")
    elif case.code is not None and result.code != case.code:
        row.why.append(f"exit {result.code}, not {case.code}")
    elif result.code == 0:
        row.why.append("exit 0")
    row.why += one_line(result)
    if case.max_s is not None and result.seconds > case.max_s:
        row.why.append(f"took {result.seconds:.0f} s (> {case.max_s:.0f})")
    made = len(pngs(ctx.out))
    if made:
        row.why.append(f"{made} PNGs sampled")


def judge_folder(case: Case, ctx: Ctx, row: Row) -> None:
    """repair, repair|refuse, refuse: the same command on a (damaged) folder; the NaN case runs `before` first."""
    results = []
    if case.before is not None:
        first = run_once(case, ctx, case.before)
        results.append(first)
        if first.code == 0:
            row.why.append("the diverging run exited 0")
        if pngs(ctx.out):
            row.why.append(f"the diverging run wrote {len(pngs(ctx.out))} PNGs")
    before = pngs(ctx.out)
    result = run_once(case, ctx)
    results.append(result)
    row.note(results)
    same, diff = intact(ctx)
    row.intact = "yes" if same else "no"
    row.why += no_temp(ctx)
    refused = result.code not in (0, None)
    if case.expect == REFUSE or (case.expect == REPAIR_OR_REFUSE and refused):
        if not refused:
            row.why.append("exit 0: accepted" if result.code == 0 else "timed out")
        row.why += one_line(result)
        if pngs(ctx.out) != before:
            row.why.append("samples changed by the refused run")
        return
    if result.code != 0:
        row.why.append(f"exit {result.status()}, not 0")
        if result.traceback:
            row.why.append("traceback")
    if not same:
        row.why.append(diff)
    row.why += metrics_ok(ctx.out, case.metric, ctx.shared.fid) if result.code == 0 else []
    if result.code == 0:
        still = [name for name, data in ctx.damaged_cache.items()
                 if (ctx.cache / name).is_file() and (ctx.cache / name).read_bytes() == data]
        if still:
            row.why.append(f"cache still damaged: {', '.join(still[:2])}")


def wait_for(proc: Proc, moment: str, ctx: Ctx, limit: float = 120) -> str | None:
    """Poll until the moment comes; None when the run ended (or the limit passed) first."""
    if moment == "start":
        time.sleep(0.5)
        return "at 0.5 s" if proc.running() else None
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.running():
        if moment == "claimed" and (ctx.out / "sampling.json").is_file():
            return "sampling.json written"
        if moment == "sampling":
            n = count_pngs(ctx.out)
            if n >= 3:
                return f"{n} PNGs written"
        if moment == "scoring" and count_pngs(ctx.out) >= ctx.count and (ctx.out / "labels.csv").is_file():
            time.sleep(0.5)
            if (ctx.out / "metrics.json").exists():
                return None
            return "all PNGs, labels.csv written"
        time.sleep(0.005)
    return None


def judge_kill(case: Case, ctx: Ctx, row: Row) -> None:
    sig, moment = case.kill
    proc = Proc(command(case, ctx), env_for(case), ctx.root / "logs")
    when = wait_for(proc, moment, ctx)
    if when is None:
        row.why.append(f"harness: the run ended before the moment '{moment}'")
    proc.signal(sig)
    first = proc.wait(60)
    if sig == signal.SIGINT:
        if first.code != 130:
            row.why.append(f"SIGINT exit {first.status()}, not 130")
        row.why += ["SIGINT: " + w for w in one_line(first)]
        if first.lines and not first.lines[0].strip().startswith(INTERRUPTED_PREFIX):
            row.why.append(f"SIGINT line is not '{INTERRUPTED_PREFIX}...': {first.lines[0].strip()[:60]!r}")
    second = run_once(case, ctx)
    row.note([first, second])
    if sig == signal.SIGKILL:  # what the killed run printed is not judged
        row.lines = f"- → {len(second.lines)}"
        row.traceback = second.traceback
    if second.code != 0:
        row.why.append(f"rerun exit {second.status()}" + (" (traceback)" if second.traceback else ""))
    same, diff = intact(ctx)
    row.intact = "yes" if same else "no"
    if not same:
        row.why.append(diff)
    row.why += metrics_ok(ctx.out, case.metric, ctx.shared.fid)
    row.why += no_temp(ctx)
    if when:
        row.status += f" (killed: {when})"


def judge_race(case: Case, ctx: Ctx, row: Row) -> None:
    env, cmd = env_for(case), command(case, ctx)
    a = Proc(cmd, env, ctx.root / "logs")
    if case.second_at is not None and wait_for(a, case.second_at, ctx) is None:
        row.why.append(f"harness: the first run ended before the moment '{case.second_at}'")
    b = Proc(cmd, env, ctx.root / "logs")
    results = [a.wait(case.limit), b.wait(case.limit)]
    row.note(results)
    row.status, row.lines = row.status.replace(" → ", " / "), row.lines.replace(" → ", " / ")  # side by side
    expected = ctx.count - len(ctx.before)
    makers = [r for r in results if r.code == 0 and (r.generated() or 0) > 0]
    if len(makers) != 1:
        row.why.append(f"{len(makers)} processes made images "
                       f"({', '.join(str(r.generated()) for r in results)} generated)")
    else:
        maker = makers[0]
        other = results[1] if maker is results[0] else results[0]
        if maker.generated() != expected:
            row.why.append(f"the maker made {maker.generated()}, not {expected}")
        if other.code == 0:
            if (other.generated() or 0) != 0:
                row.why.append(f"the other also made {other.generated()}")
        else:
            row.why += ["other: " + w for w in one_line(other)]
            if other.lines and str(maker.pid) not in other.lines[-1]:
                row.why.append(f"the refusal does not name the holder (pid {maker.pid})")
    same, diff = intact(ctx)
    row.intact = "yes" if same else "no"
    if not same:
        row.why.append(diff)
    row.why += no_temp(ctx)


def point_overrides(folder: Path, sweep: Path) -> dict[str, str]:
    """A sweep job's overrides from its folder name (k=v,k=v), as diffguide names them."""
    name = str(folder.relative_to(sweep))
    return dict(part.split("=", 1) for part in name.split(",") if "=" in part)


def judge_sweep(case: Case, ctx: Ctx, row: Row) -> None:
    result = run_once(case, ctx)
    row.note([result])
    sampled = [p for p in ctx.out.rglob("*.png") if p.parent.name == "samples"] if ctx.out.is_dir() else []
    failed = sorted(ctx.out.rglob("failed.json")) if ctx.out.is_dir() else []
    finished = sorted(ctx.out.rglob("metrics.json")) if ctx.out.is_dir() else []
    if result.code == 0:
        row.why.append("exit 0: the bad point passed silently")
    elif result.code == 2 and not failed:  # validated up front
        if len(result.lines) != case.bad_points:
            row.why.append(f"exit 2 with {len(result.lines)} stderr lines, not {case.bad_points}")
        if result.traceback:
            row.why.append("traceback")
        if sampled:
            row.why.append(f"{len(sampled)} PNGs sampled before the refusal")
    elif result.code == 1 or failed:
        if result.code != 1:
            row.why.append(f"exit {result.status()}, not 1")
        if result.traceback:
            row.why.append("traceback")
        if len(failed) != case.bad_points:
            row.why.append(f"{len(failed)} failed.json, not {case.bad_points}")
        if len(finished) != case.good_points:
            row.why.append(f"{len(finished)} metrics.json, not {case.good_points}")
        for path in failed:
            try:
                failure = json.loads(path.read_text())
            except ValueError:
                row.why.append(f"{path.parent.name}/failed.json unreadable")
                continue
            point = point_overrides(path.parent, ctx.out)
            want = point.get("guidance", "cfg")
            got = failure.get("guidance")
            if got != want:
                row.why.append(f"failed.json guidance {got!r}, not {want!r}")
            scale = failure.get("scale")
            if want in GUIDANCES and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
                row.why.append(f"failed.json scale {scale!r} is not a number")
    else:
        row.why.append(f"exit {result.status()}, neither 2 (up front) nor 1 (failed.json)")
        if result.traceback:
            row.why.append("traceback")


JUDGES = {USER: judge_user, REPAIR: judge_folder, REPAIR_OR_REFUSE: judge_folder, REFUSE: judge_folder,
          KILL: judge_kill, RACE: judge_race, SWEEP: judge_sweep}


def expected_text(case: Case) -> str:
    text = EXPECTED[case.expect]
    if case.expect == USER and case.code is None:
        text = text.replace("exit 2", "exit!=0")
    if case.max_s:
        text += f", within {case.max_s:.0f} s"
    if case.kill and case.kill[0] == signal.SIGINT:
        text = "exit 130 + 1 line 'interrupted…'; " + text
    if case.expect == SWEEP:
        text += f" ({case.bad_points} bad)"
    return text


def requested(case: Case) -> int:
    """num_samples of the case's command."""
    asked = [a.split("=", 1)[1] for a in case.args if arg_key(a) == "num_samples"]
    return int(asked[-1]) if asked and asked[-1].isdigit() else NUM_SAMPLES


def run_case(case: Case, index: int, shared: Shared, reference: dict[str, bytes]) -> Row:
    root = shared.root / "cases" / f"{index:03d}"
    root.mkdir(parents=True)
    cache = shared.cache
    if case.cache == "copy":
        cache = root / "cache"
        shutil.copytree(shared.cache, cache)
    elif case.cache == "empty":
        cache = root / "cache"
        cache.mkdir()
    ctx = Ctx(shared, root, root / "run", cache, case.cache != "shared", reference, requested(case))
    row = Row(case)
    start = time.monotonic()
    try:
        if case.setup is not None:
            case.setup(ctx)
        if ctx.own_cache:
            for path in cache.rglob("*"):
                clean = shared.cache / path.relative_to(cache)
                if path.is_file() and clean.is_file() and clean.read_bytes() != path.read_bytes():
                    ctx.damaged_cache[str(path.relative_to(cache))] = path.read_bytes()
        ctx.before = set(pngs(ctx.out))
        JUDGES[case.expect](case, ctx, row)
    except Exception as exc:  # a harness failure shows as a broken row, not as a crash of the matrix
        row.why.append(f"harness error: {type(exc).__name__}: {exc}")
    row.seconds = time.monotonic() - start
    return row


# --------------------------------------------------------------------------------------------------- main

def prepare(root: Path) -> tuple[Shared, dict[str, bytes]]:
    """The reference run (metric=none), then a scored run in a fresh folder that fills the shared cache."""
    shared = Shared(root, root / "reference", root / "cache", None)
    shared.cache.mkdir()
    env = env_for(Case("prepare", []))
    for label, out, extra in (("reference run", shared.ref, ["metric=none"]),
                              ("scored run (fills the cache)", root / "scored", [f"metric.cache_root={shared.cache}"])):
        cmd = [sys.executable, "-m", "diffguide.run", *BASE, f"out_dir={out}", *extra]
        start = time.monotonic()
        result = Proc(cmd, env, root / "prepare_logs").wait(TIMEOUT)
        print(f"prepare: {label}: exit {result.status()} in {time.monotonic() - start:.1f} s", file=sys.stderr)
        if result.code != 0 or len(pngs(out)) != NUM_SAMPLES:
            sys.exit(f"fault_matrix: the {label} failed (exit {result.status()}, {len(pngs(out))} PNGs); "
                     f"nothing to compare against. Its stderr ends:\n{result.stderr[-2000:]}")
    reference = pngs(shared.ref)
    if pngs(root / "scored") != reference:
        print("fault_matrix: WARNING: a second run of the reference command made other bytes: samples are not "
              "deterministic, every 'samples intact' below is meaningless", file=sys.stderr)
    try:
        shared.fid = json.loads((root / "scored" / "metrics.json").read_text()).get("fid_fmnist")
    except (OSError, ValueError):
        shared.fid = None
    return shared, reference


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(rows: list[Row]) -> str:
    head = ["case", "exit status", "stderr lines", "traceback", "samples intact", "expected", "verdict", "s", "why"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(cell(c) for c in (
            row.case.name, row.status, row.lines, "yes" if row.traceback else "no", row.intact,
            expected_text(row.case), "ok" if row.ok else "BROKEN", f"{row.seconds:.1f}", "; ".join(row.why))) + " |")
    return "\n".join(lines)


def summary(rows: list[Row], seconds: float) -> str:
    broken = [row for row in rows if not row.ok]
    text = f"{len(rows)} cases, {len(rows) - len(broken)} ok, {len(broken)} broken"
    text += f"\n\nwhole matrix: {seconds / 60:.1f} min"
    if broken:
        text += "\n\nBroken:\n" + "\n".join(f"- {row.case.name}: {'; '.join(row.why)}" for row in broken)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="run the cases whose name contains this substring")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table and summary to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder of every case (logs, run folders)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--commands", action="store_true", help="only the other entry points' cases "
                        "(train, report, classify, edit: scripts/command_faults.py)")
    parser.add_argument("--no-commands", action="store_true", help="only `run`'s cases")
    args = parser.parse_args()
    cases = [c for c in CASES if (args.only is None or args.only.lower() in c.name.lower()) and not args.commands]
    command_cases = [] if args.no_commands else [
        c for c in command_faults.CASES if args.only is None or args.only.lower() in c.name.lower()]
    if args.list:
        print("\n".join(f"{c.expect:14} {c.name}" for c in [*cases, *command_cases]))
        return
    if not cases and not command_cases:
        sys.exit(f"fault_matrix: no case matches {args.only!r}")
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="fault_matrix."))
    print(f"fault_matrix: {len(cases)} cases under {root}", file=sys.stderr)
    try:
        rows: list[Row | None] = [None] * len(cases)
        done = 0

        def work(index: int) -> None:
            nonlocal done
            row = run_case(cases[index], index, shared, reference)
            rows[index] = row
            with Proc.lock:
                done += 1
                print(f"[{done}/{len(cases)}] {'ok    ' if row.ok else 'BROKEN'} {row.seconds:5.1f} s  "
                      f"{row.case.name}", file=sys.stderr, flush=True)

        if cases:
            shared, reference = prepare(root)
            with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
                list(pool.map(work, range(len(cases))))
        command_rows = []
        for index, case in enumerate(command_cases):  # one at a time: some read the repository's git status
            row = command_faults.run_case(case, root, index)
            command_rows.append(row)
            print(f"[{index + 1}/{len(command_cases)}] {'ok    ' if row.ok else 'BROKEN'} {row.seconds:5.1f} s  "
                  f"{case.name}", file=sys.stderr, flush=True)
        report = (table(rows) + "\n\n" if rows else "") + \
            (command_faults.table(command_rows) + "\n\n" if command_rows else "") + \
            summary([*rows, *command_rows], time.monotonic() - start)
        print(report)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(report + "\n")
    finally:
        if args.keep:
            print(f"fault_matrix: kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
