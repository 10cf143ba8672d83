"""Every guidance method on the embedded model families, an eps-prediction UNet on DDPM's discrete schedule, a
flow-matching UNet (velocity output, FlowMatchEuler's time) and the pixel DiT (fmnist_dit's class, self-attention in
every block), through `diffguide.run`, with the network evaluations its formula costs; and the families' end-to-end
commands."""

import pytest
import torch

from diffguide.command.config import CONF_DIR
from diffguide.models import unet as unet_lib
from diffguide.samplers.ddim import DDIM
from tests.helpers import SCHEDULE, TINY_UNET

STEPS = 3
GUIDANCES = sorted(path.stem for path in (CONF_DIR / "guidance").glob("*.yaml"))
FLOW_SCHEDULE = {"num_train_timesteps": 1000, "shift": 1.0}

# network evaluations per step (cfg_zero_star: its zero-initialised first step costs nothing)
# (slg: its default window, diffusers' int(0.01 N) < i < int(0.2 N), holds no step of a 3-step trajectory)
PER_STEP = {"none": 1, "cfg": 2, "cfgpp": 2, "cfg_rescale": 2, "apg": 2, "adaptive": 2, "autoguidance": 2,
            "classifier": 1, "offshelf": 1, "gfcg": 3, "universal": 2, "cfg_zero_star": 2, "cfg_interval": None,
            "distilled": 1, "pag": 2, "seg": 2, "slg": 1, "icg": 2, "tsg": 2, "apg_mix": 2, "tcfg": 2, "fdg": 2,
            "mag": 2}
TINY_DIT = dict(sample_size=28, in_channels=1, out_channels=1, patch_size=4, num_layers=2, num_attention_heads=2,
                attention_head_dim=8, norm_type="ada_norm_zero")


@pytest.fixture(scope="session")
def tiny_flow_path(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("models") / "tiny_flow.safetensors"
    unet_lib.save(unet_lib.build(TINY_UNET, 10, FLOW_SCHEDULE, "flow"), path)
    return path


@pytest.fixture(scope="session")
def tiny_dit_path(tmp_path_factory):
    from diffguide.models import dit as dit_lib

    torch.manual_seed(2)
    model = dit_lib.build(TINY_DIT, 10, SCHEDULE)
    for p in model.transformer.parameters():  # DiT's zero-initialised gates and output: a network that does something
        if not p.any():
            p.data.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("models") / "tiny_dit.safetensors"
    dit_lib.save(model, path)
    return path


@pytest.fixture(scope="session")
def tiny_noisy_path(tmp_path_factory):
    from diffguide.classifiers import noisy as noisy_lib

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny_noisy.safetensors"
    noisy_lib.save(noisy_lib.NoisyClassifier(channels=(8, 16), num_classes=10, groups=4), path,
                   extra={"scheduler": {"num_train_timesteps": 1000, "beta_schedule": "linear"}})
    return path


def expected_nfe(name: str, model) -> int:
    if name == "cfg_interval":  # 2 inside the default (0.19, 1.61] sigma interval, 1 outside
        return sum(2 if 0.19 < level.sigma <= 1.61 else 1 for level in DDIM(STEPS).levels(model))
    if name == "universal" and model.parameterisation.name == "flow":
        # TFG's rho schedule ("increase") is a_t / a_next: 0 at a flow model's pure noise (tau = 1, a = 0), where
        # the variance guidance, and its backward pass, are skipped
        return PER_STEP[name] * STEPS - 1
    return PER_STEP[name] * STEPS - (2 if name == "cfg_zero_star" else 0)


def test_the_table_has_every_method():
    assert sorted(PER_STEP) == GUIDANCES


@pytest.mark.parametrize("family", ["eps", "flow", "dit"])
@pytest.mark.parametrize("name", GUIDANCES)
def test_every_method_runs_on_every_model_family(run_diffguide, tmp_path, tiny_unet_path, tiny_flow_path,
                                                 tiny_dit_path, tiny_evaluator_path, tiny_noisy_path, name, family):
    weights = {"eps": tiny_unet_path, "flow": tiny_flow_path, "dit": tiny_dit_path}[family]
    overrides = [f"model.weights={weights}", f"guidance={name}", f"steps={STEPS}"]
    if family == "dit":
        overrides.insert(0, "model=fmnist_dit")
        if name in ("autoguidance", "gfcg"):  # the weak model: the same tiny DiT, through the DiT loader
            overrides.append("guidance.weak_model._target_=diffguide.models.dit.load_pixel")
    if name == "distilled":
        if family != "eps":
            pytest.skip("guidance distillation (diffguide/training/distill.py) starts from an eps-prediction UNet teacher")
        from diffguide.models import student as student_lib

        student_path = tmp_path / "student.safetensors"
        student_lib.save(student_lib.from_teacher(unet_lib.load(str(weights)), [1, 4]), student_path)
        overrides = ["model=fmnist_guided_student", f"model.weights={student_path}", f"steps={STEPS}"]
    if name == "autoguidance":
        overrides.append(f"guidance.weak_model.weights={weights}")
    elif name == "gfcg":
        overrides += [f"classifier.weights={tiny_evaluator_path}", f"guidance.weak_model.weights={weights}"]
    elif name == "classifier":
        overrides.append(f"classifier.weights={tiny_noisy_path}")
    elif name in ("offshelf", "universal"):
        overrides.append(f"classifier.weights={tiny_evaluator_path}")
    if name == "adaptive":
        overrides.append("guidance.gamma=1.0")  # a cosine never exceeds 1: guided at every step
    if name == "offshelf" and family == "flow":
        overrides.append("sampler=ddpm")  # EluCD's own form (its DDIM form is refused on a flow model's grid)
    result = run_diffguide(tmp_path / name, *overrides)
    if family == "dit":
        from diffguide.models import dit as dit_lib

        model = dit_lib.load_pixel(str(weights))
    else:
        model = unet_lib.load(str(weights))
    assert result["nfe"] == expected_nfe(name, model)
    assert result["guidance"] == name
    assert len(list((tmp_path / name / "samples").glob("*.png"))) == 6


@pytest.mark.parametrize("sampler, per_step", [("euler", 2), ("heun", 4), ("euler_a", 2), ("dpmpp_2m_sde", 2),
                                               ("dpmpp_2s_a", 4)])
def test_the_flow_model_samples_with_every_sigma_sampler(run_diffguide, tmp_path, tiny_flow_path, sampler, per_step):
    """`python -m diffguide.run model=<flow model> sampler=euler guidance=cfg scale=2`, and heun: Heun evaluates
    the guidance twice per step except on the last (to the data)."""
    result = run_diffguide(tmp_path / sampler, f"model.weights={tiny_flow_path}", f"sampler={sampler}", "guidance=cfg",
                           "scale=2", f"steps={STEPS}")
    # Heun: one evaluation on the last step; DPM++ 2S-a: one at tau = 1 and one on the last step
    assert result["nfe"] == per_step * STEPS - {"heun": 2, "dpmpp_2s_a": 4}.get(sampler, 0)


def test_the_flow_model_loads_as_a_flow(tiny_flow_path):
    model = unet_lib.load(str(tiny_flow_path))
    assert model.parameterisation.name == "flow" and model.num_train_timesteps is None
    first = DDIM(4).levels(model)[0]
    assert (first.alpha, first.noise, first.t) == (0.0, 1.0, 1.0)


@pytest.mark.parametrize("name", GUIDANCES)
def test_every_guidance_yaml_takes_the_scale(tmp_path, name):
    """`scale=` reaches every method that has one: the YAML passes ${scale} through (none says it ignores it)."""
    from hydra.utils import instantiate

    from tests.helpers import compose_run_config

    cfg = compose_run_config([f"guidance={name}", "scale=0.37"], tmp_path)
    guidance = instantiate(cfg.guidance)
    if name == "none":
        assert guidance.scale is None and "Ignores `scale`" in (CONF_DIR / "guidance" / "none.yaml").read_text()
    else:
        assert guidance.scale == 0.37


def test_metrics_record_the_trajectory_on_the_noise_level_axis(run_diffguide, tmp_path, tiny_flow_path):
    """metrics.json names each step's EDM sigma (inf at a flow model's tau = 1) and the model's own time."""
    import json

    run_diffguide(tmp_path / "flow", f"model.weights={tiny_flow_path}", "guidance=none", "steps=4")
    levels = json.loads((tmp_path / "flow" / "metrics.json").read_text())["noise_levels"]
    assert levels["schedule"] == "FlowSchedule" and levels["parameterisation"] == "flow"
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULE)
    scheduler.set_timesteps(4)
    taus = [float(tau) for tau in scheduler.sigmas[:-1]]  # diffusers' flow "sigmas" are the times tau
    assert levels["sigmas"][0] == "inf" and levels["times"] == pytest.approx(taus, abs=1e-6)
    assert levels["sigmas"][1:] == pytest.approx([tau / (1 - tau) for tau in taus[1:]], rel=1e-5)


def test_the_mixtures_new_family_keys_leave_its_runs_fingerprint_as_it_was(tmp_path):
    """model.family=vp and model.parameterisation=null reproduce the images made before the keys existed, so a run
    folder made then still resumes: its fingerprint is the one without the keys."""
    from omegaconf import open_dict

    from diffguide.store.fingerprint import fingerprint
    from tests.helpers import compose_run_config

    now = fingerprint(compose_run_config(["model=gmm", "metric=none"], tmp_path / "a"))[0]
    old = compose_run_config(["model=gmm", "metric=none"], tmp_path / "b")
    with open_dict(old):
        del old.model["family"], old.model["parameterisation"]
    before = fingerprint(old)[0]
    flow = fingerprint(compose_run_config(["model=gmm", "metric=none", "model.family=flow"], tmp_path / "c"))[0]
    assert now == before and flow != now


def test_a_classifier_term_is_not_taken_at_a_flow_models_pure_noise():
    """At tau = 1 (alpha = 0) condition_score would move x0 by noise^2 / alpha times the score: the step takes none;
    one step later it does."""
    from diffguide.guidance.base import GuidedPrediction
    from diffguide.models import gmm

    model = gmm.ring(family="flow")
    sampler = DDIM(5, clip_x0=False)
    levels = sampler.levels(model)
    x, score = torch.randn(2, 2), torch.ones(2, 2)
    pred = model.predict(x, levels[0], torch.tensor([0, 1]))
    first = sampler._finalize(model, x, levels[0], levels[1], GuidedPrediction(pred.x0, pred.eps, 1, score=score))
    assert torch.equal(first.x0, pred.x0) and torch.equal(first.eps, pred.eps) and first.score is None
    pred = model.predict(x, levels[1], torch.tensor([0, 1]))
    second = sampler._finalize(model, x, levels[1], levels[2], GuidedPrediction(pred.x0, pred.eps, 1, score=score))
    assert not torch.equal(second.x0, pred.x0)


def test_offshelf_refuses_its_ddim_form_on_a_flow_model_in_one_line(tiny_flow_path, tiny_evaluator_path):
    from tests.helpers import run_cli

    result = run_cli("diffguide.run", f"model.weights={tiny_flow_path}", "guidance=offshelf",
                     f"classifier.weights={tiny_evaluator_path}", "metric=none", "logger=none", "num_samples=2",
                     "out_dir=/tmp/diffguide-offshelf-flow-refusal")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "sampler=ddpm" in result.stderr
