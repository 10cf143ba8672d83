"""Each sampler's update rule against the diffusers scheduler it follows, and against the exact mixture."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from diffguide.errors import UserError
from diffguide.guidance.adaptive import AdaptiveGuidance
from diffguide.guidance.apg import APG
from diffguide.guidance.base import GuidedPrediction
from diffguide.guidance.cfg import CFG
from diffguide.guidance.cfg_interval import CFGInterval
from diffguide.guidance.cfg_rescale import CFGRescale
from diffguide.guidance.cfg_zero_star import CFGZeroStar
from diffguide.guidance.cfgpp import CFGPlusPlus
from diffguide.guidance.none import NoGuidance
from diffguide.models import gmm
from diffguide.samplers.ddim import DDIM
from diffguide.samplers.ddpm import DDPM
from diffguide.samplers.dpmpp_2m import DPMSolverPP2M
from tests.helpers import ToyDenoiser, learned_variance_step


@pytest.fixture
def mixture():
    return gmm.image(num_classes=3, shape=(1, 4, 4), std=0.3)


def _diffusers_loop(scheduler, model, x, labels, steps, **step_kwargs):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        eps = model.predict(x, int(t), labels).eps
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


class LearnedVarianceToy(ToyDenoiser):
    """ToyDenoiser that also outputs a variance channel per eps channel: v = -1 for the null class (frac 0: the
    posterior variance) and 0.5 for a class (frac 0.75), so a test can tell whose variance the sampler took."""

    learned_variance = True

    def _output(self, x, t, labels):
        v = torch.where(labels == self.null_class, -1.0, 0.5).to(x.dtype).view(-1, 1, 1, 1).expand_as(x)
        return torch.cat([super()._output(x, t, labels), v], 1)


class RecordingDDPM(DDPM):
    def update(self, denoiser, x, t, t_next, pred, noise, predict=None):
        self.seen = getattr(self, "seen", []) + [(t.t, t_next.t, pred.log_variance)]
        return super().update(denoiser, x, t, t_next, pred, noise)


def _run_learned(guidance, steps=4, batch=3):
    toy = LearnedVarianceToy()
    generators = [torch.Generator().manual_seed(i) for i in range(batch)]
    x_T = torch.stack([torch.randn(1, 2, 2, generator=g) for g in generators])
    sampler = RecordingDDPM(steps, clip_x0=False, variance="learned")
    sampler.check(toy)
    x, nfe = sampler.sample(toy, guidance, x_T, torch.arange(batch) % 3, generators)
    return toy, sampler, x, nfe


@pytest.mark.parametrize("guidance, frac", [(CFG(2.0), 0.75), (NoGuidance(), 0.75),
                                            (NoGuidance(conditional=False), 0.0)])
def test_learned_variance_is_the_conditional_predictions_without_extra_forwards(guidance, frac):
    """DiT's forward_with_cfg (models.py) returns `torch.cat([eps, rest], dim=1)` with `rest` the conditional half's
    variance channels; the unconditional model alone gives its own. Today's DDPM has no `variance` argument."""
    toy, sampler, _, nfe = _run_learned(guidance)
    assert len(toy.calls) == 4 and nfe == (2 if isinstance(guidance, CFG) else 1) * 4  # one forward per step
    timesteps = sampler.timesteps(toy)
    for (t, t_next, log_var), i in zip(sampler.seen, range(4)):
        beta = 1 - toy.alpha(t) / toy.alpha(t_next)
        # the last step's posterior variance (0) is clipped to the previous step's, as guided-diffusion's log is
        posterior = sampler.posterior_variance(toy, t, t_next) if t_next >= 0 else \
            sampler.posterior_variance(toy, timesteps[-2], t)
        expected = frac * math.log(beta) + (1 - frac) * math.log(posterior)
        assert torch.allclose(log_var, torch.full_like(log_var, expected), atol=1e-6), (i, t)


@pytest.mark.parametrize("make", [lambda: CFGRescale(2.0), lambda: CFGPlusPlus(0.6), lambda: APG(2.0),
                                  lambda: CFGInterval(2.0), lambda: CFGZeroStar(2.0, zero_init_steps=0)])
def test_learned_variance_with_the_cfg_family(make):
    _, sampler, x, _ = _run_learned(make())
    assert torch.isfinite(x).all() and all(torch.allclose(v, v.flatten()[0]) for _, _, v in sampler.seen)


@pytest.mark.parametrize("make", [lambda: CFGZeroStar(2.0), lambda: AdaptiveGuidance(2.0, gamma=-1.0)])
def test_learned_variance_refuses_a_step_without_a_whole_batch_forward_in_one_line(make):
    guidance = make()
    with pytest.raises(UserError, match=f"guidance={guidance.name} gives no whole-batch forward") as err:
        _run_learned(guidance)
    assert "\n" not in str(err.value) and "works with guidance=none, cfg" in str(err.value)


def test_learned_variance_needs_a_model_with_variance_channels(mixture, toy):
    """Today's DDPM(steps, spacing, clip_x0) takes no `variance`."""
    with pytest.raises(UserError, match="sampler.variance=learned needs a model that predicts its variance") as err:
        DDPM(10, variance="learned").check(toy)
    assert "\n" not in str(err.value)
    DDPM(10, variance="learned").check(LearnedVarianceToy())
    with pytest.raises(UserError, match="sampler.variance='learnt' is not one of fixed_small, learned"):
        DDPM(10, variance="learnt")


def test_learned_variance_is_refused_before_sampling_on_the_fmnist_unet(run_diffguide, tmp_path):
    with pytest.raises(UserError, match="sampler.variance=learned needs a model that predicts its variance"):
        run_diffguide(tmp_path / "run", "sampler=ddpm", "sampler.variance=learned")
    assert not (tmp_path / "run" / "samples").exists() or not any((tmp_path / "run" / "samples").iterdir())


def test_classifier_guidance_moves_the_mean_by_the_learned_variance():
    """guided-diffusion's condition_mean: `new_mean = p_mean_var["mean"].float() + p_mean_var["variance"] *
    gradient.float()`, where `variance` is the model's (learned_range: exp of the interpolated log), and
    `sample = out["mean"] + nonzero_mask * th.exp(0.5 * out["log_variance"]) * noise`."""
    from diffguide.classifiers.base import Classifier
    from diffguide.guidance.classifier import ClassifierGuidance

    class Linear(Classifier):
        num_classes = 3

        def log_prob(self, x, t):
            return torch.log_softmax(torch.stack([x.flatten(1).sum(1) * k for k in range(3)], 1), 1)

    toy, classifier, s = LearnedVarianceToy(), Linear(), 2.0
    x, labels, z = torch.randn(2, 1, 2, 2), torch.tensor([0, 2]), torch.randn(2, 1, 2, 2)
    sampler, guidance = DDPM(4, clip_x0=False, variance="learned"), ClassifierGuidance(classifier, scale=s)
    timesteps = sampler.timesteps(toy)
    t, t_next = timesteps[1], timesteps[2]
    pred, got = learned_variance_step(sampler, toy, guidance, x, labels, timesteps, 1, noise=lambda: z)
    # the unconditional model (guidance.conditional_model=false), the step's only forward: v = -1, frac = 0
    log_var = math.log(sampler.posterior_variance(toy, t, t_next))
    assert torch.allclose(pred.log_variance, torch.full_like(x, log_var))
    a, a_next = toy.alpha(t), toy.alpha(t_next)
    eps_u = toy.predict(x, t, toy.null_labels(labels)).eps
    x0 = (x - (1 - a) ** 0.5 * eps_u) / a ** 0.5
    beta = 1 - a / a_next
    mean = a_next ** 0.5 * beta / (1 - a) * x0 + (a / a_next) ** 0.5 * (1 - a_next) / (1 - a) * x
    expected = mean + math.exp(log_var) * s * classifier.grad_log_prob(x, t, labels) + math.exp(0.5 * log_var) * z
    assert torch.allclose(got, expected, atol=1e-5)

    # a class-conditional forward (conditional_model=true): v = 0.5, frac = 0.75, and the move follows it
    guidance = ClassifierGuidance(classifier, scale=s, conditional_model=True)
    pred, learned = learned_variance_step(sampler, toy, guidance, x, labels, timesteps, 1, lambda: torch.zeros_like(x))
    no_score = sampler.update(toy, x, toy.level(t), toy.level(t_next), GuidedPrediction(pred.x0, pred.eps, 1, log_variance=pred.log_variance),
                              noise=lambda: torch.zeros_like(x))
    variance = math.exp(0.75 * math.log(beta) + 0.25 * log_var)
    assert torch.allclose(learned - no_score, variance * s * classifier.grad_log_prob(x, t, labels), atol=1e-6)
