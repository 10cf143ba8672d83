"""The equivalent CFG scale probe (diffguide/guidance/equivalent.py), Guidance Matters' protocol as
../shared/TEXT-TO-IMAGE.md quotes it (arXiv 2602.22570): "the equivalent CFG scale per step (norm of the method's
guided update over norm of eps_c - eps_u)". Worked by hand: CFG at w guides eps_u + w (eps_c - eps_u), so the ratio
is w at every step; a weight schedule gives its own w_t; CFG++ (Chung et al. 2024, its x0 = x0_u + lambda (x0_c -
x0_u)) gives lambda; no guidance (the conditional model) gives 1."""

import pytest

from diffguide.run import run
from tests.helpers import compose_run_config


def _probe(tmp_path, *overrides):
    cfg = compose_run_config(["model=gmm", "metric=none", "logger=none", "steps=6", "num_samples=8", "batch_size=4",
                              "precision=fp32", "equivalent_scale=true", *overrides], tmp_path / "run")
    return run(cfg)


@pytest.mark.parametrize("overrides,expected", [(["guidance=cfg", "scale=3"], 3.0),
                                                (["guidance=cfgpp", "scale=0.6"], 0.6),
                                                (["guidance=none"], 1.0)])
def test_the_equivalent_scale_of_a_constant_rule_is_its_weight(tmp_path, overrides, expected):
    result = _probe(tmp_path, *overrides)
    steps = result["equivalent_scale"]["per_step"]
    # the exact mixture's last step: every sample's class is decided, eps_c = eps_u, no scale to read (null)
    assert len(steps) == 6 and [r is None for _, r in steps] == [False] * 5 + [True], steps
    assert all(ratio == pytest.approx(expected, abs=1e-4) for _, ratio in steps[:5]), steps
    assert result["equivalent_scale"]["mean"] == pytest.approx(expected, abs=1e-4)
    assert result["nfe"] == (1 if overrides == ["guidance=none"] else 2) * 6  # the probe's forwards not counted


def test_a_weight_schedule_shows_its_own_weight_at_each_step(tmp_path):
    """guidance.schedule=linear: w_t = 1 + (w - 1) f(p), rising or falling over the trajectory: the probe reads back
    the method's own weight at each level (Guidance.weight), step by step."""
    from diffguide.command.config import compose_config
    from diffguide.errors import instantiate

    overrides = ["guidance=cfg", "scale=4", "guidance.schedule={kind:linear}"]
    result = _probe(tmp_path, *overrides)
    cfg = compose_config("config", ["model=gmm", "steps=6", *overrides])
    model, sampler, guidance = instantiate(cfg.model), instantiate(cfg.sampler), instantiate(cfg.guidance)
    levels = sampler.levels(model)
    guidance.begin(model, None, levels)
    expected = [guidance.weight(model, level) for level in levels]
    measured = [ratio for _, ratio in result["equivalent_scale"]["per_step"]]
    assert len(set(round(w, 3) for w in expected)) > 2 and measured[-1] is None
    assert measured[:5] == pytest.approx(expected[:5], abs=1e-4)
