"""Self-describing safetensors checkpoints: tensors plus the JSON config that rebuilds the network."""

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from diffguide.errors import UserError

# mkstemp creates files readable by their owner only; finished files get the mode a plain open() would give them.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, then rename: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save(path: Path, state_dict: dict[str, torch.Tensor], kind: str, config: dict,
         storage_dtype: torch.dtype | None = torch.float16) -> None:
    """Float tensors are stored in `storage_dtype` (fp16: half the size; loading copies them into the network's own
    float32 parameters). Integer buffers keep their dtype."""
    tensors = {k: (v.to(storage_dtype) if storage_dtype is not None and v.is_floating_point() else v)
               .detach().contiguous().cpu() for k, v in state_dict.items()}
    metadata = {"kind": kind, "config": json.dumps(config, sort_keys=True)}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


def load(path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and config of a checkpoint of the given kind; a missing or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise UserError(f"cannot read weights file {path}: {exc}") from None
    if metadata.get("kind") != kind:
        raise UserError(f"{path} holds a {metadata.get('kind', 'foreign')!r} checkpoint, not a {kind!r} one")
    return tensors, json.loads(metadata["config"])


def file_digest(path, length: int = 12) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:length]


def asset_path(name: str) -> str:
    """Absolute path of a file shipped in diffguide/weights (resolver `dg.asset`)."""
    return str(Path(__file__).resolve().parent / "weights" / name)
