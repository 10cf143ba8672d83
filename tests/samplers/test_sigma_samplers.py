"""The sigma-space samplers (euler, euler_a, heun, dpmpp_2m_sde) against the diffusers schedulers they follow, on
the exact mixture served in every model family (VP eps / v / x0, EDM, flow), and the noise-level axis itself."""

import math

import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, HeunDiscreteScheduler)

from diffguide.errors import UserError
from diffguide.guidance.cfg import CFG
from diffguide.guidance.cfgpp import CFGPlusPlus
from diffguide.guidance.none import NoGuidance
from diffguide.models import gmm
from diffguide.models.schedules import Level
from diffguide.samplers.ddim import DDIM
from diffguide.samplers.dpmpp_2m import DPMSolverPP2M, DPMSolverPP2MSDE
from diffguide.samplers.euler import Euler, EulerAncestral, Heun

FAMILIES = [("vp", "eps"), ("vp", "v"), ("vp", "x0"), ("edm", "edm"), ("flow", "flow")]


@pytest.fixture
def mixture():
    return gmm.image(num_classes=3, shape=(1, 4, 4), std=0.3)


def _vp_loop(scheduler, model, x_T, labels, steps, generator=None):
    """diffusers' own loop in its own (EDM-scaled) coordinates; the model is called at each step's sigma."""
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        sigma = float(scheduler.sigmas[scheduler.index_for_timestep(t)] if scheduler.step_index is None
                      else scheduler.sigmas[scheduler.step_index])
        eps = model.predict(scheduler.scale_model_input(x, t), model.schedule.at_sigma(sigma), labels).eps
        kwargs = {"generator": generator} if generator is not None else {}
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_euler_matches_euler_discrete(mixture, spacing):
    """diffusers EulerDiscreteScheduler.step (s_churn = 0): `pred_original_sample = sample - sigma * model_output`,
    `derivative = (sample - pred_original_sample) / sigma_hat`, `prev_sample = sample + derivative * dt`."""
    x_T, labels = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2] * 2)
    ours, nfe = Euler(12, spacing=spacing, clip_x0=False).sample(mixture, NoGuidance(), x_T, labels)
    scheduler = EulerDiscreteScheduler.from_config(mixture.scheduler_config, timestep_spacing=spacing)
    theirs = _vp_loop(scheduler, mixture, x_T, labels, 12)
    assert nfe == 12
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_euler_ancestral_matches_diffusers_including_noise(mixture):
    """k-diffusion's get_ancestral_step: sigma_up = sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2),
    sigma_down = sqrt(sigma_to^2 - sigma_up^2), as EulerAncestralDiscreteScheduler.step computes them."""
    labels = torch.tensor([2])
    g_ours, g_theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x_ours, x_theirs = torch.randn((1, 1, 4, 4), generator=g_ours), torch.randn((1, 1, 4, 4), generator=g_theirs)
    ours, _ = EulerAncestral(15, clip_x0=False).sample(mixture, NoGuidance(), x_ours, labels, generators=[g_ours])
    scheduler = EulerAncestralDiscreteScheduler.from_config(mixture.scheduler_config, timestep_spacing="linspace")
    theirs = _vp_loop(scheduler, mixture, x_theirs, labels, 15, generator=g_theirs)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_heun_matches_heun_discrete(mixture):
    """HeunDiscreteScheduler: first order then `derivative = (derivative + self.prev_derivative) / 2` at the next
    sigma; 2 network evaluations per step except the last (to sigma = 0), 2 n - 1 in all."""
    x_T, labels = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2] * 2)
    ours, nfe = Heun(10, clip_x0=False).sample(mixture, NoGuidance(), x_T, labels)
    scheduler = HeunDiscreteScheduler.from_config(mixture.scheduler_config, timestep_spacing="linspace",
                                                  clip_sample=False)
    theirs = _vp_loop(scheduler, mixture, x_T, labels, 10)
    assert nfe == 2 * 10 - 1
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_dpmpp_2m_sde_matches_diffusers_including_noise(mixture):
    """DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), midpoint: `x_t = (sigma_t / sigma_s0 *
    torch.exp(-h)) * sample + (alpha_t * (1 - torch.exp(-2.0 * h))) * D0 + 0.5 * (alpha_t * (1 - torch.exp(-2.0 *
    h))) * D1 + sigma_t * torch.sqrt(1.0 - torch.exp(-2.0 * h)) * noise`."""
    labels = torch.tensor([0])
    g_ours, g_theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x_ours, x_theirs = torch.randn((1, 1, 4, 4), generator=g_ours), torch.randn((1, 1, 4, 4), generator=g_theirs)
    ours, _ = DPMSolverPP2MSDE(12, clip_x0=False).sample(mixture, NoGuidance(), x_ours, labels, generators=[g_ours])
    scheduler = DPMSolverMultistepScheduler.from_config(mixture.scheduler_config, algorithm_type="sde-dpmsolver++",
                                                        solver_order=2, timestep_spacing="linspace",
                                                        final_sigmas_type="zero")
    scheduler.set_timesteps(12)
    x = x_theirs
    for t in scheduler.timesteps:
        x = scheduler.step(mixture.predict(x, int(t), labels).eps, t, x, generator=g_theirs).prev_sample
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()


@pytest.mark.parametrize("sampler, scheduler_class", [(Euler, FlowMatchEulerDiscreteScheduler),
                                                      (Heun, FlowMatchHeunDiscreteScheduler)])
def test_flow_samplers_match_the_flow_matching_schedulers(sampler, scheduler_class):
    """FlowMatchEulerDiscreteScheduler.step: `prev_sample = sample + (sigma_next - sigma) * model_output` on the
    velocity; FlowMatchHeun averages the velocities at both ends. Our samplers see the same network through the flow
    parameterisation adapter and must land on the same points."""
    model = gmm.image(num_classes=3, shape=(1, 4, 4), std=0.3, family="flow")
    x_T, labels = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2] * 2)
    ours, _ = sampler(10, clip_x0=False).sample(model, NoGuidance(), x_T, labels)
    scheduler = scheduler_class.from_config(model.schedule.scheduler_config)
    scheduler.set_timesteps(10)
    x = x_T
    for t in scheduler.timesteps:
        tau = float(t) / 1000
        v = model._output_at(x, model.level(tau), labels)
        x = scheduler.step(v, t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()


@pytest.mark.parametrize("family, parameterisation", FAMILIES)
def test_every_parameterisation_round_trips_the_exact_prediction(family, parameterisation):
    """The adapter's output of the exact (x0, eps) converts back to them, and x = alpha x0 + noise eps holds."""
    model = gmm.image(num_classes=3, shape=(1, 4, 4), family=family, parameterisation=parameterisation)
    x, labels = torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    for sigma in (0.05, 1.0, 20.0):
        level = model.schedule.at_sigma(sigma)
        exact = model.exact(x, level, labels)
        back = model.parameterisation.prediction(model.parameterisation.output(exact, x, level), x, level)
        assert torch.allclose(back.x0, exact.x0, atol=1e-9) and torch.allclose(back.eps, exact.eps, atol=1e-9)
        assert torch.allclose(level.alpha * exact.x0 + level.noise * exact.eps, x, atol=1e-9)
        assert level.sigma == pytest.approx(sigma, rel=1e-6)


@pytest.mark.parametrize("family, parameterisation", FAMILIES)
def test_heun_reproduces_the_mixture_in_every_family(family, parameterisation):
    """Heun on the exact denoiser: each class's mean and spread are the mixture's (N(mu_k, 0.3^2 I)) within
    sampling error, whatever the noise process and the parameterisation the closed form is served in."""
    model = gmm.ring(num_classes=4, radius=2.0, std=0.3, family=family, parameterisation=parameterisation)
    n = 2000
    x_T, labels = torch.randn(n, 2, generator=torch.Generator().manual_seed(0)), torch.arange(n) % 4
    x, nfe = Heun(40, clip_x0=False).sample(model, NoGuidance(), x_T, labels)
    x = x.double()
    for k in range(4):
        sel = x[labels == k]
        assert torch.allclose(sel.mean(0), model.means[k], atol=4 * 0.3 / len(sel) ** 0.5), (k, sel.mean(0))
    assert abs((x - model.means[labels]).std().item() - 0.3) < 0.015
    assert nfe == 79


@pytest.mark.parametrize("family", ["vp", "edm", "flow"])
@pytest.mark.parametrize("make", [lambda n: DDIM(n, clip_x0=False), lambda n: Euler(n, clip_x0=False),
                                  lambda n: DPMSolverPP2M(n, clip_x0=False)])
def test_deterministic_samplers_agree_in_every_family(family, make):
    """DDIM, Euler and DPM-Solver++ 2M converge to the same ODE solution: at 200 steps each lands within 2e-2 of
    Heun at 200 steps, on the same noise, in every family (the ODE is the family's; its solution is unique)."""
    model = gmm.ring(num_classes=4, radius=2.0, std=0.3, family=family)
    x_T, labels = torch.randn(64, 2, generator=torch.Generator().manual_seed(4)), torch.arange(64) % 4
    reference, _ = Heun(200, clip_x0=False).sample(model, NoGuidance(), x_T, labels)
    ours, _ = make(200).sample(model, NoGuidance(), x_T, labels)
    assert (ours - reference).abs().max() < 2e-2


def test_a_flow_model_starts_at_pure_noise_where_sigma_is_infinite():
    model = gmm.ring(family="flow")
    first = Euler(10).levels(model)[0]
    assert first == Level(0.0, 1.0, 1.0) and math.isinf(first.sigma)
    # the first prediction's x0 is the network's alone: the mixture's mean (every class equally likely)
    pred = model.predict(torch.randn(3, 2), first, torch.full((3,), model.null_class))
    assert torch.allclose(pred.x0.double(), model.means.mean(0).expand(3, 2), atol=1e-6)


def test_an_edm_model_starts_at_sigma_max_times_the_noise():
    model = gmm.ring(family="edm")
    levels = Euler(5).levels(model)
    assert levels[0].sigma == pytest.approx(80.0) and levels[-1].sigma == pytest.approx(0.002)
    # the network's time input is EDM's c_noise = ln(sigma) / 4, its input c_in x = x / sqrt(sigma^2 + 0.5^2)
    assert model.schedule.network_time(torch.tensor([math.e ** 4])).item() == pytest.approx(1.0)
    x = torch.ones(1, 2)
    assert torch.allclose(model.parameterisation.network_input(x, levels[0]), x / (80.0 ** 2 + 0.25) ** 0.5)


@pytest.mark.parametrize("sampler", [Heun(4), DPMSolverPP2MSDE(4)])
def test_cfgpp_refuses_a_sampler_it_has_no_form_for(mixture, sampler):
    with pytest.raises(UserError, match="no form for sampler"):
        sampler.sample(mixture, CFGPlusPlus(0.5), torch.randn(2, 1, 4, 4), torch.tensor([0, 1]),
                       [torch.Generator() for _ in range(2)])


def test_cfgpp_euler_is_kdiffusions_form(mixture):
    """k-diffusion sample_euler_cfg_pp: `d = to_d(x, sigmas[i], uncond_denoised)`, `x = denoised + d * sigmas[i + 1]`
    (denoised the guided x0): x_next / alpha_next = x0_guided + sigma_next eps_u."""
    x, labels, lam = torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 2]), 0.6
    sampler = Euler(5, clip_x0=False)
    levels = sampler.levels(mixture)
    t, t_next = levels[1], levels[2]
    guidance = CFGPlusPlus(lam)
    pred = sampler._finalize(mixture, x, t, t_next, guidance(mixture, x, t, labels))
    ours = sampler.update(mixture, x, t, t_next, pred, noise=None)
    uncond = mixture.predict(x, t, mixture.null_labels(labels))
    cond = mixture.predict(x, t, labels)
    denoised = uncond.x0 + lam * (cond.x0 - uncond.x0)
    x_ve = x / t.alpha
    d = (x_ve - uncond.x0) / t.sigma
    expected = t_next.alpha * (denoised + d * t_next.sigma)
    assert torch.allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("family", ["vp", "edm", "flow"])
def test_cfg_at_one_and_zero_is_the_conditional_and_unconditional_model_in_every_family(family):
    model = gmm.image(num_classes=3, shape=(1, 4, 4), family=family)
    x, labels = torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 2])
    level = Euler(8).levels(model)[3]
    for w, expected in ((1.0, labels), (0.0, model.null_labels(labels))):
        pred = CFG(w)(model, x, level, labels)
        exact = model.exact(x, level, expected)
        assert torch.allclose(pred.x0.double(), exact.x0, atol=1e-5)
        assert torch.allclose(pred.eps.double(), exact.eps, atol=1e-5)
    # w = 2: the same affine combination of x0 and of eps (x0 and eps stay consistent)
    pred = CFG(2.0)(model, x, level, labels)
    assert torch.allclose(level.alpha * pred.x0 + level.noise * pred.eps, x, atol=1e-5)


def _kdiffusion_2s_ancestral(model, x_T, labels, sigmas, generator, lam=None):
    """k-diffusion's sample_dpmpp_2s_ancestral, and with lam the CFG++ form of ComfyUI's
    comfy/k_diffusion/sampling.py sample_dpmpp_2s_ancestral_cfg_pp, line for line in EDM coordinates:
        x_2 = (sigma_fn(s) / sigma_fn(t)) * (x + (denoised - temp[0])) - (-h * r).expm1() * denoised
        denoised_2 = model.predict(x_2, sigma_fn(s) * s_in, **extra_args).eps
        x = (sigma_fn(t_next) / sigma_fn(t)) * (x + (denoised - temp[0])) - (-h).expm1() * denoised_2
    (without CFG++, temp[0] = denoised), the model D(x, sigma) being the mixture's x0 at that sigma."""
    def model_fn(x, sigma):
        level = model.schedule.at_sigma(sigma)
        uncond = model.predict(x * level.alpha, level, model.null_labels(labels))
        cond = model.predict(x * level.alpha, level, labels)
        if lam is None:
            return cond.x0, cond.x0
        return uncond.x0 + lam * (cond.x0 - uncond.x0), uncond.x0

    x = x_T * (sigmas[0] ** 2 + 1) ** 0.5
    for i in range(len(sigmas) - 1):
        denoised, uncond = model_fn(x, sigmas[i])
        sigma_up = min(sigmas[i + 1], (sigmas[i + 1] ** 2 * (sigmas[i] ** 2 - sigmas[i + 1] ** 2) / sigmas[i] ** 2)
                       ** 0.5)
        sigma_down = (sigmas[i + 1] ** 2 - sigma_up ** 2) ** 0.5
        if sigma_down == 0:
            x = denoised
        else:
            t, t_next = -math.log(sigmas[i]), -math.log(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (math.exp(-s) / math.exp(-t)) * (x + (denoised - uncond)) - math.expm1(-h * 0.5) * denoised
            denoised_2, _ = model_fn(x_2, math.exp(-s))
            x = (math.exp(-t_next) / math.exp(-t)) * (x + (denoised - uncond)) - math.expm1(-h) * denoised_2
        if sigmas[i + 1] > 0:
            x = x + torch.randn(x.shape[1:], generator=generator).unsqueeze(0) * sigma_up
    return x


@pytest.mark.parametrize("lam", [None, 0.6])
def test_dpmpp_2s_ancestral_is_kdiffusions_and_its_cfgpp_form_comfyuis(mixture, lam):
    from diffguide.samplers.dpmpp_2s_a import DPMSolverPP2SAncestral

    labels = torch.tensor([1])
    g_ours, g_theirs = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    x_ours, x_theirs = torch.randn((1, 1, 4, 4), generator=g_ours), torch.randn((1, 1, 4, 4), generator=g_theirs)
    sampler = DPMSolverPP2SAncestral(8, clip_x0=False)
    guidance = NoGuidance() if lam is None else CFGPlusPlus(lam)
    ours, nfe = sampler.sample(mixture, guidance, x_ours, labels, generators=[g_ours])
    sigmas = [level.sigma for level in sampler.levels(mixture)] + [0.0]
    theirs = _kdiffusion_2s_ancestral(mixture, x_theirs.double(), labels, sigmas, g_theirs, lam)
    assert torch.allclose(ours.double(), theirs, atol=1e-4), (ours - theirs).abs().max()
    assert nfe == (1 if lam is None else 2) * (2 * 8 - 1)


def test_dpmpp_2s_ancestral_on_a_flow_model_starts_with_an_euler_step():
    from diffguide.samplers.dpmpp_2s_a import DPMSolverPP2SAncestral

    model = gmm.ring(family="flow")
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    x, nfe = DPMSolverPP2SAncestral(6).sample(model, NoGuidance(), torch.randn(4, 2), torch.arange(4), generators)
    assert torch.isfinite(x).all() and nfe == 2 * 6 - 2  # one evaluation at tau = 1 and on the last step
