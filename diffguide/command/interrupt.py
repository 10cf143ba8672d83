"""Ctrl-C while the libraries import (torch, Hydra, diffusers: seconds on a cold start) is one line, not an import
traceback. An entry point installs this before its heavy imports; after them, its own handler answers Ctrl-C. This
module imports nothing heavy on purpose."""

import os
import sys


def _interrupted_hook(kind, value, tb, _default=sys.excepthook):
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted before any work started; nothing was written", file=sys.stderr, flush=True)
        os._exit(130)
    _default(kind, value, tb)


def install() -> None:
    sys.excepthook = _interrupted_hook
