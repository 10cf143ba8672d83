"""Every guidance config runs end to end through `diffguide.run`, on the exact mixture model and on the default
(tiny) UNet with the classifiers it needs, and reports the network evaluations its formula costs."""

import pytest
import torch

from diffguide.classifiers import noisy as noisy_lib
from diffguide.command.config import CONF_DIR
from diffguide.run import run
from diffguide.samplers.ddim import DDIM
from tests.helpers import compose_run_config

STEPS = 5
GUIDANCES = sorted(path.stem for path in (CONF_DIR / "guidance").glob("*.yaml"))
WEAK_GMM = ["~guidance.weak_model", "+guidance.weak_model={_target_:diffguide.models.gmm.image,num_classes:3,std:0.4}"]


def interval_nfe(model) -> int:
    """cfg_interval: 2 evaluations at the steps whose sigma lies in (0.19, 1.61] (the default preset, EDM2-XXL in
    Kynkaanniemi et al. 2024, Table 1), 1 elsewhere."""
    steps = DDIM(STEPS).timesteps(model)
    return sum(2 if 0.19 < model.sigma(t) <= 1.61 else 1 for t in steps)


# (overrides, network evaluations per trajectory) on model=gmm with STEPS DDIM steps
GMM_CASES = {
    "none": ([], STEPS),
    "cfg": (["scale=2.0"], 2 * STEPS),
    "cfgpp": (["scale=0.6"], 2 * STEPS),
    "cfg_rescale": ([], 2 * STEPS),
    "cfg_interval": ([], "interval"),
    "apg": ([], 2 * STEPS),
    "adaptive": (["guidance.gamma=1.0"], 2 * STEPS),  # a cosine never exceeds 1: guided at every step
    "cfg_zero_star": ([], 2 * (STEPS - 1)),          # the zero-initialised first step costs nothing
    "autoguidance": (WEAK_GMM, 2 * STEPS),
    "classifier": (["classifier=gmm_exact"], STEPS),
    "offshelf": (["classifier=gmm_clean"], STEPS),
    "gfcg": (["classifier=gmm_clean"], 3 * STEPS),
    "universal": (["classifier=gmm_clean", "guidance.recurrence=2"], 2 * 2 * STEPS),
    "distilled": (["model=gmm_distilled"], STEPS),   # the mixture's ideal student: CFG in one evaluation
    "apg_mix": ([], 2 * STEPS),
    "icg": ([], 2 * STEPS),                           # another class's exact prediction as the "null"
    "tcfg": ([], 2 * STEPS),
    "fdg": ([], 2 * STEPS),
    "mag": ([], 2 * STEPS),
}
# Methods that perturb the network itself: the exact mixture has no network, so they have no closed-form meaning
# there and refuse it in one line (the phrase each refusal holds)
GMM_REFUSED = {"pag": "network", "seg": "network", "slg": "network", "tsg": "no closed-form meaning"}


def test_every_method_has_a_pipeline_case():
    assert GUIDANCES == sorted([*GMM_CASES, *GMM_REFUSED])


@pytest.mark.parametrize("name", sorted(GMM_REFUSED))
def test_network_perturbation_methods_refuse_the_exact_mixture_in_one_line(tmp_path, name):
    from diffguide.errors import UserError

    cfg = compose_run_config(["model=gmm", f"guidance={name}", "metric=none", "logger=none", f"steps={STEPS}",
                              "num_samples=2", "precision=fp32"], tmp_path / name)
    with pytest.raises(UserError, match=GMM_REFUSED[name]) as info:
        run(cfg)
    assert "\n" not in str(info.value)
    assert not list((tmp_path / name).glob("samples/*.png"))


@pytest.mark.parametrize("name", sorted(GMM_CASES))
def test_every_method_runs_on_the_mixture_model(tmp_path, name):
    overrides, nfe = GMM_CASES[name]
    out = tmp_path / name
    cfg = compose_run_config(["model=gmm", f"guidance={name}", *overrides, "metric=none", "logger=none",
                              f"steps={STEPS}", "num_samples=6", "batch_size=3", "precision=fp32"], out)
    result = run(cfg)
    if nfe == "interval":
        from diffguide.models import gmm
        nfe = interval_nfe(gmm.image(num_classes=3))
    assert result["nfe"] == nfe
    assert len(list((out / "samples").glob("*.png"))) == 6


@pytest.fixture(scope="session")
def tiny_noisy_classifier_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny_noisy.safetensors"
    noisy_lib.save(noisy_lib.NoisyClassifier(channels=(8, 16), num_classes=10, groups=4), path)
    return path


@pytest.mark.parametrize("name, nfe_per_step", [("classifier", 1), ("offshelf", 1), ("gfcg", 3), ("universal", 2),
                                                ("autoguidance", 2)])
def test_classifier_and_weak_model_methods_run_on_the_unet(run_diffguide, tmp_path, tiny_unet_path,
                                                           tiny_evaluator_path, tiny_noisy_classifier_path, name,
                                                           nfe_per_step):
    assets = {"classifier": [f"classifier.weights={tiny_noisy_classifier_path}"],
              "autoguidance": [f"guidance.weak_model.weights={tiny_unet_path}"]}
    overrides = assets.get(name, [f"classifier.weights={tiny_evaluator_path}"])
    result = run_diffguide(tmp_path / name, f"guidance={name}", *overrides, "steps=3")
    assert result["nfe"] == 3 * nfe_per_step


@pytest.mark.parametrize("name, classifier", [("classifier", "fmnist_noisy_classifier"),
                                              ("offshelf", "fmnist_offshelf"), ("gfcg", "fmnist_offshelf"),
                                              ("universal", "fmnist_offshelf")])
def test_each_classifier_method_brings_its_default_classifier(tmp_path, name, classifier):
    cfg = compose_run_config([f"guidance={name}"], tmp_path)
    assert cfg.classifier.weights.endswith(f"{classifier}.safetensors")
    assert compose_run_config([f"guidance={name}", "classifier=gmm_clean", "model=gmm"],
                              tmp_path).classifier._target_.endswith("ExactMixtureCleanClassifier")
