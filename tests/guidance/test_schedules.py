"""CFG weight schedules (diffguide/guidance/weights.py; Wang et al. 2024, arXiv 2404.13040) as the `schedule` key of
the CFG-like methods: each kind's weights at known steps worked by hand, the mean weight over a trajectory, the
interval schedule against guidance=cfg_interval on the exact mixture, CFG++ and APG following a schedule, and bad
configs refused in one line."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from diffguide.errors import UserError
from diffguide.guidance import weights
from diffguide.guidance.apg import APG
from diffguide.guidance.cfg import CFG
from diffguide.guidance.cfg_interval import PRESETS, CFGInterval
from diffguide.guidance.cfg_rescale import CFGRescale
from diffguide.guidance.cfg_zero_star import CFGZeroStar
from diffguide.guidance.cfgpp import CFGPlusPlus
from diffguide.models import gmm
from diffguide.samplers.ddim import DDIM
from diffguide.samplers.euler import Euler


def weights_at(guidance, model, times):
    guidance.begin(model, torch.tensor([0]), times)
    return [guidance.weight(model, t) for t in times]


TIMES = [900, 600, 300, 100]  # N = 4: p = 0, 1/3, 2/3, 1


def test_linear_and_cosine_weights_by_hand(toy):
    """w = 3 (strength w - 1 = 2, the paper's w0): linear 1 + 2 * 2p, cosine 1 + 2 (1 - cos(pi p))."""
    assert weights_at(CFG(3.0, schedule="linear"), toy, TIMES) == pytest.approx([1.0, 1 + 4 / 3, 1 + 8 / 3, 5.0])
    assert weights_at(CFG(3.0, schedule="cosine"), toy, TIMES) == pytest.approx([1.0, 2.0, 4.0, 5.0])
    # the first step is exactly the conditional model (CFG then spends one evaluation there)
    assert weights_at(CFG(3.0, schedule="linear"), toy, TIMES)[0] == 1.0
    # the paper's form: Ho & Salimans' w_t = w_t - 1 is 2 w0 p (linear), w0 (cos(pi t/T) + 1) with t/T = 1 - p
    for p, w in zip([0, 1 / 3, 2 / 3, 1], weights_at(CFG(3.0, schedule="cosine"), toy, TIMES)):
        assert w - 1 == pytest.approx(2.0 * (math.cos(math.pi * (1 - p)) + 1))


def test_clamped_weights_by_hand(toy):
    """The clamp floors the weight in the scale's units: max(floor, linear); default floor 2 = the paper's c = 1."""
    assert weights_at(CFG(3.0, schedule="clamp_linear"), toy, TIMES) == pytest.approx([2.0, 7 / 3, 11 / 3, 5.0])
    clamp = CFG(3.0, schedule={"kind": "clamp_cosine", "floor": 2.5})
    assert weights_at(clamp, toy, TIMES) == pytest.approx([2.5, 2.5, 4.0, 5.0])


def test_interval_weights_by_hand(toy):
    """Inside (sigma_lo, sigma_hi] the scale, outside the conditional model's w = 1."""
    guidance = CFG(3.0, schedule={"kind": "interval", "sigma_lo": 0.5, "sigma_hi": 2.0})
    for t in range(0, 1000, 37):
        inside = 0.5 < toy.sigma(t) <= 2.0
        assert guidance.weight(toy, t) == (3.0 if inside else 1.0), t


def test_constant_is_the_plain_scale(toy):
    for schedule in (None, "constant", {"kind": "constant"}):
        guidance = CFG(2.5, schedule=schedule)
        assert guidance.schedule is None and weights_at(guidance, toy, TIMES) == [2.5] * 4


@pytest.mark.parametrize("family, sampler", [("vp", DDIM(20)), ("vp", DDIM(7)), ("flow", Euler(13)),
                                             ("edm", Euler(10))])
def test_mean_strength_over_the_trajectory_is_the_constants(family, sampler):
    """Wang et al. normalise their schedulers to the static scale's area; on the step fraction p_i = i / (N - 1)
    the mean of w_t over the trajectory's N levels is w exactly, on any grid (uniform or not in sigma)."""
    model = gmm.image(family=family)
    levels = sampler.levels(model)
    for kind in ("linear", "cosine"):
        for w, cls in ((3.0, CFG), (0.6, CFGPlusPlus)):
            guidance = cls(w, schedule=kind)
            guidance.begin(model, torch.tensor([0]), levels)
            mean = sum(guidance.weight(model, level) for level in levels) / len(levels)
            assert mean == pytest.approx(w, abs=1e-12), (kind, cls.name)
    clamp = CFG(3.0, schedule="clamp_linear")
    clamp.begin(model, torch.tensor([0]), levels)
    assert sum(clamp.weight(model, level) for level in levels) / len(levels) > 3.0  # the floor only raises it


def test_progress_between_levels_is_interpolated(toy):
    """An evaluation between two levels (DPM-Solver++(2S)'s midpoint) gets a fractional step between theirs; one at
    a level (Heun's second evaluation at the next level) gets that level's; beyond the ends 0 and 1."""
    levels = [toy.level(t) for t in TIMES]
    assert [weights.progress(level, levels) for level in levels] == [0.0, 1 / 3, 2 / 3, 1.0]
    between = weights.progress(toy.level(450), levels)
    assert 1 / 3 < between < 2 / 3
    assert weights.progress(toy.level(999), levels) == 0.0 and weights.progress(toy.level(10), levels) == 1.0
    assert weights.progress(levels[2], levels[:1]) == 0.5  # a one-step trajectory: the mean shape value


@pytest.mark.parametrize("preset", list(PRESETS))
def test_interval_schedule_is_cfg_interval_on_the_exact_mixture(preset):
    """schedule=interval with a preset makes exactly guidance=cfg_interval's predictions and spends its NFE at
    every step of a DDIM trajectory, and the same samples."""
    model = gmm.image(num_classes=3)
    labels = torch.tensor([0, 1, 2, 0])
    sampler = DDIM(30, clip_x0=False)
    ours = CFG(2.0, schedule={"kind": "interval", "interval": preset})
    theirs = CFGInterval(2.0, interval=preset)
    levels = sampler.levels(model)
    ours.begin(model, labels, levels)
    theirs.begin(model, labels, levels)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    inside = 0
    for level in levels:
        a, b = ours(model, x, level, labels), theirs(model, x, level, labels)
        assert torch.equal(a.x0, b.x0) and torch.equal(a.eps, b.eps) and a.nfe == b.nfe, level
        inside += a.nfe == 2
    assert 0 < inside < len(levels)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x0_a, nfe_a = sampler.sample(model, ours, x_T, labels)
    x0_b, nfe_b = sampler.sample(model, theirs, x_T, labels)
    assert torch.equal(x0_a, x0_b) and nfe_a == nfe_b == len(levels) + inside


def test_cfg_spends_one_evaluation_where_the_scheduled_weight_is_one(toy):
    """linear starts at the conditional model: its first step costs 1 evaluation, the others 2."""
    sampler = DDIM(10, clip_x0=False)
    _, nfe = sampler.sample(toy, CFG(3.0, schedule="linear"), torch.randn(2, 1, 2, 2), torch.tensor([0, 1]))
    assert nfe == 2 * 10 - 1


def test_cfgpp_follows_the_schedule_on_lambda(toy):
    """CFG++'s neutral scale is 0 (lambda = 0: no guidance): linear lambda_t = lam 2p. Worked on the last step of
    [600, 400, 200] (p = 1, lambda_t = 1.2) and the first (lambda_t = 0: x0 from eps_u)."""
    guidance = CFGPlusPlus(0.6, schedule="linear")
    assert guidance.neutral_scale == 0.0
    x, labels = torch.full((1, 1, 2, 2), -0.2), torch.tensor([1])
    guidance.begin(toy, labels, [600, 400, 200])
    pred = guidance(toy, x, 200, labels)
    # eps_u = -0.1 + 0 + 0.2 = 0.1; eps_c = -0.1 + 0.2 + 0.2 = 0.3; eps_lam = 0.1 + 1.2 * 0.2 = 0.34
    a = float(toy.alphas_cumprod[200])
    assert torch.allclose(pred.x0, torch.full_like(x, (-0.2 - math.sqrt(1 - a) * 0.34) / math.sqrt(a)))
    assert torch.allclose(pred.eps, torch.full_like(x, 0.1)) and pred.nfe == 2
    first = guidance(toy, x, 600, labels)
    # eps_u at t = 600: -0.1 + 0 + 0.6 = 0.5; lambda_t = 0 gives x0 from eps_u
    a = float(toy.alphas_cumprod[600])
    assert torch.allclose(first.x0, torch.full_like(x, (-0.2 - math.sqrt(1 - a) * 0.5) / math.sqrt(a)))


def test_apg_follows_the_schedule(toy):
    """APG: D = D_c + (w_t - 1) update with cosine w_t over [600, 400, 200]: 1, 3, 5 for w = 3. Worked at the
    middle step (w_t = 3), eta = 0.5, r = 0.1, no momentum; the first step is D_c."""
    x, labels, t = torch.tensor([[[[0.3, -0.1], [0.2, 0.0]]]]), torch.tensor([2]), 400
    guidance = APG(3.0, eta=0.5, norm_threshold=0.1, momentum=0.0, schedule="cosine")
    guidance.begin(toy, labels, [600, 400, 200])
    a = float(toy.alphas_cumprod[t])
    eps_u, eps_c = 0.5 * x + 0.4, 0.5 * x + 0.4 + 0.3
    d_u, d_c = (x - math.sqrt(1 - a) * eps_u) / math.sqrt(a), (x - math.sqrt(1 - a) * eps_c) / math.sqrt(a)
    diff = d_c - d_u
    diff = diff * min(1.0, 0.1 / diff.norm().item())
    unit = d_c / d_c.norm()
    par = (diff * unit).sum() * unit
    expected = d_c + 2.0 * ((diff - par) + 0.5 * par)
    assert torch.allclose(guidance(toy, x, t, labels).x0, expected, atol=1e-6)
    first = guidance(toy, x, 600, labels)
    assert torch.allclose(first.eps, toy.predict(x, 600, labels).eps, atol=1e-5)


def test_rescale_and_zero_star_follow_the_schedule(toy):
    """At a step whose weight is 1 both are the conditional model; elsewhere they equal the constant method at
    that step's weight."""
    x, labels = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2])
    for cls in (CFGRescale, lambda w, schedule=None: CFGZeroStar(w, zero_init_steps=0, schedule=schedule)):
        scheduled = cls(3.0, schedule="linear")
        scheduled.begin(toy, labels, [600, 400, 200])
        assert torch.allclose(scheduled(toy, x, 600, labels).eps, toy.predict(x, 600, labels).eps, atol=1e-5)
        assert torch.allclose(scheduled(toy, x, 200, labels).eps, cls(5.0)(toy, x, 200, labels).eps, atol=1e-6)


def test_neutral_scales():
    assert CFG(2.0).neutral_scale == CFGRescale(2.0).neutral_scale == APG(2.0).neutral_scale == 1.0
    assert CFGZeroStar(2.0).neutral_scale == 1.0 and CFGPlusPlus(0.5).neutral_scale == 0.0
    assert CFGPlusPlus(0.5, schedule="clamp_linear").schedule.floor == 1.0  # neutral + 1
    assert CFG(2.0, schedule="clamp_linear").schedule.floor == 2.0


@pytest.mark.parametrize("schedule, match", [
    ("bogus", "schedule kind 'bogus' is not one of constant, linear, cosine, clamp_linear, clamp_cosine, interval"),
    ({"floor": 2.0}, "a schedule dict needs a kind, one of constant, linear"),
    ({"kind": "linear", "floor": 2.0}, "schedule linear has no key 'floor'"),
    ({"kind": "clamp_linear", "flor": 2.0}, "has no key 'flor' .clamp_linear takes floor."),
    ({"kind": "clamp_cosine", "floor": "high"}, "floor must be a finite number"),
    ({"kind": "clamp_cosine", "floor": 0.5}, "floor must be >= 1"),
    ({"kind": "interval", "interval": "edm9"}, "interval 'edm9' is not one of edm2_xxl, edm2_s"),
    ({"kind": "interval", "sigma_lo": 3.0, "sigma_hi": 2.0}, "needs 0 <= sigma_lo < sigma_hi"),
    (3, "schedule must be null, a kind"),
])
def test_bad_schedules_are_refused_in_one_line(schedule, match):
    with pytest.raises(UserError, match=match) as caught:
        CFG(2.0, schedule=schedule)
    assert "\n" not in str(caught.value)


def test_a_schedule_from_the_config(tiny_unet_path, tmp_path):
    """guidance.schedule=linear and the dict form reach every CFG-like method's constructor (a Hydra DictConfig);
    a bad kind from the command line is one line before any model loads."""
    from diffguide.errors import instantiate as _instantiate
    from tests.helpers import compose_run_config

    for method in ("cfg", "cfgpp", "cfg_rescale", "cfg_zero_star", "apg"):
        cfg = compose_run_config([f"guidance={method}", "guidance.schedule={kind: clamp_cosine, floor: 1.5}",
                                  f"model.weights={tiny_unet_path}"], tmp_path)
        assert OmegaConf.is_dict(cfg.guidance.schedule)
        guidance = _instantiate(cfg.guidance)
        assert guidance.schedule.kind == "clamp_cosine" and guidance.schedule.floor == 1.5, method
        default = _instantiate(compose_run_config([f"guidance={method}"], tmp_path).guidance)
        assert default.schedule is None, method
    cfg = compose_run_config(["guidance=cfg", "guidance.schedule=linaer"], tmp_path)
    with pytest.raises(UserError, match="schedule kind 'linaer' is not one of") as caught:
        _instantiate(cfg.guidance)
    assert "\n" not in str(caught.value)
