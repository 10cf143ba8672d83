"""Frequency-decoupled guidance (Sadat et al. 2025, "Guidance in the Frequency Domain Enables High-Fidelity Sampling
at Low CFG Scales", arXiv 2506.19713).

A two-level Laplacian pyramid splits each prediction into a high band L_0 = G_0 - up(G_1) and a low band L_1 = G_1
(G_0 the image, G_1 = down(G_0)); CFG runs in each band with its own scale and the pyramid is collapsed again:
    o = collapse(L_0[o_u] + w_high L_0[o_c - o_u],  L_1[o_u] + w_low L_1[o_c - o_u])
      = o_u + w_high d + (w_low - w_high) up(down(d)),        d = o_c - o_u,
the second line because the pyramid is linear and collapse(L_0, L_1) = L_0 + up(L_1) gives the image back exactly.
The code uses the second line (one low-pass of d, not two pyramids); it is the same rule to rounding. Scales in
CFG's convention (1: the conditional model in that band); w_high = w_low = w is CFG at w. The rule is linear in the
predictions, so it is the same on eps, x0, v or a velocity; it runs on the network's own output as combine.combine.

scale = w_high (the high-frequency band: detail; the paper raises it above the CFG scale), scale_low = w_low (the
low-frequency band: global structure and colour, where a high scale costs diversity and saturates; the paper keeps
it low). The paper's SDXL setting is w_low = 5, w_high = 10 (its Table 8, as diffusers' docstring quotes it).

The pyramid is kornia's (0.9.0, kornia/geometry/transform/pyramid.py), written here in torch (kornia is not a
dependency): down = the 5x5 binomial blur [1 4 6 4 1]^T [1 4 6 4 1] / 256 with reflect padding, then bilinear
resizing to floor(H/2) x floor(W/2) (align_corners=False); up = bilinear resizing to 2H x 2W, then the same blur.
Like kornia's build_laplacian_pyramid, an image with no side a power of two, or an odd side, is first reflect-padded
at the bottom/right to the next powers of two; the result is cropped back to the image (diffusers returns the padded
size: a 28x28 prediction comes back 32x32).

diffusers' FrequencyDecoupledGuidance (diffusers 0.42.1, guiders/frequency_decoupled_guidance.py, `forward`, lines
241-288: build_laplacian_pyramid of pred_cond and pred_uncond with len(guidance_scales) levels, pred_uncond_freq +
guidance_scale * shift per level, build_image_from_pyramid) gives the same prediction with
guidance_scales = [w_high, w_low] (listed from the high band down), its defaults parallel_weights = None (no
projection of the shift), use_original_formulation = False (True: pred_cond + w shift per band, each w shifted by
one) and guidance_rescale = 0, on an image whose sides need no padding (otherwise: ours is its output cropped).
It needs kornia, and it breaks when exactly one band's scale is 1 (its branch for a band it does not guide, lines
276-278, appends `pred_cond_freq` without assigning it at that level: the previous level's tensor, a shape error,
or UnboundLocalError at level 0); here such a band is simply the conditional prediction's. The APG-style
projection of each band's shift onto its conditional prediction (diffusers' `parallel_weights`, from the paper's
Algorithm 2 as diffusers cites it) is not implemented: the default, weight 1, is no projection.

schedule: both scales follow it (diffguide/guidance/weights.py; neutral 1 in each band): w_high,t and w_low,t are the
schedule's weights of scale and scale_low at the step; where both are 1 the step is the conditional prediction alone
(one evaluation).
"""

import math

import torch
import torch.nn.functional as F

from diffguide.errors import UserError
from diffguide.guidance.base import CFGLike, GuidedPrediction

#: kornia's _get_pyramid_gaussian_kernel: the 5x5 binomial kernel, the outer product of [1 4 6 4 1] / 16 with itself
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
PYRAMID_KERNEL = torch.outer(_BINOMIAL, _BINOMIAL) / 256.0


def _blur(x: torch.Tensor) -> torch.Tensor:
    """kornia's filter2d(x, PYRAMID_KERNEL, 'reflect'): per-channel correlation, reflect padding of 2."""
    channels = x.shape[1]
    kernel = PYRAMID_KERNEL.to(device=x.device, dtype=x.dtype).expand(channels, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=channels)


def pyrdown(x: torch.Tensor) -> torch.Tensor:
    """kornia.geometry.transform.pyrdown: blur, then bilinear resizing to floor(H/2) x floor(W/2)."""
    height, width = x.shape[-2:]
    return F.interpolate(_blur(x), size=(height // 2, width // 2), mode="bilinear", align_corners=False)


def pyrup(x: torch.Tensor) -> torch.Tensor:
    """kornia.geometry.transform.pyrup: bilinear resizing to 2H x 2W, then blur."""
    height, width = x.shape[-2:]
    return _blur(F.interpolate(x, size=(2 * height, 2 * width), mode="bilinear", align_corners=False))


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def pyramid_padding(height: int, width: int) -> tuple[int, int]:
    """(bottom, right) padding kornia's build_laplacian_pyramid(max_level=2) applies: up to the next powers of two when
    neither side is a power of two or a side is odd; (0, 0) otherwise."""
    power = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    if not (power(height) or power(width)) or height % 2 or width % 2:
        return _next_power_of_two(height) - height, _next_power_of_two(width) - width
    return 0, 0


def low_band(d: torch.Tensor) -> torch.Tensor:
    """up(down(d)): the low-frequency part of d, collapsed to d's resolution (d = this + the high band), computed on
    the padded image as kornia's pyramid does and cropped back to d's size. d: (batch, C, H, W)."""
    height, width = d.shape[-2:]
    bottom, right = pyramid_padding(height, width)
    padded = F.pad(d, (0, right, 0, bottom), mode="reflect") if bottom or right else d
    return pyrup(pyrdown(padded))[..., :height, :width]


def fdg_output(out_cond: torch.Tensor, out_uncond: torch.Tensor, scale_high, scale_low) -> torch.Tensor:
    """o_u + w_high d + (w_low - w_high) up(down(d)), d = o_c - o_u: CFG at w_high in the high band and at w_low in
    the low band of a two-level Laplacian pyramid."""
    d = out_cond - out_uncond
    out = out_uncond + scale_high * d
    if scale_low != scale_high:
        out = out + (scale_low - scale_high) * low_band(d)
    return out


def _band_scale(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"guidance=fdg needs a finite scale_low (the low-frequency band's w; got {value!r})")
    return float(value)


class FDG(CFGLike):
    name = "fdg"

    #: the smallest side the pyramid takes: each blurred image (the padded image and the doubled low band) needs a
    #: side of at least 3 for the reflect padding of 2, and a side of 3 is padded to 4
    MIN_SIDE = 3

    def __init__(self, scale: float, scale_low: float = 2.0, schedule=None):
        super().__init__(scale, schedule)
        self.scale_low = _band_scale(scale_low)

    def check(self, denoiser):
        super().check(denoiser)
        shape = tuple(denoiser.sample_shape)
        if len(shape) != 3 or min(shape[1:]) < self.MIN_SIDE:
            raise UserError(f"guidance=fdg splits images into frequency bands (a Laplacian pyramid) and needs samples "
                            f"of shape (C, H, W) with H, W >= {self.MIN_SIDE}; model {type(denoiser).__name__} has "
                            f"samples of shape {shape}")

    def band_weights(self, denoiser, t) -> tuple[float, float]:
        """(w_high, w_low) at level t: the scales, or the schedule's weights of each at t."""
        if self.schedule is None:
            return self.scale, self.scale_low
        return self.weight(denoiser, t), self.schedule.weight(self.scale_low, denoiser.level(t), self.levels)

    def __call__(self, denoiser, x, t, labels):
        w_high, w_low = self.band_weights(denoiser, t)
        if w_high == 1.0 and w_low == 1.0:
            return GuidedPrediction.of(denoiser.predict(x, t, labels), nfe=1)
        uncond, cond = denoiser.pair(x, t, labels)
        out = fdg_output(denoiser.output(cond, x, t), denoiser.output(uncond, x, t), w_high, w_low)
        return GuidedPrediction.of(denoiser.from_output(out, x, t), nfe=2)
