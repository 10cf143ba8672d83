"""The Fashion-MNIST evaluator: a timm classifier whose penultimate features feed FID/KID/PR and logits feed IS."""

from pathlib import Path

import timm
import torch
from torch import nn

from diffguide.store import checkpoint

KIND = "fmnist-evaluator"
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST train pixel statistics on [0, 1]


class Evaluator(nn.Module):
    def __init__(self, timm_model: str, num_classes: int = 10, in_chans: int = 1, timm_kwargs: dict | None = None):
        super().__init__()
        timm_kwargs = dict(timm_kwargs or {})
        self.config = {"timm_model": timm_model, "num_classes": num_classes, "in_chans": in_chans,
                       "timm_kwargs": timm_kwargs}
        self.net = timm.create_model(timm_model, in_chans=in_chans, num_classes=num_classes, **timm_kwargs)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) or floats in [0, 1] -> the network's input."""
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return (x - MEAN) / STD

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net.forward_head(self.net.forward_features(self.normalize(images)), pre_logits=True)
        return features, self.net.get_classifier()(features)

    def forward(self, images):
        return self.features_and_logits(images)[1]


def save(model: Evaluator, path: Path, extra: dict | None = None) -> None:
    checkpoint.save(path, model.net.state_dict(), KIND, {**model.config, **(extra or {})})


def load(path) -> Evaluator:
    tensors, config = checkpoint.load(path, KIND)
    model = Evaluator(config["timm_model"], config["num_classes"], config["in_chans"], config.get("timm_kwargs"))
    model.net.load_state_dict(tensors)
    return model.eval().requires_grad_(False)
