"""Self-describing safetensors checkpoints: tensors plus the JSON config that rebuilds the network."""

import hashlib
import io
import json
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from diffguide.store.atomic import atomic_write_bytes
# Re-exported for the callers that still name them through this module (run.py, samples.py, train.py).
from diffguide.store.atomic import DiskFull, atomic_write_text, clean_stale_temps, human_bytes  # noqa: F401
from diffguide.errors import UserError


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


def save_state(path: Path, state: dict) -> None:
    """A dict of tensors and numbers (a training's or a command's resumable state), torch.save'd and written
    atomically; `load_state` reads it back without unpickling any code."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(path: Path) -> dict:
    """What `save_state` wrote (torch.load with weights_only=True: tensors, numbers, lists and dicts only); a damaged
    file raises whatever torch raises for it."""
    return torch.load(path, map_location="cpu", weights_only=True)


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
    return str(Path(__file__).resolve().parent.parent / "weights" / name)
