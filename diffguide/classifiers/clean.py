"""Off-the-shelf classifiers of clean images, p(y | x0), for training-free guidance applied to the denoised x0."""

from pathlib import Path

import torch
from torch import nn

from diffguide.errors import UserError
from diffguide.classifiers import evaluator as evaluator_lib


class CleanClassifier(nn.Module):
    """logits(x0) for the model's denoised estimate x0. A guidance method attaches the classifier to its model, so
    that x0 is decoded to an image first (a VAE decode for latent models, with the gradient through the decoder
    where the method takes one; nothing for pixel models); `classify` sees images in [-1, 1]."""

    num_classes: int
    _decode = None

    def attach(self, denoiser) -> "CleanClassifier":
        self._decode = denoiser.decode
        return self.to(denoiser.device)

    def logits(self, x0: torch.Tensor) -> torch.Tensor:
        return self.classify(self._decode(x0) if self._decode is not None else x0)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def clip_straight_through(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """x clamped to [lo, hi] in value but not in gradient: a guidance method takes the classifier's gradient at the
    clipped image, as EluCD (`design_cond_fn` on the clipped pred_xstart) does, and a pixel outside the range keeps
    the classifier's own gradient there instead of the zero a clamp would give it."""
    return x + (x.clamp(lo, hi) - x).detach()


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clipped straight-through (see clip_straight_through)."""
    return clip_straight_through((images + 1) / 2, 0.0, 1.0)


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

    def classify(self, images):
        return self.model(to_unit_range(images))


class TimmHubClassifier(CleanClassifier):
    """A timm classifier made by `timm.create_model(model_name)`, its weights from the hub (timm's own pretrained
    tag) or from a local file (`weights`, for clusters without internet). The input follows timm's data config for
    the model: images are resized to its input size with its interpolation and normalised with its mean and std.
    softplus_beta: ReLU -> Softplus(beta), as for TimmClassifier. data_config: overrides of timm's input_size,
    mean, std or interpolation, for weights trained otherwise than the model's hub tag (e.g. CIFAR-10 at 32x32)."""

    def __init__(self, model_name: str, weights: str | None = None, num_classes: int | None = None,
                 softplus_beta: float | None = None, data_config: dict | None = None):
        super().__init__()
        import timm
        from timm.data import resolve_data_config

        from diffguide.models import hub

        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        overlay = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in (data_config or {}).items()}
        if weights is not None:
            if not Path(weights).is_file():
                raise UserError(f"classifier.weights={weights}: no such file")
            overlay["file"] = str(weights)
            if num_classes is not None:  # the file's head has num_classes outputs: timm must not drop it
                overlay["num_classes"] = num_classes
        if overlay:
            kwargs["pretrained_cfg_overlay"] = overlay
        try:
            self.model = timm.create_model(model_name, pretrained=True, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise UserError(f"classifier.model_name={model_name!r} is not a timm model") from None
            raise
        except (OSError, ValueError) as exc:
            raise hub.not_found(model_name, f"the timm weights of {model_name}", "classifier.weights", exc) from None
        self.model.eval().requires_grad_(False)
        self.num_classes = self.model.num_classes
        data = resolve_data_config({}, model=self.model)
        self.input_size = tuple(data["input_size"][1:])
        self.interpolation = "bicubic" if data.get("interpolation") == "bicubic" else "bilinear"
        self.register_buffer("mean", torch.tensor(data["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data["std"]).view(1, -1, 1, 1), persistent=False)
        if softplus_beta is not None:
            _relu_to_softplus(self.model, float(softplus_beta))

    def classify(self, images):
        x = to_unit_range(images)
        if tuple(x.shape[-2:]) != self.input_size:
            x = torch.nn.functional.interpolate(x, size=self.input_size, mode=self.interpolation,
                                                align_corners=False)
        return self.model((x - self.mean) / self.std)
