"""The Denoiser interface every model family sits behind."""

from typing import Sequence

import torch
from torch import nn


class Denoiser(nn.Module):
    """A noise predictor eps(x_t, t, y) on a discrete VP schedule x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps.

    Subclasses implement `_eps` for one batch; this class owns the schedule, the eps/x0 conversions and the batching
    of several conditions into one forward pass. Labels are int64 class indices; `null_class` is the label of the
    unconditional model (None for an unconditional network).

    A network that also predicts its variance (improved DDPM's `learned_range`, as DiT does) sets `learned_variance`
    and implements `_output` (eps, then as many variance channels v in [-1, 1]); `forward` still returns eps. While a
    sampler has armed `capture_variance`, every forward records the labels and the variance channels of its rows, and
    `captured_variance` gives the sampler those of the prediction it asks for (sampler.variance=learned).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, sample_shape: Sequence[int], num_classes: int,
                 null_class: int | None, scheduler_config: dict, data_range: tuple[float, float] | None = None):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        self.null_class = null_class
        self.scheduler_config = dict(scheduler_config)
        # The range of clean data (pixel models: (-1, 1)); samplers may clip x0 to it. None for latent models.
        self.data_range = tuple(data_range) if data_range is not None else None
        self.autocast_dtype: torch.dtype | None = None
        self._captured: list[tuple[torch.Tensor | None, torch.Tensor]] | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the images `decode` gives (the sample shape itself for pixel models)."""
        return self.sample_shape

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def set_precision(self, dtype: torch.dtype | None) -> None:
        """Run the network under autocast in `dtype` (None: float32). The returned predictions are float32."""
        self.autocast_dtype = dtype

    @property
    def learned_variance(self) -> bool:
        """True when the network outputs variance channels after eps (see `_output`)."""
        return False

    def _eps(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _output(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The network's output for one batch: eps, followed by the variance channels where `learned_variance`."""
        return self._eps(x, t, labels)

    def autocast(self, device_type: str):
        """The precision context of the networks: autocast in `autocast_dtype`, or plain float32."""
        return torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def forward(self, x: torch.Tensor, t: int, labels: torch.Tensor | None) -> torch.Tensor:
        t_batch = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        with self.autocast(x.device.type):
            out = self._output(x, t_batch, labels).float()
        if not self.learned_variance:
            return out
        channels = self.sample_shape[0]
        if self._captured is not None:
            self._captured.append((labels, out[:, channels:].detach()))
        return out[:, :channels]

    def capture_variance(self, on: bool) -> None:
        """Arm (forgetting what was recorded) or disarm the recording of the variance channels of every forward."""
        self._captured = [] if on else None

    def captured_variance(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The variance channels (batch, C, ...) recorded since `capture_variance(True)` for the rows predicted with
        `labels` (the last such forward; a batched forward of several conditions is searched chunk by chunk); else,
        where there was exactly one forward of `batch` rows, that one's (an unconditional prediction); else None."""
        records = self._captured or []
        for recorded, variance in reversed(records):
            if len(variance) % batch:
                continue
            chunks = zip([None] * (len(variance) // batch) if recorded is None else recorded.split(batch),
                         variance.split(batch))
            for chunk_labels, chunk in chunks:
                if (chunk_labels is None and labels is None) or (
                        chunk_labels is not None and labels is not None and torch.equal(chunk_labels, labels)):
                    return chunk
        if len(records) == 1 and len(records[0][1]) == batch:
            return records[0][1]
        return None

    def eps_many(self, x: torch.Tensor, t: int, label_sets: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """eps for the same x under several conditions, in one forward pass of len(label_sets) * batch."""
        if len(label_sets) == 1:
            return [self(x, t, label_sets[0])]
        if any(labels is None for labels in label_sets):
            return [self(x, t, labels) for labels in label_sets]
        eps = self(torch.cat([x] * len(label_sets)), t, torch.cat(list(label_sets)))
        return list(eps.chunk(len(label_sets)))

    def condition(self, labels: torch.Tensor, conditional: bool) -> torch.Tensor | None:
        """The labels to predict with: the class labels, or the null class (None for an unconditional network)."""
        if conditional and self.num_classes:
            return labels
        return self.null_labels(labels) if self.null_class is not None else None

    def null_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if self.null_class is None:
            raise ValueError("this model has no null class: it cannot give an unconditional prediction")
        return torch.full_like(labels, self.null_class)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model space -> image space in [-1, 1] (identity for pixel models; a VAE decode for latent ones)."""
        return x0

    def alpha(self, t: int) -> float:
        """a_t = alphas_cumprod[t]; t = -1 stands for the clean data (a = 1)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def x0_from_eps(self, x: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        a = self.alpha(t)
        return (x - (1 - a) ** 0.5 * eps) / a ** 0.5

    def eps_from_x0(self, x: torch.Tensor, t: int, x0: torch.Tensor) -> torch.Tensor:
        a = self.alpha(t)
        return (x - a ** 0.5 * x0) / (1 - a) ** 0.5

    def sigma(self, t: int) -> float:
        """The EDM-style noise level sqrt((1 - a_t) / a_t) of timestep t."""
        a = self.alpha(t)
        return ((1 - a) / a) ** 0.5
