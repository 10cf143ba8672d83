"""Atomic file writes: a temp file beside the target, then a rename, so readers never see half a file."""

import errno
import fcntl
import os
import secrets
import shutil
from pathlib import Path

from diffguide.errors import UserError

# Temp files are created readable by their owner only; finished files get the mode a plain open() would give them.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(UserError):
    """No room left where a file was being written: one line that names the folder and the space asked for."""


def _temp_name(path: Path) -> str:
    return f".{path.name}.{secrets.token_hex(4)}.tmp"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, then rename: readers see the old file or the new one, never half.

    The writer holds an exclusive flock on its temp file until the rename, so `clean_stale_temps` can tell a temp
    file whose writer died (the kernel released its lock) from one being written right now by another process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / _temp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # a cleaner may have taken the file between its creation and our lock: then write another one
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            free = shutil.disk_usage(path.parent).free
            raise DiskFull(f"no space left on the device of {path.parent} while writing {path.name} "
                           f"({human_bytes(len(data))}; {human_bytes(free)} free)") from None
        raise


def clean_stale_temps(folder: Path) -> int:
    """Delete the temp files of `atomic_write_bytes` in `folder` whose writer is gone (killed between its write and
    its rename): their flock is free. A temp file another live process is writing keeps its lock and is left alone.
    Returns how many were deleted."""
    removed = 0
    for tmp in Path(folder).glob(".*.tmp"):
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # being written
        else:
            tmp.unlink(missing_ok=True)
            removed += 1
        finally:
            os.close(fd)
    return removed


def human_bytes(n: float) -> str:
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1000
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
