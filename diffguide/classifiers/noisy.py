"""A noise-aware classifier p(y | x_t, t) for classifier guidance, in the shape of ADM's: the encoder half of a UNet
(diffusers' ResnetBlock2D with a timestep embedding, strided downsampling), global pooling and a linear head.
No library ships an encoder-only diffusion classifier, so the few lines that stack the blocks are written here."""

from pathlib import Path

import torch
from diffusers import DDPMScheduler
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from torch import nn

from diffguide.store import checkpoint
from diffguide.classifiers.base import Classifier
from diffguide.models.schedules import DiscreteVP, Level

KIND = "noisy-classifier"


class NoisyClassifier(Classifier):
    def __init__(self, in_channels: int = 1, channels=(32, 64, 128), num_classes: int = 10, groups: int = 8):
        super().__init__()
        self.config = {"in_channels": in_channels, "channels": list(channels), "num_classes": num_classes,
                       "groups": groups}
        self.num_classes = num_classes
        temb = channels[0] * 4
        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels[0], temb)
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        blocks, previous = [], channels[0]
        for i, width in enumerate(channels):
            blocks.append(ResnetBlock2D(in_channels=previous, out_channels=width, temb_channels=temb, groups=groups))
            if i + 1 < len(channels):
                blocks.append(Downsample2D(width, use_conv=True))
            previous = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.GroupNorm(groups, previous), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(previous, num_classes))

    def logits(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embedding(self.time_proj(t).to(x.dtype))
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, emb) if isinstance(block, ResnetBlock2D) else block(h)
        return self.head(h)

    #: the discrete VP schedule the classifier was trained on (set by `load`; None: the level's own timestep)
    schedule = None

    def log_prob(self, x, t):
        """At a Level of a discrete model, its timestep (the classifier is trained on that model's schedule); at any
        other level (a flow or EDM model), the VP state of the same sigma, x / sqrt(alpha^2 + noise^2), at the
        (fractional) timestep of that sigma on the classifier's own schedule."""
        if isinstance(t, Level) and not (isinstance(t.t, int) or self.schedule is None):
            x, t = x / t.norm, self.schedule.time_of(t.sigma)
        time = t.t if isinstance(t, Level) else t
        t_batch = torch.full((x.shape[0],), time, device=x.device,
                             dtype=torch.long if float(time) == int(time) else torch.float32)
        return torch.log_softmax(self.logits(x, t_batch).float(), dim=1)


def save(model: NoisyClassifier, path: Path, extra: dict | None = None) -> None:
    checkpoint.save(path, model.state_dict(), KIND, {**model.config, **(extra or {})})


def load(weights: str) -> NoisyClassifier:
    """The `_target_` of conf/classifier/fmnist_noisy.yaml."""
    tensors, config = checkpoint.load(weights, KIND)
    model = NoisyClassifier(config["in_channels"], config["channels"], config["num_classes"], config["groups"])
    model.load_state_dict(tensors)
    if "scheduler" in config:
        scheduler = DDPMScheduler.from_config(config["scheduler"])
        model.schedule = DiscreteVP(scheduler.alphas_cumprod, scheduler.config)
    return model.eval().requires_grad_(False)
