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
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={name} asked for, but this machine has no CUDA GPU: use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device={name} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s): "
                            f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return device
    # mps, xpu, ...: torch.backends.mps / torch.xpu say whether this build and machine have one
    backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise UserError(f"device={name} asked for, but this machine (or this torch build) has no {device.type} "
                        f"device: use device=cpu or device=auto")
    return device


def resolve_precision(name: str) -> torch.dtype | None:
    if name not in PRECISIONS:
        raise UserError(f"precision={name!r} is not one of {sorted(PRECISIONS)}")
    return PRECISIONS[name]
