"""Resumable training: the whole state of every `train_loop` a command runs, saved atomically in its folder.

A trainer may run several loops (PPAP's experts, progressive distillation's rounds); loop n of a command keeps its
state in `state-{n}.pt`: the live parameters, the tensors the trainer asks to keep (the EMA), AdamW's moments and
step counts, the batch generator's state, torch's global RNG (and CUDA's), the losses so far, the step and the
seconds spent. A rerun restores each loop where it stopped, so the model it ends with is bit-identical to an
uninterrupted run's (tests/test_train_command.py). A loop that had finished is restored at its last step and not
run again. The files are torch.save'd dicts of tensors and numbers, read back with `weights_only=True` (no pickled
code runs).

Ctrl-C during a loop is deferred to the end of the step: the state is then saved whole and `errors.Interrupted`
says where; a second Ctrl-C interrupts at once (the state of the last periodic save is kept)."""

import contextlib
import contextvars
import signal
import threading
from pathlib import Path

import torch

from diffguide.errors import Interrupted, UserError
from diffguide.store import checkpoint

_ACTIVE: contextvars.ContextVar["TrainingState | None"] = contextvars.ContextVar("diffguide_training_state",
                                                                                  default=None)


class TrainingState:
    """The state files of one command's loops in `folder`; `every`: save every N steps (0: only at a Ctrl-C and at
    each loop's end)."""

    def __init__(self, folder: Path, every: int):
        self.folder = Path(folder)
        self.every = int(every)
        self.loops = 0
        #: (step, total, path) of the newest state written or restored, for the interruption's message
        self.last: tuple[int, int, Path] | None = None

    def next_path(self) -> Path:
        path = self.folder / f"state-{self.loops}.pt"
        self.loops += 1
        return path

    def load(self, path: Path) -> dict | None:
        if not path.is_file():
            return None
        try:
            return checkpoint.load_state(path)
        except Exception as exc:
            raise UserError(f"the training state {path} cannot be read ({type(exc).__name__}); delete it to start "
                            f"that part of the training over") from None

    def save(self, path: Path, state: dict) -> None:
        checkpoint.save_state(path, state)
        self.last = (int(state["step"]), int(state["total"]), path)

    def clear(self) -> None:
        for path in self.folder.glob("state-*.pt"):
            path.unlink(missing_ok=True)

    def interrupted(self) -> Interrupted:
        if self.last is None:
            return Interrupted("interrupted before the first training step; nothing was written")
        step, total, path = self.last
        return Interrupted(f"interrupted at step {step} of {total}; checkpoint kept in {path}; run the same command "
                           f"to resume")


def current() -> TrainingState | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def active(state: TrainingState):
    """Every train_loop inside saves to and resumes from `state`."""
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


class _Flag:
    def __init__(self):
        self.set = False


@contextlib.contextmanager
def deferred_interrupt():
    """SIGINT sets the yielded flag instead of raising (the loop stops at the end of its step); a second SIGINT
    raises KeyboardInterrupt at once. Outside the main thread, nothing is deferred."""
    flag = _Flag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.set:
            raise KeyboardInterrupt
        flag.set = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
