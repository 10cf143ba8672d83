"""DiT through the same config path a user takes (`model=dit_xl_2_256 model.source=FOLDER`), on a tiny random DiT
and VAE saved the way the hub lays out facebook/DiT-XL-2-256; cross-checked against diffusers' DiTPipeline."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from PIL import Image

from diffguide.errors import UserError
from diffguide.guidance.none import NoGuidance
from diffguide.models import dit
from diffguide.run import run
from diffguide.samplers.ddpm import DDPM
from tests.helpers import compose_run_config, learned_variance_step

NUM_CLASSES = 1000


def tiny_dit_folder(path):
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                        num_attention_heads=2, in_channels=4, out_channels=8,
                                        num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero",
                                        norm_elementwise_affine=False, norm_num_groups=32)
    # the random init zeroes DiT's final projection (adaLN-zero): give it weights so eps depends on x, t and y
    for p in transformer.parameters():
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.02)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                              clip_sample=False)
    transformer.save_pretrained(path / "transformer")
    vae.save_pretrained(path / "vae")
    scheduler.save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "_diffusers_version": "0.42.1",
                                                       "scheduler": ["diffusers", "DDIMScheduler"],
                                                       "transformer": ["diffusers", "DiTTransformer2DModel"],
                                                       "vae": ["diffusers", "AutoencoderKL"]}))
    return path


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    return tiny_dit_folder(tmp_path_factory.mktemp("dit"))


def test_cfg_ddim_matches_ditpipeline(dit_folder, tmp_path):
    """Same initial noise (sample i: seed + i), scheduler, steps and scale: guidance=cfg sampler=ddim gives the
    images DiTPipeline gives, to 1/255 (both end in uint8 PNGs; the float images agree to 1e-4)."""
    steps, scale, seed = 6, 3.0, 11
    out = tmp_path / "ours"
    cfg = compose_run_config(["model=dit_xl_2_256", f"model.source={dit_folder}", "metric=none", "logger=none",
                              "guidance=cfg", f"scale={scale}", f"steps={steps}", "sampler.spacing=leading",
                              "sampler.clip_x0=false", "num_samples=3", "batch_size=2", f"seed={seed}",
                              "precision=fp32"], out)
    result = run(cfg)
    assert result["nfe"] == 2 * steps

    pipe = DiTPipeline.from_pretrained(dit_folder)
    for i in range(3):
        label = i % NUM_CLASSES  # diffguide's labels: sample i gets class i mod K
        theirs = pipe(class_labels=[label], guidance_scale=scale, num_inference_steps=steps, output_type="np",
                      generator=torch.Generator().manual_seed(seed + i)).images[0]
        ours = np.asarray(Image.open(out / "samples" / f"{i:06d}.png").convert("RGB"), dtype=np.float64) / 255
        assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6


def test_latents_decode_in_batches(dit_folder):
    model = dit.load(str(dit_folder), decode_batch_size=2)
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model_all = dit.load(str(dit_folder), decode_batch_size=64)
    assert model.sample_shape == (4, 8, 8) and model.null_class == 1000 and model.data_range is None
    assert torch.allclose(model.decode(latents), model_all.decode(latents), atol=1e-5)


def test_a_missing_model_offline_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError) as err:
        dit.load("facebook/DiT-XL-2-256")
    message = str(err.value)
    assert "\n" not in message and "facebook/DiT-XL-2-256" in message and "HF_HUB_OFFLINE" in message
    assert str(tmp_path / "cache") in message and "model.source=" in message


@pytest.mark.parametrize("guidance, nfe_per_step", [("offshelf", 1), ("universal", 2), ("gfcg", 3)])
def test_classifier_methods_see_the_decoded_x0_of_a_latent_model(dit_folder, tmp_path, guidance, nfe_per_step):
    """An ImageNet timm classifier (tiny, local weights) guides the latent DiT through its VAE decoder."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "clf.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet10t", num_classes=NUM_CLASSES).state_dict()
               .items()}, str(weights))
    cfg = compose_run_config(["model=dit_xl_2_256", f"model.source={dit_folder}", "metric=none", "logger=none",
                              f"guidance={guidance}", "classifier=imagenet_resnet50", "classifier.model_name=resnet10t",
                              f"classifier.weights={weights}", f"classifier.num_classes={NUM_CLASSES}", "steps=3",
                              "num_samples=2", "precision=fp32"], tmp_path / "run")
    assert run(cfg)["nfe"] == 3 * nfe_per_step


def test_the_classifier_gradient_reaches_the_latents_through_the_decoder(dit_folder):
    from diffguide.classifiers.clean import CleanClassifier

    class MeanRed(CleanClassifier):
        num_classes = 2

        def classify(self, images):
            red = images[:, 0].mean((1, 2))
            return torch.stack([red, -red], 1)

    model = dit.load(str(dit_folder))
    clf = MeanRed().attach(model)
    latents = torch.randn(1, 4, 8, 8, requires_grad=True)
    clf.logits(latents)[0, 0].backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def _learned_range(model, steps):
    """diffusers' DDPMScheduler with improved DDPM's learned-range variance, on DiT's respacing (linspace)."""
    scheduler = DDPMScheduler.from_config(model.scheduler_config, variance_type="learned_range", clip_sample=False,
                                          timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("i", [0, 4, 9])
def test_one_learned_variance_ddpm_step_matches_diffusers_learned_range(dit_folder, i):
    """diffusers' DDPMScheduler.step with variance_type="learned_range" on the full 8-channel output (eps, then
    v): `variance = self._get_variance(t, predicted_variance=predicted_variance); variance = torch.exp(0.5 * variance)
    * variance_noise`. Today's DDPM drops v (LatentDiT._eps: `return out[:, :self.latent_channels]`) and steps with
    the fixed posterior variance."""
    model = dit.load(str(dit_folder))
    assert model.learned_variance
    sampler, guidance = DDPM(10, spacing="linspace", clip_x0=False, variance="learned"), NoGuidance()
    timesteps = sampler.timesteps(model)
    scheduler = _learned_range(model, 10)
    assert timesteps == [int(t) for t in scheduler.timesteps]  # their previous_timestep is our t_next
    t = timesteps[i]
    x, labels = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([5, 17])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    _, ours = learned_variance_step(sampler, model, guidance, x, labels, timesteps, i, lambda: z)

    output = model.transformer(x, timestep=torch.full((2,), t), class_labels=labels).sample
    assert output.shape[1] == 8
    theirs = scheduler.step(output, t, x, generator=torch.Generator().manual_seed(4)).prev_sample
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_a_learned_variance_trajectory_matches_a_diffusers_learned_range_loop(dit_folder):
    """10 DDPM steps, guidance=none, per-sample noise (Sampler.sample's `noise()`: `torch.randn(shape, generator=g)`
    for each sample's generator g): the loop over DDPMScheduler(variance_type="learned_range").step, one sample at a
    time with the same generator, to 1e-4 plus 2e-6 of the trajectory's largest value: the random tiny DiT drives
    the samples to a few hundred, where float32's spacing is 3e-5, and the two loops round in different orders (the
    error seen here: 2e-4 at a largest value of 474)."""
    model = dit.load(str(dit_folder))
    labels, steps = torch.tensor([3, 999]), 10
    generators = [torch.Generator().manual_seed(20 + k) for k in range(2)]
    x_T = torch.stack([torch.randn(4, 8, 8, generator=g) for g in generators])
    ours, nfe = DDPM(steps, spacing="linspace", clip_x0=False, variance="learned").sample(
        model, NoGuidance(), x_T, labels, generators)
    assert nfe == steps
    for k in range(2):
        g = torch.Generator().manual_seed(20 + k)
        x = torch.randn(1, 4, 8, 8, generator=g)
        scheduler = _learned_range(model, steps)
        for t in scheduler.timesteps:
            output = model.transformer(x, timestep=t.view(1), class_labels=labels[k:k + 1]).sample
            x = scheduler.step(output, t, x, generator=g).prev_sample
        error = (ours[k] - x[0]).abs().max()
        assert error <= 1e-4 + 2e-6 * x[0].abs().max(), error
    fixed, _ = DDPM(steps, spacing="linspace", clip_x0=False).sample(
        model, NoGuidance(), x_T, labels, [torch.Generator().manual_seed(20 + k) for k in range(2)])
    assert not torch.allclose(fixed, ours, atol=1e-3)


def test_the_dit_paper_protocol_runs_from_the_readme_command(dit_folder, tmp_path):
    """The README's DiT command (sampler=ddpm sampler.spacing=linspace sampler.variance=learned guidance=cfg
    guidance.channels=3) composes and runs, at CFG's two forwards per step in one batched call."""
    steps = 3
    cfg = compose_run_config(["model=dit_xl_2_256", f"model.source={dit_folder}", "metric=none", "logger=none",
                              "sampler=ddpm", f"steps={steps}", "sampler.spacing=linspace", "sampler.variance=learned",
                              "guidance=cfg", "scale=1.5", "guidance.channels=3", "num_samples=2", "precision=fp32"],
                             tmp_path / "run")
    assert run(cfg)["nfe"] == 2 * steps
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) == 2
