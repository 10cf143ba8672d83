"""Self-describing safetensors checkpoints: tensors plus the JSON config that rebuilds the network."""

import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

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


def _metadata(blob: bytes) -> dict:
    """The `__metadata__` of a safetensors file's JSON header."""
    header_len = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + header_len]).get("__metadata__") or {}


def _data_digest(blob: bytes) -> str:
    """sha256 of a safetensors file's tensor data (everything after the 8-byte length and the JSON header)."""
    header_len = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(memoryview(blob)[8 + header_len:]).hexdigest()


def save(path: Path, state_dict: dict[str, torch.Tensor], kind: str, config: dict,
         storage_dtype: torch.dtype | None = torch.float16) -> None:
    """Float tensors are stored in `storage_dtype` (fp16: half the size; loading copies them into the network's own
    float32 parameters). Integer buffers keep their dtype. The metadata carries the sha256 of the tensor data, which
    `load` checks: a damaged file is refused instead of loading as a silently different network."""
    tensors = {k: (v.to(storage_dtype) if storage_dtype is not None and v.is_floating_point() else v)
               .detach().contiguous().cpu() for k, v in state_dict.items()}
    metadata = {"kind": kind, "config": json.dumps(config, sort_keys=True)}
    digest = _data_digest(safetensors_bytes(tensors, metadata=metadata))
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={**metadata, "data_sha256": digest}))


def load(path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and config of a checkpoint of the given kind; a missing, damaged or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    blob = path.read_bytes()
    try:
        metadata = _metadata(blob)
        tensors = safetensors_load(blob)
    except Exception as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read weights file {path}: not a whole safetensors file ({why})") from None
    if metadata.get("kind") != kind:
        raise UserError(f"{path} holds a {metadata.get('kind', 'foreign')!r} checkpoint, not a {kind!r} one")
    expected = metadata.get("data_sha256")
    if expected is not None and _data_digest(blob) != expected:
        raise UserError(f"weights file {path} is damaged: its tensor data does not match the sha256 recorded when "
                        f"it was saved; restore it (git checkout, or copy it again) or retrain it")
    return tensors, json.loads(metadata["config"])


def seal(path: Path) -> None:
    """Add the data digest to a checkpoint saved before `save` recorded one (tensors unchanged, bit for bit)."""
    blob = Path(path).read_bytes()
    metadata = _metadata(blob)
    tensors = safetensors_load(blob)
    metadata.pop("data_sha256", None)
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={**metadata, "data_sha256": _data_digest(blob)}))


def file_digest(path, length: int = 12) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def path_digest(path, length: int = 16) -> str:
    """The content digest of a file, or of a folder (every file below it, by relative path: a hub model folder)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path, length)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{file.relative_to(path)}\0{file_digest(file, 64)}\n".encode())
    return digest.hexdigest()[:length]


def asset_path(name: str) -> str:
    """Absolute path of a file shipped in diffguide/weights (resolver `dg.asset`)."""
    return str(Path(__file__).resolve().parent / "weights" / name)
