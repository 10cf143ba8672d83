import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from diffguide.cli import compose_point
from diffguide.metrics import evaluator as evaluator_lib
from diffguide.models import unet as unet_lib
from diffguide.models.denoiser import Denoiser

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_MODE", "disabled")

TINY_UNET = dict(sample_size=28, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
                 down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                 norm_num_groups=4)
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}


class ToyDenoiser(Denoiser):
    """A denoiser whose outputs a test can work out by hand: eps(x, t, y) = 0.5 x + 0.1 (y + 1) + t / 1000,
    with y = -1 for the null class, in every one of its `channels` channels. It counts its forward passes and the
    batch sizes they had."""

    def __init__(self, num_classes: int = 3, channels: int = 1):
        super().__init__(torch.linspace(0.999, 0.01, 1000, dtype=torch.float64), (channels, 2, 2), num_classes,
                         null_class=num_classes, scheduler_config=SCHEDULE)
        self.calls = []

    @staticmethod
    def eps_formula(x, t, label, null_class):
        y = -1 if label == null_class else label
        return 0.5 * x + 0.1 * (y + 1) + t / 1000

    def _eps(self, x, t, labels):
        self.calls.append(x.shape[0])
        y = torch.where(labels == self.null_class, -1, labels).to(x.dtype).view(-1, 1, 1, 1)
        return 0.5 * x + 0.1 * (y + 1) + t.to(x.dtype).view(-1, 1, 1, 1) / 1000


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


def compose_run_config(overrides: list[str], out_dir: Path):
    """The run config exactly as `python -m diffguide.run OVERRIDES out_dir=OUT` composes it, with HydraConfig set."""
    cfg = compose_point([*overrides, f"out_dir={out_dir}"])
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


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


def run_cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def learned_variance_step(sampler, denoiser, guidance, x, labels, timesteps, i, noise):
    """One step of `Sampler.sample` from x at timesteps[i] with sampler.variance=learned: (prediction, x_next)."""
    t, t_next = timesteps[i], timesteps[i + 1] if i + 1 < len(timesteps) else -1
    denoiser.capture_variance(True)
    try:
        pred = sampler._finalize(denoiser, x, t, t_next, guidance(denoiser, x, t, labels))
        pred.log_variance = sampler.model_log_variance(denoiser, guidance, labels, timesteps, i)
    finally:
        denoiser.capture_variance(False)
    return pred, sampler.update(denoiser, x, t, t_next, pred, noise)
