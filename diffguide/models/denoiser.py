"""The Denoiser interface every model family sits behind."""

from typing import Sequence

import torch
from torch import nn

from diffguide.models import parameterisation as param_lib
from diffguide.models.parameterisation import Prediction
from diffguide.models.schedules import DiscreteVP, Level, Schedule


class Denoiser(nn.Module):
    """A model family behind one interface. Two ways in, each the only one:

    - `predict(x, t, labels)`: the common prediction (x0 and eps together) at a noise level, whatever the network
      outputs and whatever its time: what samplers and guidance methods use (`pair` and `predict_many` batch
      several conditions into one forward of it; `output` / `from_output` convert a prediction to the network's own
      quantity and back, for methods that combine on it).
    - `raw_output(x, t, labels)`: the network's raw output at per-row model times, variance channels included, the
      input unscaled: what a training loss sees.

    `t` is a `Level` (diffguide/models/schedules.py: the sampler's and the guidance's noise-level axis) or the model's
    own time (a discrete model's timestep, a flow model's tau, an EDM model's sigma), which `level` maps to its Level.
    The family's `schedule` maps time to level and gives each sampler its grid; its `parameterisation` converts the
    network's output (eps, v, x0, EDM's F, a flow velocity) to the prediction and back. A family implements
    `_output` (one batch at network times) and declares its hookable parts in `parts()` (diffguide/models/hooks.py).
    Labels are int64 class indices; `null_class` is the label of the unconditional model (None for an unconditional
    network).

    A network that also predicts its variance (improved DDPM's `learned_range`, as DiT does) sets `learned_variance`
    and outputs its variance channels after the prediction's; `predict` returns the prediction. While a
    sampler has armed `capture_variance`, every forward records the labels and the variance channels of its rows, and
    `captured_variance` gives the sampler those of the prediction it asks for (sampler.variance=learned).
    """

    #: "class": labels are class indices; "text": indices into the run's prompt set (diffguide/models/text.py)
    conditioning = "class"

    def __init__(self, alphas_cumprod: torch.Tensor | None, sample_shape: Sequence[int], num_classes: int,
                 null_class: int | None, scheduler_config: dict, data_range: tuple[float, float] | None = None,
                 schedule: Schedule | None = None, parameterisation: str | param_lib.Parameterisation = "eps"):
        super().__init__()
        if schedule is None:
            schedule = DiscreteVP(alphas_cumprod, scheduler_config)
        self.schedule = schedule
        if alphas_cumprod is not None:
            self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)
        else:
            self.alphas_cumprod = None
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)
        self.parameterisation = (param_lib.make(parameterisation) if isinstance(parameterisation, str)
                                 else parameterisation)
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        self.null_class = null_class
        # every key explicit: diffusers' from_config replaces the keys a config lists in `_use_default_values` by the
        # target class's own defaults (HeunDiscreteScheduler's betas are Stable Diffusion's, not DDPM's)
        self.scheduler_config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        # The range of clean data (pixel models: (-1, 1)); samplers may clip x0 to it. None for latent models.
        self.data_range = tuple(data_range) if data_range is not None else None
        self.autocast_dtype: torch.dtype | None = None
        self._captured: list[tuple[torch.Tensor | None, torch.Tensor]] | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the images `decode` gives (the sample shape itself for pixel models)."""
        return self.sample_shape

    @property
    def num_train_timesteps(self) -> int | None:
        """The length of a discrete schedule (None for a continuous one)."""
        return None if self.alphas_cumprod is None else len(self.alphas_cumprod)

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def level(self, t) -> Level:
        """The Level of the model's time t (a Level is returned as it is)."""
        return t if isinstance(t, Level) else self.schedule.level(t)

    def same_noise_process(self, other: "Denoiser") -> bool:
        """True when predictions of the two models at one Level can be mixed (same family, schedule and time)."""
        if type(self.schedule) is not type(other.schedule):
            return False
        if self.alphas_cumprod is not None and other.alphas_cumprod is not None:
            return torch.allclose(self.alphas_cumprod.cpu(), other.alphas_cumprod.cpu())
        return self.schedule.scheduler_config == other.schedule.scheduler_config

    def check_sampling(self, sampler, guidance=None) -> None:
        """Refuse, in one line (UserError), a sampler or guidance method this model cannot be sampled with (a
        guidance-distilled student takes only its own guidance, a progressive one only its own DDIM grid)."""

    def set_precision(self, dtype: torch.dtype | None) -> None:
        """Run the network under autocast in `dtype` (None: float32). The returned predictions are float32."""
        self.autocast_dtype = dtype

    @property
    def learned_variance(self) -> bool:
        """True when the network outputs variance channels after eps (see `_output`)."""
        return False

    def _output(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The network's output for one batch at network times t (batch,): its prediction in its
        parameterisation, followed by the variance channels where `learned_variance`."""
        raise NotImplementedError

    def raw_output(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The network's raw output (training, tests) at per-row model times t (batch,),
        under this model's precision; variance channels included. The network input x is in the model's
        coordinates (the parameterisation's input scaling is the caller's, as a training loss sees it)."""
        with self.autocast(x.device.type):
            return self._output(x, self.schedule.network_time(t), labels)

    def autocast(self, device_type: str):
        """The precision context of the networks: autocast in `autocast_dtype`, or plain float32."""
        return torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _output_at(self, x: torch.Tensor, level: Level, labels: torch.Tensor | None) -> torch.Tensor:
        """The network's output in its parameterisation at one level (float32), variance channels split off (and
        recorded while a sampler captures them)."""
        time = torch.full((x.shape[0],), level.t, device=x.device,
                          dtype=torch.long if isinstance(level.t, int) else torch.float32)
        x_in = self.parameterisation.network_input(x, level)
        with self.autocast(x.device.type):
            out = self._output(x_in, self.schedule.network_time(time), labels).float()
        if not self.learned_variance:
            return out
        channels = self.sample_shape[0]
        if self._captured is not None:
            self._captured.append((labels, out[:, channels:].detach()))
        return out[:, :channels]

    def predict(self, x: torch.Tensor, t, labels: torch.Tensor | None) -> Prediction:
        """The common prediction (x0, eps) at level t under the condition `labels`."""
        level = self.level(t)
        return self.parameterisation.prediction(self._output_at(x, level, labels), x, level)

    def output(self, pred: Prediction, x: torch.Tensor, t) -> torch.Tensor:
        """The network's own quantity (eps, v, x0, F, velocity) of a prediction."""
        return self.parameterisation.output(pred, x, self.level(t))

    def from_output(self, out: torch.Tensor, x: torch.Tensor, t) -> Prediction:
        return self.parameterisation.prediction(out, x, self.level(t))

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

    def predict_many(self, x: torch.Tensor, t, label_sets: Sequence[torch.Tensor | None]) -> list[Prediction]:
        """Predictions for the same x under several conditions, in one forward pass of len(label_sets) * batch."""
        if len(label_sets) == 1 or any(labels is None for labels in label_sets):
            return [self.predict(x, t, labels) for labels in label_sets]
        level = self.level(t)
        pred = self.predict(torch.cat([x] * len(label_sets)), level, torch.cat(list(label_sets)))
        return [Prediction(x0, eps) for x0, eps in zip(pred.x0.chunk(len(label_sets)),
                                                       pred.eps.chunk(len(label_sets)))]

    def pair(self, x: torch.Tensor, t, labels: torch.Tensor) -> tuple[Prediction, Prediction]:
        """(unconditional, conditional) predictions in one forward pass: the pair every CFG-like method starts from."""
        uncond, cond = self.predict_many(x, t, [self.null_labels(labels), labels])
        return uncond, cond

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

    def alpha(self, t) -> float:
        """The VP alpha-bar of level t (a discrete model's alphas_cumprod[t]; 1 for the clean data)."""
        level = self.level(t)
        if isinstance(level.t, int) and self.alphas_cumprod is not None:  # a discrete timestep: its table entry
            return 1.0 if level.t < 0 else float(self.alphas_cumprod[level.t])
        return level.snr_alpha

    def x0_from_eps(self, x: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        level = self.level(t)
        return (x - level.noise * eps) / level.alpha

    def eps_from_x0(self, x: torch.Tensor, t, x0: torch.Tensor) -> torch.Tensor:
        level = self.level(t)
        return (x - level.alpha * x0) / level.noise

    def sigma(self, t) -> float:
        """EDM's noise level of level t (sqrt((1 - a_t) / a_t) for a VP timestep)."""
        return self.level(t).sigma

    # -- the parts of the network that hooks act on --

    def parts(self) -> "hooks.Parts":  # noqa: F821 (imported where used: hooks imports diffusers)
        """The hookable parts of the network (diffguide/models/hooks.py's `Parts`: blocks and their self-attention,
        time embeddings, label embeddings), declared by each family; none by default. Every hook (perturbed blocks,
        perturbed time embeddings, replaced null embeddings) takes them from here."""
        from diffguide.models.hooks import Parts

        return Parts()
