"""Off-the-shelf classifiers of clean images, p(y | x0), for training-free guidance applied to the denoised x0."""

import torch
from torch import nn

from diffguide.metrics import evaluator as evaluator_lib


class CleanClassifier(nn.Module):
    """logits(x0) for x0 in the model's data space ([-1, 1] for pixel models)."""

    num_classes: int

    def logits(self, x0: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _relu_to_softplus(module: nn.Module, beta: float) -> int:
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.Softplus(beta=beta))
            replaced += 1
        else:
            replaced += _relu_to_softplus(child, beta)
    return replaced


class TimmClassifier(CleanClassifier):
    """A timm classifier checkpoint trained by `diffguide.train` (kind evaluator). softplus_beta: replace every ReLU
    by Softplus(beta) for smoother input gradients (EluCD uses beta = 3); None keeps the network as trained."""

    def __init__(self, weights: str, softplus_beta: float | None = None):
        super().__init__()
        self.model = evaluator_lib.load(weights)
        self.num_classes = self.model.config["num_classes"]
        if softplus_beta is not None:
            _relu_to_softplus(self.model, float(softplus_beta))

    def logits(self, x0):
        return self.model(((x0 + 1) / 2).clamp(0, 1))
