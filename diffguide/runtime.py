"""Device and precision choices shared by the entrypoints."""

import torch

from diffguide.errors import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} asked for, but this machine has no CUDA GPU: use device=cpu or device=auto")
    return device


def resolve_precision(name: str) -> torch.dtype | None:
    if name not in PRECISIONS:
        raise UserError(f"precision={name!r} is not one of {sorted(PRECISIONS)}")
    return PRECISIONS[name]
