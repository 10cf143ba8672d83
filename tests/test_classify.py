"""`python -m diffguide.classify` and the metric key metric.diffusion_classifier: the Diffusion Classifier (Li et al.
2023; official code diffusion-classifier/diffusion-classifier, eval_prob_adaptive.py) over a data set."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffguide import classify as classify_cli
from diffguide.classifiers import diffusion
from diffguide.data import fashion_mnist
from diffguide.metrics.fmnist import FashionMNISTMetrics
from diffguide.models import gmm, unet as unet_lib
from diffguide.store.samples import sample_path
from diffguide.data.fashion_mnist import to_model_range

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GMM = ["model=gmm", "model.std=1.5", "num_images=60", "n_samples=[4,12]", "to_keep=[2,1]", "precision=fp32",
       "device=cpu", "batch_size=25"]


def test_cli_on_the_mixture_writes_what_the_core_finds(tmp_path, capsys):
    """eval_prob_adaptive.py's `--to_keep 2 1 --n_samples 4 12` on exact draws of the mixture (model=gmm draws its
    points with sample_data, seeded by `seed`): classify.json's accuracy, confusion and nfe are the core's."""
    out = tmp_path / "run"
    assert classify_cli.entry([*GMM, f"out_dir={out}"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    summary = json.loads(captured.out.strip().splitlines()[-1])
    result = json.loads((out / "classify.json").read_text())
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("accuracy", "accuracy_lo", "accuracy_hi", "per_class_accuracy", "confusion", "nfe_per_image",
                "wall_s", "images_per_s", "settings", "num_images"):
        assert key in result
    model = gmm.image(std=1.5)
    x, y = model.sample_data(60, torch.Generator().manual_seed(0))
    found = diffusion.classify(model, x, [4, 12], [2, 1], seed=0)
    accuracy = float((found.predictions == y).double().mean())
    assert result["accuracy"] == pytest.approx(accuracy) == summary["accuracy"]
    assert 0 < accuracy < 1 and result["accuracy_lo"] < accuracy < result["accuracy_hi"]
    assert result["nfe_per_image"] == found.nfe == 3 * 4 + 2 * 8
    confusion = np.zeros((3, 3), dtype=int)
    np.add.at(confusion, (y.numpy(), found.predictions.numpy()), 1)
    assert result["confusion"] == confusion.tolist() and result["num_images"] == 60
    assert result["settings"]["n_samples"] == [4, 12] and result["settings"]["model"]["std"] == 1.5


def test_wilson_interval():
    low, high = classify_cli.wilson(45, 50)
    assert (round(low, 4), round(high, 4)) == (0.7864, 0.9565)  # Wilson 1927: p = 0.9, n = 50, z = 1.96


def test_a_bad_setting_is_one_line_and_exit_2_and_nothing_written(tmp_path):
    """The official script asserts len(to_keep) == len(n_samples); here every bad setting (to_keep above the
    model's 3 classes) is one line on stderr (all its lines counted) and exit 2, before any file is written."""
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "diffguide.classify", "model=gmm", "n_samples=[4,12]",
                           "to_keep=[5,1]", f"out_dir={out}"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("diffguide: error: to_keep=[5, 1] keeps more classes than the model has (3)")
    assert not out.exists() and proc.stdout == ""


@pytest.mark.parametrize("overrides, match", [
    (["bogus=1"], "bogus is not a key; the keys are: batch_size, device"),
    (["n_samples=[4,12]", "to_keep=[2]"], "one entry per stage"),
    (["model=gmm", "indices=[1,2]", "to_keep=[2,1]"], "model=gmm draws its points"),
    (["model=gmm", "num_images=0"], "num_images=0: use a whole number >= 1"),
])
def test_bad_settings_in_process(tmp_path, capsys, overrides, match):
    assert classify_cli.entry([*overrides, f"out_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not (tmp_path / "x").exists()


def test_metric_key_scores_samples_with_the_generators_own_model(tmp_path, tiny_unet_path, tiny_evaluator_path):
    """metric.diffusion_classifier: class_accuracy_diffusion is the share of the samples' PNGs that the Diffusion
    Classifier of the model (here the tiny UNet) assigns to their generated class: the core's accuracy on the same
    images."""
    images, labels = fashion_mnist.load("test")
    images, labels = images[:8], labels[:8].clone()
    labels[:3] = (labels[:3] + 1) % 10
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(sample_path(tmp_path, i))
    model = unet_lib.load(str(tiny_unet_path))
    node = {"model": model, "n_samples": [2, 4], "to_keep": [3, 1], "seed": 1, "batch_size": 5}
    metric = FashionMNISTMetrics(str(tiny_evaluator_path), fid=False, isc=False, kid=False, prc=False,
                                 class_accuracy=False, bootstrap=0, fid_inf=False, cache_root=str(tmp_path / "c"),
                                 diffusion_classifier=node)
    metric.check(8)
    scores = metric(tmp_path, labels.tolist(), torch.device("cpu"))
    found = diffusion.classify(model, to_model_range(images), [2, 4], [3, 1], seed=1)
    assert scores["class_accuracy_diffusion"] == pytest.approx(float((found.predictions == labels).double().mean()))
    assert scores["class_accuracy_diffusion_lo"] <= scores["class_accuracy_diffusion"] <= \
        scores["class_accuracy_diffusion_hi"]
    bad = FashionMNISTMetrics(str(tiny_evaluator_path), diffusion_classifier={**node, "to_keep": [3, 2]})
    with pytest.raises(Exception, match="must end with 1"):
        bad.check(8)
