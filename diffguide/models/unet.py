"""Pixel-space class-conditional UNets (diffusers UNet2DModel) stored as diffguide checkpoints."""

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffguide import checkpoint
from diffguide.models.denoiser import Denoiser

KIND = "unet-denoiser"


class UNetDenoiser(Denoiser):
    """UNet2DModel with a class embedding of num_classes + 1 rows; the last row is the null class."""

    def __init__(self, unet: UNet2DModel, num_classes: int, scheduler_config: dict):
        scheduler = DDPMScheduler.from_config(scheduler_config)
        size = unet.config.sample_size
        super().__init__(scheduler.alphas_cumprod, (unet.config.in_channels, size, size), num_classes,
                         null_class=num_classes, scheduler_config=scheduler.config, data_range=(-1.0, 1.0))
        self.unet = unet

    def _eps(self, x, t, labels):
        return self.unet(x, t, class_labels=labels).sample


def build(unet_config: dict, num_classes: int, scheduler_config: dict) -> UNetDenoiser:
    unet = UNet2DModel(**unet_config, num_class_embeds=num_classes + 1)
    return UNetDenoiser(unet, num_classes, scheduler_config)


def config_of(model: UNetDenoiser) -> dict:
    unet_config = {k: v for k, v in model.unet.config.items() if not k.startswith("_") and k != "num_class_embeds"}
    return {"unet": unet_config, "num_classes": model.num_classes,
            "scheduler": {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}}


def save(model: UNetDenoiser, path: Path, extra: dict | None = None) -> None:
    checkpoint.save(path, model.unet.state_dict(), KIND, {**config_of(model), **(extra or {})})


def load(weights: str) -> UNetDenoiser:
    """The `_target_` of conf/model/fmnist_unet.yaml: rebuild the network from the checkpoint's own config."""
    tensors, config = checkpoint.load(weights, KIND)
    model = build(config["unet"], config["num_classes"], config["scheduler"])
    model.unet.load_state_dict(tensors)
    return model.eval().requires_grad_(False)
