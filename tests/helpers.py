"""Helpers that test modules import (fixtures stay in the conftest files): the tiny models' settings, a toy
denoiser and a linear classifier worked out by hand, composing the run config, running a CLI."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from diffguide.classifiers.clean import CleanClassifier
from diffguide.command.checks import compose_point
from diffguide.models.denoiser import Denoiser

ROOT = Path(__file__).resolve().parent.parent

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

    def _output(self, x, t, labels):
        self.calls.append(x.shape[0])
        y = torch.where(labels == self.null_class, -1, labels).to(x.dtype).view(-1, 1, 1, 1)
        return 0.5 * x + 0.1 * (y + 1) + t.to(x.dtype).view(-1, 1, 1, 1) / 1000


def toy_images(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright squares at class-dependent positions (4 classes), uint8 28x28: something a UNet can learn in a few
    steps."""
    labels = torch.arange(n) % 4
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    for i, y in enumerate(labels.tolist()):
        images[i, 0, 4 + 5 * y:10 + 5 * y, 6:20] = 255
    return images, labels


#: the weights of the linear test classifier: three classes over 2x2 images
W = torch.tensor([[1.0, 0.0, -1.0, 0.5], [0.0, 2.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])


class LinearClassifier(CleanClassifier):
    """f_k(x0) = W_k . flatten(x0): its input gradients are the rows of W."""

    def __init__(self, weight):
        super().__init__()
        self.register_buffer("weight", weight)
        self.num_classes = weight.shape[0]

    def classify(self, x0):
        return x0.flatten(1) @ self.weight.T


def compose_run_config(overrides: list[str], out_dir: Path):
    """The run config exactly as `python -m diffguide.run OVERRIDES out_dir=OUT` composes it, with HydraConfig set."""
    cfg = compose_point([*overrides, f"out_dir={out_dir}"])
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def interruptible() -> None:
    """A child's preexec_fn: SIGINT back to its default, so that the child's Python turns it into KeyboardInterrupt.
    A suite started from a background shell (`make test &`, CI) hands its children SIGINT as ignored (POSIX: a
    non-interactive shell's background jobs ignore SIGINT, and the disposition is inherited across exec), and a
    Ctrl-C test would then see a run that finishes instead of stopping."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def learned_variance_step(sampler, denoiser, guidance, x, labels, timesteps, i, noise):
    """One step of `Sampler.sample` from x at timesteps[i] with sampler.variance=learned: (prediction, x_next)."""
    levels = [denoiser.level(t) for t in timesteps]
    t, t_next = levels[i], denoiser.level(timesteps[i + 1] if i + 1 < len(timesteps) else -1)
    denoiser.capture_variance(True)
    try:
        pred = sampler._finalize(denoiser, x, t, t_next, guidance(denoiser, x, t, labels))
        pred.log_variance = sampler.model_log_variance(denoiser, guidance, labels, levels, i)
    finally:
        denoiser.capture_variance(False)
    return pred, sampler.update(denoiser, x, t, t_next, pred, noise)


def constant_noise(z: torch.Tensor):
    """A noise source that returns z at every draw (and counts the draws)."""
    draws = []

    def noise():
        draws.append(1)
        return z.clone()

    noise.draws = draws
    return noise


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def guider_prediction(guider, cond, uncond):
    """A diffusers guider's prediction from the conditional and unconditional outputs, at step 0 of 10."""
    guider.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(500))
    return guider.forward(cond, uncond).pred


def network_outputs(model, x, t, labels):
    """(o_c, o_u): the network's own outputs (eps, or a flow model's velocity)."""
    uncond, cond = model.pair(x, t, labels)
    return model.output(cond, x, t), model.output(uncond, x, t)


def assert_refused_in_one_line(check, match: str) -> None:
    """`check()` raises a one-line UserError matching `match`."""
    from diffguide.errors import UserError

    import pytest

    with pytest.raises(UserError, match=match) as err:
        check()
    assert "\n" not in str(err.value)


def without_null_class() -> "ToyDenoiser":
    """The toy denoiser with no null class (no unconditional prediction)."""
    toy = ToyDenoiser()
    toy.null_class = None
    return toy


def guidance_config(name: str):
    """conf/guidance/NAME.yaml instantiated as `python -m diffguide.run guidance=NAME` composes it."""
    from hydra.utils import instantiate

    return instantiate(compose_point([f"guidance={name}", "out_dir=/tmp/unused"]).guidance)
