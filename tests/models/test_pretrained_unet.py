"""model=ddpm_cifar10 through the config path a user takes, on a tiny unconditional UNet2DModel saved as a diffusers
pipeline folder: unguided sampling equals diffusers' DDIM pipeline, and classifier-free methods are refused.

diffguide clips x0 and re-derives eps from the clipped x0 (guided-diffusion's convention), which is DDIMPipeline's
use_clipped_model_output=True; its default keeps the unclipped eps."""

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from PIL import Image

from diffguide.errors import UserError
from diffguide.run import run
from tests.helpers import compose_run_config


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ddpm")
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=True))
    pipe.save_pretrained(path)
    return path


def test_unguided_sampling_equals_diffusers_ddim(ddpm_folder, tmp_path):
    out = tmp_path / "run"
    cfg = compose_run_config(["model=ddpm_cifar10", f"model.source={ddpm_folder}", "guidance=none", "metric=none",
                              "logger=none", "steps=5", "sampler.spacing=leading", "num_samples=2", "seed=3",
                              "precision=fp32"], out)
    assert run(cfg)["nfe"] == 5
    pipe = DDIMPipeline.from_pretrained(ddpm_folder)
    for i in range(2):
        theirs = pipe(batch_size=1, num_inference_steps=5, eta=0.0, output_type="np", use_clipped_model_output=True,
                      generator=torch.Generator().manual_seed(3 + i)).images[0]
        ours = np.asarray(Image.open(out / "samples" / f"{i:06d}.png").convert("RGB"), dtype=np.float64) / 255
        assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_a_v_or_x0_prediction_model_equals_diffusers_ddim(tmp_path, prediction_type):
    """The scheduler config's prediction_type picks the parameterisation adapter: DDIMScheduler.step's
    `pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output` (v_prediction) or
    `pred_original_sample = model_output` (sample), clipped, eps re-derived from the clipped x0."""
    torch.manual_seed(1)
    folder = tmp_path / "pipe"
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=True, prediction_type=prediction_type)
    DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    out = tmp_path / "run"
    cfg = compose_run_config(["model=ddpm_cifar10", f"model.source={folder}", "guidance=none", "metric=none",
                              "logger=none", "steps=5", "sampler.spacing=leading", "num_samples=1", "seed=3",
                              "precision=fp32"], out)
    run(cfg)
    theirs = DDIMPipeline.from_pretrained(folder)(batch_size=1, num_inference_steps=5, eta=0.0, output_type="np",
                                                  use_clipped_model_output=True,
                                                  generator=torch.Generator().manual_seed(3)).images[0]
    ours = np.asarray(Image.open(out / "samples" / "000000.png").convert("RGB"), dtype=np.float64) / 255
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6


def test_cfg_on_an_unconditional_model_is_refused(ddpm_folder, tmp_path):
    cfg = compose_run_config(["model=ddpm_cifar10", f"model.source={ddpm_folder}", "guidance=cfg", "metric=none",
                              "logger=none"], tmp_path / "run")
    with pytest.raises(UserError, match="null class"):
        run(cfg)


def test_the_default_metric_of_the_model_is_inception(tmp_path):
    cfg = compose_run_config(["model=ddpm_cifar10"], tmp_path)
    assert cfg.metric._target_.endswith("InceptionMetrics") and cfg.metric.reference == "cifar10-train"
