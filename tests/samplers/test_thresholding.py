"""Dynamic thresholding (Saharia et al. 2022, Imagen, Sec. 2.3) as a sampler key: s = the p-quantile of |x0| per
sample, s = max(s, 1), x0 = clamp(x0, -s, s) / s, in place of the static clip; by hand, against diffusers'
_threshold_sample and DDIMScheduler, through every sampler, with CFG and CFG++, and its refusals."""

import hydra
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from omegaconf import OmegaConf

from diffguide.command.checks import check_point
from diffguide.command.config import CONF_DIR
from diffguide.errors import UserError
from diffguide.guidance.base import GuidedPrediction
from diffguide.guidance.cfg import CFG
from diffguide.guidance.cfgpp import CFGPlusPlus
from diffguide.guidance.none import NoGuidance
from diffguide.models import gmm
from diffguide.models.schedules import CLEAN
from diffguide.samplers.base import dynamic_threshold
from diffguide.samplers.ddim import DDIM
from diffguide.samplers.ddpm import DDPM
from diffguide.samplers.dpmpp_2m import DPMSolverPP2M
from diffguide.samplers.euler import Euler

SAMPLER_YAMLS = sorted(p.stem for p in (CONF_DIR / "sampler").glob("*.yaml"))


@pytest.fixture
def pixel_mixture():
    """Image-shaped classes in [-0.7, 0.7], given the pixel models' data range [-1, 1]."""
    model = gmm.image(num_classes=3, shape=(1, 4, 4), std=0.3)
    model.data_range = (-1.0, 1.0)
    return model


def test_by_hand_on_two_samples():
    """p = 0.5 over 4 values: the linear-interpolated quantile at position 0.5 * 3 = 1.5 of the sorted |x0|.
    Sample 0: |x0| sorted 0.5, 1, 2, 3 -> s = 1.5: clamp to [-1.5, 1.5], / 1.5. Sample 1: 0.1 .. 0.4 -> s = 0.25,
    raised to 1: unchanged (inside [-1, 1]). p = 1: s = max |x0| (3 and 1)."""
    x0 = torch.tensor([[[[0.5, -3.0], [2.0, 1.0]]], [[[0.2, -0.4], [0.1, 0.3]]]])
    got = dynamic_threshold(x0, 0.5, (-1.0, 1.0))
    assert torch.allclose(got[0], torch.tensor([[[0.5 / 1.5, -1.0], [1.0, 1.0 / 1.5]]]))
    assert torch.equal(got[1], x0[1])
    full = dynamic_threshold(x0, 1.0, (-1.0, 1.0))
    assert torch.allclose(full[0], x0[0] / 3.0) and torch.equal(full[1], x0[1])


def test_by_hand_through_finalize_keeps_eps_consistent_and_the_offset_uncut(toy):
    """The sampler's _finalize: the thresholded x0 (p = 0.5, as above), eps re-derived from it at x_t as the static
    clip does, and the guidance's x0_offset added after (the thresholding never cuts it)."""
    toy.data_range = (-1.0, 1.0)
    x0 = torch.tensor([[[[0.5, -3.0], [2.0, 1.0]]], [[[0.2, -0.4], [0.1, 0.3]]]])
    x, t = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0)), toy.level(500)
    pred = GuidedPrediction(x0, toy.eps_from_x0(x, t, x0), nfe=1)
    out = DDIM(5, dynamic_threshold=0.5)._finalize(toy, x, t, toy.level(300), pred)
    expected = torch.cat([torch.tensor([[[[0.5 / 1.5, -1.0], [1.0, 1.0 / 1.5]]]]), x0[1:]])
    assert torch.allclose(out.x0, expected)
    assert torch.allclose(out.eps, (x - t.alpha * expected) / t.noise) and out.consistent
    offset = torch.full_like(x0, 5.0)
    moved = DDIM(5, dynamic_threshold=0.5)._finalize(toy, x, t, toy.level(300),
                                                     GuidedPrediction(x0, pred.eps, 1, x0_offset=offset))
    assert torch.allclose(moved.x0, expected + 5.0)
    unclipped = DDIM(5, dynamic_threshold=0.5)._finalize(toy, x, t, toy.level(300),
                                                         GuidedPrediction(x0, pred.eps, 1, clip=False))
    assert torch.equal(unclipped.x0, x0) and torch.equal(unclipped.eps, pred.eps)


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("p", [0.5, 0.9, 0.995, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_equals_diffusers_threshold_sample(scheduler_class, p, dtype):
    """Mapping: thresholding=True, dynamic_thresholding_ratio = p, sample_max_value = a bound above every s (Imagen's
    rule has no upper bound; diffusers caps s at sample_max_value). Its default sample_max_value = 1.0 is the static
    clip to [-1, 1] (its comment, scheduling_ddpm.py:452), shown last."""
    x0 = (torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.5).to(dtype)
    x0[1] *= 0.2  # one sample inside [-1, 1]: s raised to 1
    scheduler = scheduler_class(thresholding=True, dynamic_thresholding_ratio=p, sample_max_value=1e6)
    ours = dynamic_threshold(x0, p, (-1.0, 1.0))
    assert ours.dtype == dtype
    assert torch.equal(ours, scheduler._threshold_sample(x0))
    capped = scheduler_class(thresholding=True, dynamic_thresholding_ratio=p, sample_max_value=1.0)
    assert torch.equal(capped._threshold_sample(x0), x0.clamp(-1, 1))


def test_ddim_trajectory_equals_diffusers_with_thresholding(pixel_mixture):
    """20 DDIM steps under CFG at w = 4 (which pushes x0 past [-1, 1]) against DDIMScheduler(thresholding=True) fed
    the same guided eps, with use_clipped_model_output (its eps re-derived from the thresholded x0, as ours)."""
    x_T = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.5
    labels = torch.tensor([0, 1, 2] * 2)
    ours, _ = DDIM(20, dynamic_threshold=0.9).sample(pixel_mixture, CFG(4.0), x_T, labels)
    static, _ = DDIM(20).sample(pixel_mixture, CFG(4.0), x_T, labels)
    scheduler = DDIMScheduler.from_config(pixel_mixture.scheduler_config, timestep_spacing="trailing",
                                          thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1e6,
                                          set_alpha_to_one=True)
    scheduler.set_timesteps(20)
    x, null = x_T, pixel_mixture.null_labels(labels)
    for t in scheduler.timesteps:
        eps_c, eps_u = pixel_mixture.predict(x, int(t), labels).eps, pixel_mixture.predict(x, int(t), null).eps
        x = scheduler.step(eps_u + 4.0 * (eps_c - eps_u), t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()
    assert not torch.allclose(ours, static, atol=1e-2)  # the thresholding acted


def _static_ddim_by_hand(model, guidance, x_T, labels, steps):
    """The DDIM (eta = 0) loop with the static clip, written out: what the sampler did before the key existed."""
    sampler = DDIM(steps)
    levels = sampler.levels(model)
    guidance.begin(model, labels, levels)
    x = x_T
    for i, t in enumerate(levels):
        t_next = levels[i + 1] if i + 1 < len(levels) else CLEAN
        pred = guidance(model, x, t, labels)
        x0 = pred.x0.clamp(*model.data_range)
        eps = (x - t.alpha * x0) / t.noise if pred.consistent else pred.eps
        x = t_next.alpha * x0 + max(t_next.noise ** 2 - 0.0, 0.0) ** 0.5 * eps
    return x


@pytest.mark.parametrize("make", [lambda: CFG(4.0), lambda: CFGPlusPlus(0.6)])
def test_null_key_is_bit_identical_to_the_static_clip(pixel_mixture, make):
    x_T = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * 1.5
    labels = torch.tensor([0, 1, 2] * 2)
    ours, _ = DDIM(12, dynamic_threshold=None).sample(pixel_mixture, make(), x_T, labels)
    default, _ = DDIM(12).sample(pixel_mixture, make(), x_T, labels)
    assert torch.equal(ours, _static_ddim_by_hand(pixel_mixture, make(), x_T, labels, 12))
    assert torch.equal(ours, default)


class _Recording(DDIM):
    """DDIM that keeps each step's finalized prediction."""

    def reset(self):
        self.seen = []

    def step(self, denoiser, x, t, t_next, pred, noise, predict=None):
        self.seen.append((x, t, pred))
        return super().step(denoiser, x, t, t_next, pred, noise, predict)


def test_with_cfg_every_x0_is_in_range_and_eps_consistent(pixel_mixture):
    """CFG at w = 8 pushes x0 outside [-1, 1]; each step's x0 is thresholded (within [-1, 1], and not merely the
    static clip on some step) and eps re-derived from it."""
    x_T = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2] * 2)
    sampler, guidance = _Recording(10, dynamic_threshold=0.8), CFG(8.0)
    sampler.sample(pixel_mixture, guidance, x_T, labels)
    rescaled = 0
    for x, t, pred in sampler.seen:
        assert pred.x0.abs().max() <= 1.0
        assert torch.allclose(pred.eps, (x - t.alpha * pred.x0) / t.noise, atol=1e-5)
        raw = guidance(pixel_mixture, x, t, labels).x0
        rescaled += int(not torch.allclose(pred.x0, raw.clamp(-1, 1)))
    assert rescaled > 0


def test_with_cfgpp_the_guided_x0_is_thresholded_and_eps_u_kept(pixel_mixture):
    """CFG++'s eps is not the one consistent with its x0 (it re-noises with eps_u): its x0_lam is thresholded and
    eps_u left as it is, as the static clip leaves it."""
    x_T = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2] * 2)
    sampler, guidance = _Recording(10, dynamic_threshold=0.8), CFGPlusPlus(0.9)
    sampler.sample(pixel_mixture, guidance, x_T, labels)
    for x, t, pred in sampler.seen:
        raw = guidance(pixel_mixture, x, t, labels)
        assert not pred.consistent
        assert torch.equal(pred.eps, raw.eps)
        assert torch.equal(pred.x0, dynamic_threshold(raw.x0, 0.8, (-1.0, 1.0)))


@pytest.mark.parametrize("name", SAMPLER_YAMLS)
def test_every_sampler_config_has_the_key_and_thresholds(pixel_mixture, name):
    node = OmegaConf.load(CONF_DIR / "sampler" / f"{name}.yaml")
    assert "dynamic_threshold" in node and node.dynamic_threshold is None
    node.steps, node.dynamic_threshold = 4, 0.9
    sampler = hydra.utils.instantiate(node)
    assert sampler.dynamic_threshold == 0.9
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    x, _ = sampler.sample(pixel_mixture, CFG(6.0), torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 2]), generators)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("make", [lambda: DDIM(5, dynamic_threshold=0), lambda: DDIM(5, dynamic_threshold=1.5),
                                  lambda: DDIM(5, dynamic_threshold=99.5), lambda: DDPM(5, dynamic_threshold=-0.1),
                                  lambda: Euler(5, dynamic_threshold=True),
                                  lambda: DPMSolverPP2M(5, dynamic_threshold="x"),
                                  lambda: DDIM(5, clip_x0=False, dynamic_threshold=0.995)])
def test_bad_values_refused_in_one_line(make):
    with pytest.raises(UserError) as err:
        make()
    assert "\n" not in str(err.value) and "dynamic_threshold" in str(err.value)


def test_latent_model_refused_in_one_line():
    """A model without a data range (a latent model): Imagen's rule thresholds at the range's bound; diffusers calls
    its thresholding unsuitable for latent-space models (DDPMScheduler's docstring)."""
    latent = gmm.image(num_classes=3)
    assert latent.data_range is None
    with pytest.raises(UserError) as err:
        DDIM(5, dynamic_threshold=0.995).check(latent)
    assert "\n" not in str(err.value) and "data range" in str(err.value)
    DDIM(5).check(latent)  # the key null: as before


def test_the_command_line_refuses_a_non_number_in_one_line():
    with pytest.raises(UserError) as err:
        check_point(["sampler.dynamic_threshold=abc"], multirun=False)
    assert "\n" not in str(err.value) and "sampler.dynamic_threshold" in str(err.value)
