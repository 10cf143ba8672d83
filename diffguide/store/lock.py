"""One process at a time in an output folder: an flock on `FOLDER/.diffguide.lock`, which names its holder.

The kernel drops a dead holder's flock, so a killed command never leaves a folder stuck. flock works across the nodes
of NFS v4 and of Lustre or GPFS mounted with their flock option. Every command that writes a folder it may resume
(run, train, classify, edit) holds one."""

import fcntl
import os
import socket
import time
from pathlib import Path

from diffguide.errors import FolderRefused

LOCK_NAME = ".diffguide.lock"


class FolderLock:
    def __init__(self, folder: Path, what: str = "diffguide run", key: str = "out_dir"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what, self.key = what, key
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        """Hold the folder until `release` (or this process's exit); a second holder stops with one line
        (`FolderRefused`: it has changed nothing there)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderRefused(f"{self.folder} is in use by another {self.what} ({holder}); wait for it to finish, "
                            f"or use another {self.key}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
