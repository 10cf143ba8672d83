"""Each sampler's update rule against the diffusers scheduler it follows, and against the exact mixture."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from diffguide.errors import UserError
from diffguide.guidance.none import NoGuidance
from diffguide.models import gmm
from diffguide.samplers.ddim import DDIM
from diffguide.samplers.ddpm import DDPM
from diffguide.samplers.dpmpp_2m import DPMSolverPP2M


@pytest.fixture
def mixture():
    return gmm.image(num_classes=3, shape=(1, 4, 4), std=0.3)


def _diffusers_loop(scheduler, model, x, labels, steps, **step_kwargs):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        eps = model(x, int(t), labels)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_matches_diffusers(mixture, spacing, clip):
    x_T, labels = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.5, torch.tensor([0, 1, 2] * 2)
    mixture.data_range = (-0.4, 0.4) if clip else None  # a tight range, so that clipping really acts
    ours, nfe = DDIM(20, spacing=spacing, clip_x0=clip).sample(mixture, NoGuidance(), x_T, labels)
    scheduler = DDIMScheduler.from_config(mixture.scheduler_config, timestep_spacing=spacing, clip_sample=clip,
                                          clip_sample_range=0.4, set_alpha_to_one=True)
    theirs = _diffusers_loop(scheduler, mixture, x_T, labels, 20, eta=0.0, use_clipped_model_output=True)
    assert nfe == 20
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_ddpm_matches_diffusers_including_noise(mixture):
    """One sample, one generator: our per-sample noise stream is then diffusers' own stream."""
    labels = torch.tensor([1])
    g_ours, g_theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x_ours = torch.randn((1, 1, 4, 4), generator=g_ours)
    x_theirs = torch.randn((1, 1, 4, 4), generator=g_theirs)
    ours, _ = DDPM(25, clip_x0=False).sample(mixture, NoGuidance(), x_ours, labels, generators=[g_ours])
    scheduler = DDPMScheduler.from_config(mixture.scheduler_config, timestep_spacing="trailing", clip_sample=False)
    theirs = _diffusers_loop(scheduler, mixture, x_theirs, labels, 25, generator=g_theirs)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


@pytest.mark.parametrize("steps", [8, 20])
def test_dpmpp_2m_matches_diffusers(mixture, steps):
    x_T, labels = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2] * 2)
    ours, nfe = DPMSolverPP2M(steps, clip_x0=False).sample(mixture, NoGuidance(), x_T, labels)
    scheduler = DPMSolverMultistepScheduler.from_config(mixture.scheduler_config, algorithm_type="dpmsolver++",
                                                        solver_order=2, timestep_spacing="linspace",
                                                        final_sigmas_type="zero")
    theirs = _diffusers_loop(scheduler, mixture, x_T, labels, steps)
    assert nfe == steps
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_deterministic_sampler_reproduces_the_mixture():
    """DDIM on the exact denoiser, 1000 steps: class means and spread of the mixture within sampling error."""
    model = gmm.ring(num_classes=4, radius=2.0, std=0.3)
    n = 4000
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % 4
    x, _ = DDIM(1000, clip_x0=False).sample(model, NoGuidance(), x_T, labels)
    x = x.double()
    for k in range(4):
        sel = x[labels == k]
        assert torch.allclose(sel.mean(0), model.means[k], atol=4 * 0.3 / len(sel) ** 0.5)
    # Spread pooled over classes and axes (8000 values: standard error of the std 0.3 / sqrt(16000) = 0.0024).
    centred = x - model.means[labels]
    assert abs(centred.std().item() - 0.3) < 0.01
    # and no correlation between the axes
    assert abs(torch.corrcoef(centred.T)[0, 1].item()) < 0.05


def test_ancestral_sampler_reproduces_class_weights_unconditionally():
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    model = gmm.ring(num_classes=4, radius=2.0, std=0.3, weights=weights)
    n = 2000
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    x_T = torch.stack([torch.randn(2, generator=g) for g in generators])
    x, _ = DDPM(100, clip_x0=False).sample(model, NoGuidance(conditional=False), x_T,
                                           torch.zeros(n, dtype=torch.long), generators)
    nearest = torch.cdist(x.double(), model.means).argmin(1)
    share = torch.bincount(nearest, minlength=4).double() / n
    assert torch.allclose(share, weights.double(), atol=4 * (0.25 / n) ** 0.5)


def test_sampler_config_errors(mixture):
    with pytest.raises(UserError, match="steps"):
        DDIM(0)
    with pytest.raises(UserError, match="spacing"):
        DDIM(10, spacing="sideways")
    with pytest.raises(UserError, match="exceeds"):
        DDIM(1001).check(mixture)
