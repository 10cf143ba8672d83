"""FDG (diffguide/guidance/fdg.py): worked by hand, against diffusers 0.42.1's guider, at its limits, and its refusals.

Conventions: every scale here is CFG's w (o_u + w (o_c - o_u); 1 = the conditional model), which is diffusers'
guidance_scale with its default use_original_formulation=False. The ToyDenoiser (tests/helpers.py) is an eps model:
eps(x, t, y) = 0.5 x + 0.1 (y + 1) + t / 1000, y = -1 for the null class, so eps_c - eps_u = 0.1 (y + 1) everywhere.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers.guiders import frequency_decoupled_guidance as diffusers_fdg

from diffguide.errors import UserError
from diffguide.guidance.cfg import CFG
from diffguide.guidance.fdg import FDG, fdg_output, low_band
from diffguide.models import gmm
from tests.helpers import (ToyDenoiser, assert_refused_in_one_line, guidance_config, guider_prediction,
                           network_outputs, without_null_class)


class StripedToy(ToyDenoiser):
    """The toy with 4x4 samples whose conditional eps adds 0.05 (y + 1) s_j, s_j = (-1)^j along the width: then
    eps_c - eps_u = (y + 1) (0.1 + 0.05 s_j), a constant plus a stripe of the highest frequency."""

    def __init__(self):
        super().__init__()
        self.sample_shape = (1, 4, 4)

    def _output(self, x, t, labels):
        y = torch.where(labels == self.null_class, -1, labels).to(x.dtype).view(-1, 1, 1, 1)
        stripe = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=x.dtype)
        return super()._output(x, t, labels) + 0.05 * (y + 1) * stripe


def test_fdg_by_hand_constant_and_stripe_bands():
    """Sadat et al. 2025 (arXiv 2506.19713): CFG at w_low on the low band and at w_high on the high band of a two-level
    Laplacian pyramid (kornia's: blur [1 4 6 4 1]/16 per axis with reflect padding, bilinear halving/doubling).
    By hand: the blur keeps a constant (the kernel sums to 1, reflect padding stays constant) and kills the stripe
    (-1)^j (1 - 4 + 6 - 4 + 1 = 0; reflect padding about the edge pixel continues the alternation), so the constant
    0.1 (y + 1) is all low band and the stripe 0.05 (y + 1) s_j all high band:
        eps = eps_u + w_low 0.1 (y + 1) + w_high 0.05 (y + 1) s_j.
    y = 1, w_high = 6, w_low = 2: eps = eps_u + 0.4 + 0.6 s_j; y = 0: eps_u + 0.2 + 0.3 s_j.
    Swapped (w_high = 2, w_low = 6): y = 1: eps_u + 1.2 + 0.2 s_j; y = 0: eps_u + 0.6 + 0.1 s_j.
    A band at 1 is the conditional prediction's band (w_high = 3, w_low = 1): y = 1: eps_u + 0.2 + 0.3 s_j."""
    model = StripedToy()
    x, labels, t = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([1, 0]), 300
    eps_u = 0.5 * x + t / 1000
    stripe = torch.tensor([1.0, -1.0, 1.0, -1.0])
    expected = eps_u + torch.tensor([0.4, 0.2]).view(2, 1, 1, 1) + torch.tensor([0.6, 0.3]).view(2, 1, 1, 1) * stripe
    guidance = FDG(6.0, scale_low=2.0)
    guidance.check(model)
    pred = guidance(model, x, t, labels)
    assert torch.allclose(pred.eps, expected, atol=1e-6)
    assert torch.allclose(pred.x0, model.x0_from_eps(x, t, expected), atol=1e-5)
    assert pred.nfe == 2 and model.calls == [4]
    # the same numbers with the bands swapped tell the two scales apart
    swapped = eps_u + torch.tensor([1.2, 0.6]).view(2, 1, 1, 1) + torch.tensor([0.2, 0.1]).view(2, 1, 1, 1) * stripe
    assert torch.allclose(FDG(2.0, scale_low=6.0)(model, x, t, labels).eps, swapped, atol=1e-6)
    low_at_one = eps_u + torch.tensor([0.2, 0.1]).view(2, 1, 1, 1) + torch.tensor([0.3, 0.15]).view(2, 1, 1, 1) * stripe
    assert torch.allclose(FDG(3.0, scale_low=1.0)(model, x, t, labels).eps, low_at_one, atol=1e-6)


#: kornia 0.9.0 (kornia/geometry/transform/pyramid.py), run once: for the 6x6 image Y below, build_laplacian_pyramid
#: (Y, 2) reflect-pads it to 8x8 (no side is a power of two); pyrup of its level 1, cropped to 6x6, is this
KORNIA_LOW_BAND_6x6 = [
    [0.456917, 0.465316, 0.476326, 0.466218, 0.432033, 0.391316],
    [0.447793, 0.455768, 0.464987, 0.451114, 0.412259, 0.368212],
    [0.422026, 0.428042, 0.432405, 0.412907, 0.369840, 0.324524],
    [0.384185, 0.385748, 0.383302, 0.365604, 0.334456, 0.303570],
    [0.343800, 0.339159, 0.329342, 0.321379, 0.317199, 0.314120],
    [0.312989, 0.302619, 0.286404, 0.288686, 0.310597, 0.332682]]
#: and its level 1 (4x4, of the padded 8x8 image)
KORNIA_LEVEL1_6x6 = [
    [0.453125, 0.523438, 0.443359, 0.376953],
    [0.398438, 0.476562, 0.256836, 0.183594],
    [0.326172, 0.245117, 0.340820, 0.367188],
    [0.318359, 0.177734, 0.367188, 0.367188]]
Y = torch.tensor([[0.0, 1, 0, 2, 0, 3], [1, 0, 0, 0, 0, 0], [0, 0, 4, 0, 0, 0], [0, 0, 0, 0, 0, 1], [2, 0, 0, 0, 1, 0],
                  [0, 0, 0, 1, 0, 0]]).view(1, 1, 6, 6)


def _blur_reference(x):
    """kornia's pyramid blur written separably: [1 4 6 4 1]/16 along W, then H, reflect padding of 2."""
    k = [1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16]
    for _ in range(2):
        width = x.shape[-1]
        padded = F.pad(x, (2, 2, 0, 0), mode="reflect")
        x = sum(k[i] * padded[..., i:i + width] for i in range(5)).transpose(-1, -2)
    return x


def _double_reference(x):
    """Bilinear doubling with align_corners=False along both axes, written out: output 2i = x[i-1]/4 + 3x[i]/4,
    2i+1 = 3x[i]/4 + x[i+1]/4, with the edge index repeated."""
    for _ in range(2):
        padded = F.pad(x, (1, 1, 0, 0), mode="replicate")
        even = 0.25 * padded[..., :-2] + 0.75 * padded[..., 1:-1]
        odd = 0.75 * padded[..., 1:-1] + 0.25 * padded[..., 2:]
        x = torch.stack([even, odd], dim=-1).flatten(-2).transpose(-1, -2)
    return x


def pyrup_reference(x):
    return _blur_reference(_double_reference(x))


def laplacian_pyramid_reference(x, levels):
    """kornia's build_laplacian_pyramid for 2 levels, written independently of diffguide.guidance.fdg: reflect
    padding to the next powers of two when no side is one or a side is odd; level 1 = the 2x2 average (bilinear
    halving of an even side) of the blurred image; level 0 = image - pyrup(level 1)."""
    assert levels == 2
    h, w = x.shape[-2:]
    pow2 = lambda n: n & (n - 1) == 0  # noqa: E731
    if not (pow2(h) or pow2(w)) or h % 2 or w % 2:
        x = F.pad(x, (0, (1 << (w - 1).bit_length()) - w, 0, (1 << (h - 1).bit_length()) - h), mode="reflect")
    level1 = F.avg_pool2d(_blur_reference(x), 2)
    return [x - pyrup_reference(level1), level1]


def test_pyramid_is_kornias():
    """diffguide's low band and this file's reference pyramid against numbers kornia 0.9.0 gives (KORNIA_* above),
    on an image that kornia pads (6x6 -> 8x8) and whose result is cropped back."""
    level0, level1 = laplacian_pyramid_reference(Y, 2)
    assert level0.shape[-2:] == (8, 8)
    assert torch.allclose(level1[0, 0], torch.tensor(KORNIA_LEVEL1_6x6), atol=1e-6)
    assert torch.allclose(pyrup_reference(level1)[0, 0, :6, :6], torch.tensor(KORNIA_LOW_BAND_6x6), atol=1e-6)
    assert torch.allclose(low_band(Y)[0, 0], torch.tensor(KORNIA_LOW_BAND_6x6), atol=1e-6)


@pytest.fixture
def fdg_guider_class(monkeypatch):
    """diffusers' FrequencyDecoupledGuidance needs kornia, which is not a dependency: where kornia is missing, its
    two kornia functions are replaced by this file's reference (pinned to kornia's numbers by
    test_pyramid_is_kornias); with kornia installed the guider runs as shipped."""
    try:
        import kornia  # noqa: F401
    except ImportError:
        monkeypatch.setattr(diffusers_fdg, "_CAN_USE_KORNIA", True)
        monkeypatch.setattr(diffusers_fdg, "build_laplacian_pyramid_func", laplacian_pyramid_reference)
        monkeypatch.setattr(diffusers_fdg, "upsample_and_blur_func", pyrup_reference)
    return diffusers_fdg.FrequencyDecoupledGuidance


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
@pytest.mark.parametrize("w_high, w_low", [(10.0, 5.0), (3.0, 0.5), (1.5, 4.0)])
def test_fdg_equals_diffusers_guider(fdg_guider_class, shape, w_high, w_low):
    """diffusers 0.42.1 guiders/frequency_decoupled_guidance.py:241-288 (`forward`): guidance_scales = [w_high, w_low]
    (highest frequency first), use_original_formulation=False, parallel_weights=None (no projection),
    guidance_rescale=0. On 28x28 (padded to 32x32 by the pyramid) diffusers returns the padded 32x32 prediction:
    ours is its top-left 28x28. No band scale is exactly 1 here: for such a band diffusers appends
    `pred_cond_freq` (lines 276-278) without assigning it at that level, the previous level's tensor (a shape error)
    or none at all (UnboundLocalError) -- test_fdg_by_hand_constant_and_stripe_bands covers a band at 1."""
    model = gmm.image(num_classes=3, shape=shape)
    x, labels, t = torch.randn(3, *shape, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 2]), 500
    cond, uncond = network_outputs(model, x, t, labels)
    ours = FDG(w_high, scale_low=w_low)(model, x, t, labels).eps
    theirs = guider_prediction(fdg_guider_class(guidance_scales=[w_high, w_low]), cond, uncond)
    assert theirs.shape[-1] == (32 if shape[-1] == 28 else shape[-1])
    assert torch.allclose(ours, theirs[..., :shape[-2], :shape[-1]], atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (2, 5, 7)])
def test_fdg_with_equal_band_scales_is_cfg(shape):
    """w_high = w_low = w: collapse(L_0[o_u] + w L_0[d], L_1[o_u] + w L_1[d]) = o_u + w d exactly (the pyramid is
    linear and collapses to the image), padded or not."""
    model = gmm.image(num_classes=3, shape=shape)
    x, labels = torch.randn(2, *shape, generator=torch.Generator().manual_seed(4)), torch.tensor([2, 1])
    assert torch.allclose(FDG(3.0, scale_low=3.0)(model, x, 500, labels).eps, CFG(3.0)(model, x, 500, labels).eps,
                          atol=1e-6)
    cond, uncond = network_outputs(model, x, 500, labels)
    assert torch.allclose(low_band(cond - uncond) + (cond - uncond - low_band(cond - uncond)), cond - uncond)
    assert not torch.allclose(fdg_output(cond, uncond, 3.0, 1.0), CFG(3.0)(model, x, 500, labels).eps, atol=1e-3)


def test_fdg_at_ones_is_conditional_and_both_bands_follow_the_schedule(toy):
    """Both scales 1: the conditional model, one evaluation. schedule=linear (diffguide/guidance/weights.py:
    w_t = 1 + (w - 1) 2p): at the first of 3 levels both bands are 1 (one evaluation); at the last both are
    2 w - 1: w_high 4 -> 7, w_low 2 -> 3."""
    model = StripedToy()
    x, labels = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 2])
    pred = FDG(1.0, scale_low=1.0)(model, x, 500, labels)
    assert torch.allclose(pred.eps, model.predict(x, 500, labels).eps) and pred.nfe == 1
    guidance = FDG(4.0, scale_low=2.0, schedule="linear")
    guidance.begin(model, labels, [900, 500, 100])
    first = guidance(model, x, 900, labels)
    assert torch.allclose(first.eps, model.predict(x, 900, labels).eps) and first.nfe == 1
    assert guidance.band_weights(model, 500) == pytest.approx((4.0, 2.0))
    last = guidance(model, x, 100, labels)
    assert torch.allclose(last.eps, FDG(7.0, scale_low=3.0)(model, x, 100, labels).eps, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: FDG(float("inf")), lambda: FDG(4.0, scale_low=float("nan")), lambda: FDG(4.0, scale_low=True),
    lambda: FDG(4.0, scale_low="2")])
def test_bad_settings_are_refused_in_one_line(make):
    assert_refused_in_one_line(make, "")


def test_models_it_cannot_guide_are_refused_in_one_line(toy):
    """FDG needs (C, H, W) samples with sides >= 3 (the toy's are 2x2; the ring mixture's are 2-vectors) and a null
    class."""
    for model in (toy, gmm.ring()):
        with pytest.raises(UserError, match="guidance=fdg") as err:
            FDG(4.0).check(model)
        assert "\n" not in str(err.value)
    assert_refused_in_one_line(lambda: FDG(4.0).check(without_null_class()), "null class")
    FDG(4.0).check(gmm.image(num_classes=3, shape=(1, 28, 28)))  # 28x28 is fine (padded to 32x32 and cropped)


def test_config_and_its_defaults():
    """conf/guidance/fdg.yaml: w_high = 4, w_low = 2 (cfg.yaml's w, and the paper's SDXL ratio w_high / w_low =
    10 / 5); the global `scale` sets w_high."""
    made = guidance_config("fdg")
    assert isinstance(made, FDG) and (made.scale, made.scale_low) == (4.0, 2.0) and made.schedule is None
