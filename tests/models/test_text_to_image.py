"""Text-to-image families through the path a user takes (`model=sd15 model.source=FOLDER prompts=...`), on tiny
random pipelines built from config and saved locally (tests/tiny_t2i.py), cross-checked against the diffusers
pipeline of each family: same prompt, negative prompt, initial noise (sample i: seed + i), scheduler, steps and
guidance scale give the same images to 1/255 (both end in uint8)."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffguide.run import run
from tests import tiny_t2i
from tests.helpers import compose_run_config

PROMPTS = ["a red shirt", "two black shoes", "a small blue bag"]


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return tiny_t2i.sd_folder(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def sd_v_path(tmp_path_factory):
    return tiny_t2i.sd_folder(tmp_path_factory.mktemp("sdv"), prediction_type="v_prediction")


@pytest.fixture(scope="module")
def sdxl_path(tmp_path_factory):
    return tiny_t2i.sdxl_folder(tmp_path_factory.mktemp("sdxl"))


def _ours(out, n):
    return [np.asarray(Image.open(out / "samples" / f"{i:06d}.png").convert("RGB"), dtype=np.float64) / 255
            for i in range(n)]


def _run(model, folder, out, *extra, steps=4, scale=3.0, seed=5, n=3):
    cfg = compose_run_config([f"model={model}", f"model.source={folder}", "metric=none", "logger=none",
                              "guidance=cfg", f"scale={scale}", f"steps={steps}", "sampler.spacing=leading",
                              "sampler.clip_x0=false", f"num_samples={n}", "batch_size=2", f"seed={seed}",
                              "precision=fp32", f"prompts.list=[{','.join(PROMPTS)}]", *extra], out)
    return run(cfg)


def _compare(pipe, out, n, steps, scale, seed, negative=None, **kwargs):
    worst = 0.0
    for i, ours in enumerate(_ours(out, n)):
        theirs = pipe(PROMPTS[i % len(PROMPTS)], negative_prompt=negative, guidance_scale=scale,
                      num_inference_steps=steps, output_type="np",
                      generator=torch.Generator().manual_seed(seed + i), **kwargs).images[0]
        worst = max(worst, float(np.abs(ours - theirs).max()))
    assert worst <= 1 / 255 + 1e-6, worst


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_sd_cfg_ddim_matches_stable_diffusion_pipeline(sd_path, tmp_path, negative):
    """StableDiffusionPipeline (pipeline_stable_diffusion.py, __call__): `noise_pred_uncond + guidance_scale *
    (noise_pred_text - noise_pred_uncond)` on the UNet's eps under the encoded prompt and the encoded negative (or
    empty) prompt, DDIMScheduler.step at its leading timesteps; ours: guidance=cfg on the same Denoiser path."""
    from diffusers import StableDiffusionPipeline

    extra = [f"prompts.negative_prompt={negative}"] if negative else []
    result = _run("sd15", sd_path, tmp_path / "ours", *extra)
    assert result["nfe"] == 8
    pipe = StableDiffusionPipeline.from_pretrained(sd_path, safety_checker=None, requires_safety_checker=False)
    _compare(pipe, tmp_path / "ours", 3, 4, 3.0, 5, negative=negative)


def test_sd_v_prediction_euler_matches_the_pipeline(sd_v_path, tmp_path):
    """SD 2.x predicts v (scheduler config prediction_type=v_prediction): the same images as the pipeline with its
    EulerDiscreteScheduler (sigma space: diffguide's euler follows that scheduler's grid)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    _run("sd21", sd_v_path, tmp_path / "ours", "sampler=euler")
    pipe = StableDiffusionPipeline.from_pretrained(sd_v_path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    _compare(pipe, tmp_path / "ours", 3, 4, 3.0, 5)


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_sdxl_cfg_euler_matches_the_sdxl_pipeline(sdxl_path, tmp_path, negative):
    """StableDiffusionXLPipeline: two encoders, the pooled embedding and add_time_ids in added_cond_kwargs; with no
    negative prompt and force_zeros_for_empty_prompt the null condition is zeros (pipeline_stable_diffusion_xl.py:
    `zero_out_negative_prompt = negative_prompt is None and self.config.force_zeros_for_empty_prompt`)."""
    from diffusers import StableDiffusionXLPipeline

    extra = [f"prompts.negative_prompt={negative}"] if negative else []
    _run("sdxl", sdxl_path, tmp_path / "ours", "sampler=euler", *extra)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_path)
    _compare(pipe, tmp_path / "ours", 3, 4, 3.0, 5, negative=negative)


def test_prompts_travel_with_the_samples(sd_path, tmp_path):
    """labels.csv (quoted CSV) and each PNG name sample i's prompt (i mod P), its negative prompt and seed;
    images_per_prompt=k makes P * k samples; metrics.json names the set's digest."""
    out = tmp_path / "run"
    cfg = compose_run_config(["model=sd15", f"model.source={sd_path}", "metric=none", "logger=none", "steps=2",
                              "num_samples=1000", "precision=fp32", "prompts.images_per_prompt=2",
                              "prompts.list=['a red shirt, with a comma',two shoes]",
                              "prompts.negative_prompt=ugly"], out)
    result = run(cfg)
    assert result["num_samples"] == 4
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert [r["prompt"] for r in rows] == ["a red shirt, with a comma", "two shoes"] * 2
    assert {r["negative_prompt"] for r in rows} == {"ugly"}
    meta = json.loads(Image.open(out / "samples" / "000003.png").text["diffguide"])
    assert (meta["prompt"], meta["negative_prompt"], meta["seed"], meta["label"]) == ("two shoes", "ugly", 3, 1)
    assert len(result["prompt_set"]["digest"]) == 16


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory):
    return tiny_t2i.sd3_folder(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def flux_dev_path(tmp_path_factory):
    return tiny_t2i.flux_folder(tmp_path_factory.mktemp("flux_dev"), guidance_embeds=True)


@pytest.fixture(scope="module")
def flux_schnell_path(tmp_path_factory):
    return tiny_t2i.flux_folder(tmp_path_factory.mktemp("flux_schnell"), guidance_embeds=False)


@pytest.fixture(scope="module")
def pixart_path(tmp_path_factory):
    return tiny_t2i.pixart_folder(tmp_path_factory.mktemp("pixart"))


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_sd3_cfg_matches_the_sd3_pipeline(sd3_path, tmp_path, negative):
    """StableDiffusion3Pipeline: CFG on the transformer's velocity (`noise_pred_uncond + self.guidance_scale *
    (noise_pred_text - noise_pred_uncond)`), FlowMatchEulerDiscreteScheduler (shift 3) at the scheduler's timesteps
    (sigma x 1000) as the transformer's time, latents / scaling_factor + shift_factor into the VAE."""
    from diffusers import StableDiffusion3Pipeline

    extra = [f"prompts.negative_prompt={negative}"] if negative else []
    _run("sd3", sd3_path, tmp_path / "ours", "sampler=euler", *extra)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_path)
    _compare(pipe, tmp_path / "ours", 3, 4, 3.0, 5, negative=negative, height=16, width=16)


def test_flux_dev_distilled_guidance_matches_the_flux_pipeline(flux_dev_path, tmp_path):
    """FluxPipeline (pipeline_flux.py): no CFG by default; `guidance = torch.full([1], guidance_scale)` goes into the
    transformer's guidance embedding, `timestep=timestep / 1000`, latents packed 2x2, the grid
    linspace(1, 1/N, N) shifted by mu = calculate_shift(image tokens): guidance=distilled scale=3.5, one evaluation
    per step."""
    from diffusers import FluxPipeline

    result = _run("flux_dev", flux_dev_path, tmp_path / "ours", "sampler=euler", "guidance=distilled",
                  "model.resolution=16", scale=3.5)
    assert result["nfe"] == 4
    pipe = FluxPipeline.from_pretrained(flux_dev_path)
    _compare(pipe, tmp_path / "ours", 3, 4, 3.5, 5, height=16, width=16)


def test_flux_true_cfg_matches_the_pipelines_true_cfg_scale(flux_schnell_path, tmp_path):
    """FluxPipeline with a negative prompt and true_cfg_scale > 1: `noise_pred = neg_noise_pred + true_cfg_scale *
    (noise_pred - neg_noise_pred)`: guidance=cfg scale=true_cfg_scale with prompts.negative_prompt (schnell: no
    guidance input, no dynamic shifting)."""
    from diffusers import FluxPipeline

    _run("flux_schnell", flux_schnell_path, tmp_path / "ours", "sampler=euler", "model.resolution=16",
         "prompts.negative_prompt=blurry", scale=2.5)
    pipe = FluxPipeline.from_pretrained(flux_schnell_path)
    _compare(pipe, tmp_path / "ours", 3, 4, 1.0, 5, negative="blurry", true_cfg_scale=2.5, height=16, width=16,
             max_sequence_length=256)  # conf/model/flux_schnell.yaml's: T5 sees its padding, so the length counts


def test_pixart_sigma_cfg_matches_the_pixart_pipeline(pixart_path, tmp_path):
    """PixArtSigmaPipeline: CFG on eps of a learned-variance DiT (`noise_pred.chunk(2, dim=1)[0]`), T5 embeddings
    with their attention mask, the negative prompt "" by default (resolution binning off: diffguide samples the
    size given)."""
    from diffusers import PixArtSigmaPipeline

    _run("pixart_sigma", pixart_path, tmp_path / "ours", "prompts.negative_prompt=''")
    pipe = PixArtSigmaPipeline.from_pretrained(pixart_path)
    _compare(pipe, tmp_path / "ours", 3, 4, 3.0, 5, negative="", use_resolution_binning=False, clean_caption=False)
