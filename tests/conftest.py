import os
from pathlib import Path

import pytest
import torch

from diffguide.models import unet as unet_lib
from diffguide.classifiers import evaluator as evaluator_lib
from tests.helpers import SCHEDULE, TINY_UNET, ToyDenoiser, compose_run_config

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def toy():
    return ToyDenoiser()


@pytest.fixture(scope="session")
def tiny_unet_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny_unet.safetensors"
    unet_lib.save(unet_lib.build(TINY_UNET, 10, SCHEDULE), path)
    return path


@pytest.fixture(scope="session")
def tiny_evaluator_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny_evaluator.safetensors"
    evaluator_lib.save(evaluator_lib.Evaluator("test_resnet"), path)
    return path


@pytest.fixture(scope="session")
def fidelity_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fidelity-cache")


@pytest.fixture
def run_diffguide(tiny_unet_path, tiny_evaluator_path, fidelity_cache):
    """Run the pipeline in-process on the tiny models; returns the metrics dict."""
    from diffguide.run import run

    def _run(out_dir: Path, *overrides: str, metric: bool = False):
        base = [f"model.weights={tiny_unet_path}", "logger=none", "steps=3", "num_samples=6", "batch_size=4"]
        if metric:
            base += [f"metric.evaluator={tiny_evaluator_path}", f"metric.cache_root={fidelity_cache}"]
        else:
            base += ["metric=none"]
        return run(compose_run_config([*base, *overrides], out_dir))

    return _run
