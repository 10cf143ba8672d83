"""Parameterisation adapters: what a network outputs, converted to the common prediction (x0 and eps at the current
level, x = alpha x0 + noise eps) and back.

    eps    the noise (DDPM, DiT, the embedded UNet)
    v      v = alpha eps - noise x0 (Salimans & Ho 2022; Stable Diffusion 2)
    x0     the clean data
    edm    EDM's preconditioning (Karras et al. 2022, Table 1): D = c_skip x + c_out F(c_in x, c_noise) with
           c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
           c_noise = ln(sigma) / 4 (the schedule's network time); the network outputs F
    flow   the flow-matching velocity v = eps - x0 on x = (1 - tau) x0 + tau eps (SiT, SD3, Flux)

Both x0 and eps are carried because neither determines the other everywhere: at a flow model's tau = 1 (alpha = 0)
x is pure noise and x0 comes from the network alone. Guidance methods that act on the network's own quantity
(CFG-Zero*'s projection, CFG-rescale's std, adaptive guidance's cosine) ask for it with `output`.
"""

from dataclasses import dataclass

import torch

from diffguide.errors import UserError
from diffguide.models.schedules import Level


@dataclass
class Prediction:
    """The common prediction at one level: the data estimate x0 and the noise eps, x = alpha x0 + noise eps."""

    x0: torch.Tensor
    eps: torch.Tensor

    def where(self, mask: torch.Tensor, other: "Prediction") -> "Prediction":
        return Prediction(torch.where(mask, self.x0, other.x0), torch.where(mask, self.eps, other.eps))

    def cat_channels(self, other: "Prediction", channels: int) -> "Prediction":
        """The first `channels` channels from self, the rest from other."""
        return Prediction(torch.cat([self.x0[:, :channels], other.x0[:, channels:]], 1),
                          torch.cat([self.eps[:, :channels], other.eps[:, channels:]], 1))


class Parameterisation:
    name = "eps"

    def network_input(self, x: torch.Tensor, level: Level) -> torch.Tensor:
        return x

    def prediction(self, out: torch.Tensor, x: torch.Tensor, level: Level) -> Prediction:
        return Prediction((x - level.noise * out) / level.alpha, out)

    def output(self, pred: Prediction, x: torch.Tensor, level: Level) -> torch.Tensor:
        return pred.eps


class VPrediction(Parameterisation):
    name = "v"

    def prediction(self, out, x, level):
        a, s = level.alpha, level.noise
        norm2 = a * a + s * s
        return Prediction((a * x - s * out) / norm2, (s * x + a * out) / norm2)

    def output(self, pred, x, level):
        return level.alpha * pred.eps - level.noise * pred.x0


class X0Prediction(Parameterisation):
    name = "x0"

    def prediction(self, out, x, level):
        return Prediction(out, (x - level.alpha * out) / level.noise)

    def output(self, pred, x, level):
        return pred.x0


class EDMPreconditioning(Parameterisation):
    name = "edm"

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = float(sigma_data)

    def _c(self, sigma: float) -> tuple[float, float, float]:
        sd2, s2 = self.sigma_data ** 2, sigma ** 2
        return sd2 / (s2 + sd2), sigma * self.sigma_data / (s2 + sd2) ** 0.5, 1 / (s2 + sd2) ** 0.5

    def network_input(self, x, level):
        return x * self._c(level.sigma)[2]

    def prediction(self, out, x, level):
        c_skip, c_out, _ = self._c(level.sigma)
        x0 = c_skip * x + c_out * out
        return Prediction(x0, (x - x0) / level.sigma)

    def output(self, pred, x, level):
        c_skip, c_out, _ = self._c(level.sigma)
        return (pred.x0 - c_skip * x) / c_out


class FlowVelocity(Parameterisation):
    name = "flow"

    def prediction(self, out, x, level):
        return Prediction(x - level.noise * out, x + level.alpha * out)

    def output(self, pred, x, level):
        return pred.eps - pred.x0


PARAMETERISATIONS = {p.name: p for p in (Parameterisation, VPrediction, X0Prediction, EDMPreconditioning, FlowVelocity)}


def make(name: str, **kwargs) -> Parameterisation:
    if name not in PARAMETERISATIONS:
        raise UserError(f"model.parameterisation={name!r} is not one of {', '.join(PARAMETERISATIONS)}")
    return PARAMETERISATIONS[name](**kwargs)
