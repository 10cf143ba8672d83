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


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return tiny_t2i.clip_folder(tmp_path_factory.mktemp("clip"))


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 16, 16), generator=g, dtype=torch.uint8) for _ in range(n)]


def test_clip_score_is_torchmetrics_clip_score_kept_per_sample(clip_path):
    """The mean of our per-sample CLIP scores is torchmetrics' CLIPScore on the same images, prompts and CLIP
    (torchmetrics/functional/multimodal/clip_score.py: `100 * (source_features * target_features).sum(axis=-1)`
    of normalised features, averaged)."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    from diffguide.metrics.text import TextMetrics

    images, prompts = _images(5), ["a red shirt", "a cat", "two shoes", "a bag", "a dress"]
    metric = TextMetrics(clip_model=str(clip_path), batch_size=2)
    metric.check(5)
    ours = metric.per_sample(images, prompts, torch.device("cpu"))["clip_score"]
    class Features(CLIPModel):
        """torchmetrics 1.9 expects the tensors transformers 4 returned from get_*_features; transformers 5
        returns an output whose pooler_output is that tensor (modeling_clip.py: `vision_outputs.pooler_output =
        self.visual_projection(pooled_output)`)."""

        def get_image_features(self, *args, **kwargs):
            return super().get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return super().get_text_features(*args, **kwargs).pooler_output

    peer = CLIPScore(model_name_or_path=lambda: (Features.from_pretrained(clip_path),
                                                 CLIPProcessor.from_pretrained(clip_path)))
    peer.update(torch.stack(images), prompts)
    assert ours.shape == (5,) and len(set(np.round(ours, 4))) == 5
    assert float(ours.mean()) == pytest.approx(max(float(peer.compute()), 0.0), abs=1e-4)


def test_pick_score_is_the_clip_models_own_logits(clip_path):
    """PickScore's model card: `scores = model.logit_scale.exp() * (text_embs @ image_embs.T)`; transformers'
    CLIPModel.forward gives the same as `logits_per_image`: its diagonal is each sample's score."""
    from transformers import CLIPModel, CLIPProcessor

    from diffguide.metrics.text import TextMetrics

    images, prompts = _images(3, seed=1), ["a red shirt", "a cat", "two shoes"]
    metric = TextMetrics(pickscore_model=str(clip_path))
    metric.check(3)
    ours = metric.per_sample(images, prompts, torch.device("cpu"))["pick_score"]
    model, processor = CLIPModel.from_pretrained(clip_path), CLIPProcessor.from_pretrained(clip_path)
    inputs = processor(text=prompts, images=[i for i in images], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert np.allclose(ours, torch.diagonal(logits).numpy(), atol=1e-4)


def test_a_text_run_scores_clip_score_with_intervals_and_paired_stats(sd_path, clip_path, tmp_path):
    """End to end: sd15 on its tiny pipeline, metric=text with a tiny CLIP: clip_score and its 95% interval in
    metrics.json, the per-sample scores in features.npz (what the report's paired differences resample)."""
    from diffguide.metrics.intervals import PointStats

    out = tmp_path / "run"
    cfg = compose_run_config(["model=sd15", f"model.source={sd_path}", "metric=text",
                              f"metric.clip_model={clip_path}", "metric.bootstrap=200", "logger=none", "steps=3",
                              "num_samples=6", "batch_size=3", "precision=fp32"], out)
    result = run(cfg)
    assert result["clip_score_lo"] <= result["clip_score"] <= result["clip_score_hi"]
    stats = PointStats.load(out / "features.npz")
    assert stats.clip_score.shape == (6,) and float(stats.clip_score.mean()) == pytest.approx(result["clip_score"])


TEXT_MISTAKES = [
    ("a missing prompt file", ["prompts.file=/nonexistent/prompts.txt"], "no such file"),
    ("a column the file lacks", ["prompts=parti", "prompts.file={tsv}"], "has no such column"),
    ("an empty prompt file", ["prompts.file={empty}"], "holds no prompts"),
    ("prompts to a class model", ["model=fmnist_unet", "prompts=smoke"], "class-conditional"),
    ("a classifier method on a text model", ["guidance=classifier"], "conditioned on prompts"),
    ("metric=text without a CLIP", ["metric=text"], "metric.clip_model"),
    ("CLIP weights that are not there", ["metric=text", "metric.clip_model=/nonexistent/clip"], "no such folder"),
]


@pytest.mark.parametrize("name,args,phrase", TEXT_MISTAKES, ids=[m[0] for m in TEXT_MISTAKES])
def test_text_mistakes_are_one_line_before_any_work(sd_path, tmp_path, name, args, phrase):
    """Every line of stderr counted (Hydra's, a library's, a traceback): exactly one, naming the mistake; exit 2;
    no sample written."""
    from tests.helpers import run_cli

    tsv = tmp_path / "parti.tsv"
    tsv.write_text("Text\tCategory\na cat\tanimals\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = [a.format(tsv=tsv, empty=empty) for a in args]
    extra = [] if any(a.startswith("metric=") for a in args) else ["metric=none"]
    model = [] if any(a.startswith("model=") for a in args) else ["model=sd15", f"model.source={sd_path}"]
    proc = run_cli("diffguide.run", *model, "logger=none", "steps=2", "num_samples=2",
                   f"out_dir={tmp_path / 'out'}", *extra, *args)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and phrase in lines[0], lines
    assert not list((tmp_path / "out").glob("samples/*.png"))


def test_prompts_longer_than_the_encoder_are_one_warning(sd_path, tmp_path):
    """The tiny CLIP tokenizer keeps 16 tokens (byte-level, no merges: one token a character): two of three
    prompts are longer, said once, in one line, with the count."""
    from diffguide.models import stable_diffusion

    from tests.helpers import run_cli

    proc = run_cli("diffguide.run", "model=sd15", f"model.source={sd_path}", "logger=none", "metric=none",
                   "steps=2", "num_samples=3", f"out_dir={tmp_path / 'out'}",
                   "prompts.list=[a cat,a very long prompt about a cat,another long prompt]")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 0, proc.stderr
    assert lines == ["diffguide: warning: 2 of 3 prompts are longer than the tokenizer's 16 tokens and are "
                     "truncated to them, as the pipeline does"], lines
    assert stable_diffusion.StableDiffusion.family == "sd"


def test_the_report_pairs_text_runs_prompt_by_prompt(sd_path, clip_path, tmp_path):
    """Two methods on the same prompts and seeds: the report gives the paired CLIP-score difference with its
    interval, the per-prompt win rate (worked here from the two features.npz files: the share of samples scoring
    higher, ties half), the equivalent CFG scale each logged, and the compute-matched CFG line for APG."""
    from diffguide import report
    from diffguide.metrics.intervals import PointStats

    sweep = tmp_path / "sweep"
    for method, scale in (("cfg", 3), ("apg", 6)):
        cfg = compose_run_config(["model=sd15", f"model.source={sd_path}", "metric=text",
                                  f"metric.clip_model={clip_path}", "metric.bootstrap=100", "logger=none", "steps=3",
                                  "num_samples=8", "batch_size=4", "precision=fp32", f"guidance={method}",
                                  f"scale={scale}", "equivalent_scale=true"], sweep / method)
        run(cfg)
    rows, skipped = report.collect(sweep)
    assert not skipped
    table, notes = report.report(rows, "cfg")
    a, b = PointStats.load(sweep / "apg" / "features.npz"), PointStats.load(sweep / "cfg" / "features.npz")
    expected = float((a.clip_score > b.clip_score).mean() + 0.5 * (a.clip_score == b.clip_score).mean())
    apg = next(r for r in rows if r["guidance"] == "apg")
    assert apg["win_clip_score"] == pytest.approx(expected)
    assert apg["delta_clip_score"] == pytest.approx(float(a.clip_score.mean() - b.clip_score.mean()), abs=1e-6)
    assert "clip_score wins vs cfg" in table and f"{expected:.1%}" in table
    assert any(n.startswith("apg 6: compute-matched CFG: guidance=cfg scale=") and "steps=3" in n for n in notes), notes
