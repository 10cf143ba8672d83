"""The transformer text-to-image families: SD3 / SD3.5 (`sd3`: MMDiT, flow matching, two CLIP encoders and an
optional T5), FLUX.1 (`flux_dev`, `flux_schnell`: a flow transformer on 2x2-packed latents, CLIP pooled + T5) and
PixArt-Sigma (`pixart_sigma`: a DiT on the discrete VP schedule with learned variance, T5 with its attention mask).
Each loads its diffusers pipeline from `model.source` and encodes prompts with the pipeline's own `encode_prompt`.

The sampler and the guidance see image-shaped latents (C, H/8, W/8) for every family, FLUX included: FLUX's
packing into 2x2 patches (FluxPipeline._pack_latents) is done inside the network call and undone on its output, so
that the initial noise is the pipeline's (drawn unpacked, then packed) and methods acting on space (FDG's frequency
split, SEG's blur) see an image.

Time: SD3's transformer takes the flow time in [0, 1000] (its scheduler's timesteps: sigma x 1000), FLUX's the time
in [0, 1] (FluxPipeline passes `timestep / 1000`); FLUX's grid is the pipeline's (`sigmas = linspace(1, 1/N, N)`
shifted by `mu = calculate_shift(image tokens, ...)`, where the scheduler config sets use_dynamic_shifting).

FLUX.1-dev is guidance-distilled: its `guidance` input takes the scale, one evaluation per step (`guidance=distilled
scale=3.5`, the pipeline's guidance_scale). guidance=cfg with a negative prompt is the pipeline's `true_cfg_scale`
(both branches with the distilled input at `model.guidance_embed`, 3.5 by default, as FluxPipeline passes
guidance_scale to both). schnell has no guidance input: few steps, no guidance (`guidance=none steps=4`).
"""

import numpy as np
import torch

from diffguide.errors import UserError
from diffguide.models.denoiser import Denoiser
from diffguide.models.schedules import FlowSchedule
from diffguide.models.stable_diffusion import LatentTextDenoiser, load_family


def _transformer_parts(blocks, names):
    from diffguide.models.hooks import Parts

    return Parts(blocks=list(blocks), attention=[getattr(b, "attn", getattr(b, "attn1", None)) for b in blocks],
                 names=list(names))


class StableDiffusion3(LatentTextDenoiser):
    family = "sd3"

    def __init__(self, pipe, resolution=None, decode_batch_size: int = 8, vae_slicing=False, vae_tiling=False,
                 max_sequence_length: int = 256):
        transformer = pipe.transformer
        shape = self._setup_latents(pipe, resolution, decode_batch_size, vae_slicing, vae_tiling,
                                    transformer.config.in_channels, transformer.config.sample_size)
        scheduler_config = dict(pipe.scheduler.config)
        Denoiser.__init__(self, None, shape, 0, None, scheduler_config, data_range=None,
                          schedule=FlowSchedule(scheduler_config), parameterisation="flow")
        self.transformer = transformer
        self._register(pipe)
        self.max_sequence_length = int(max_sequence_length)

    def max_tokens(self, name, tokenizer):
        return self.max_sequence_length if name == "tokenizer_3" else int(tokenizer.model_max_length)

    def encode(self, strings):
        embeds, _, pooled, _ = self.pipe.encode_prompt(strings, None, None, device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _network(self, x, t, condition):
        # SD3's transformer takes the flow time x 1000, FlowSchedule.network_time's
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=condition["encoder_hidden_states"],
                                pooled_projections=condition["pooled_projections"], return_dict=False)[0]

    def parts(self):
        """blocks: the MMDiT's joint transformer blocks, each with its joint attention `attn` (SD3's pipeline skips
        layers 7, 8, 9 of SD3.5-medium for SLG: `skip_guidance_layers`)."""
        blocks = self.transformer.transformer_blocks
        return _transformer_parts(blocks, [f"transformer_blocks.{i}" for i in range(len(blocks))])


class FluxSchedule(FlowSchedule):
    """FluxPipeline's grid: sigmas linspace(1, 1/N, N), shifted by mu (calculate_shift of the image's token count)
    where the scheduler config sets use_dynamic_shifting (dev and schnell alike; schnell's config turns it off)."""

    def __init__(self, scheduler_config: dict, image_seq_len: int):
        super().__init__(scheduler_config)
        self.image_seq_len = image_seq_len

    def grid(self, scheduler_class, steps, spacing):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.scheduler_config
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(self.image_seq_len, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        kwargs = {"mu": mu} if config.get("use_dynamic_shifting") else {}
        scheduler.set_timesteps(steps if sigmas is None else None, sigmas=sigmas, **kwargs)
        return [self.level(float(tau)) for tau in scheduler.sigmas[:-1]]

    def network_time(self, t):
        return t  # FluxPipeline passes timestep / 1000: the flow time itself


class Flux(LatentTextDenoiser):
    family = "flux"

    def __init__(self, pipe, resolution=None, decode_batch_size: int = 8, vae_slicing=False, vae_tiling=False,
                 max_sequence_length: int = 512, guidance_embed: float = 3.5):
        transformer = pipe.transformer
        channels = transformer.config.in_channels // 4
        default = int(pipe.default_sample_size)
        shape = self._setup_latents(pipe, resolution, decode_batch_size, vae_slicing, vae_tiling, channels, default)
        if self.height % (2 * self.vae_scale_factor) or self.width % (2 * self.vae_scale_factor):
            raise UserError(f"model.resolution: FLUX packs 2x2 latents: height and width must be multiples of "
                            f"{2 * self.vae_scale_factor}")
        scheduler_config = dict(pipe.scheduler.config)
        tokens = (shape[1] // 2) * (shape[2] // 2)
        Denoiser.__init__(self, None, shape, 0, None, scheduler_config, data_range=None,
                          schedule=FluxSchedule(scheduler_config, tokens), parameterisation="flow")
        self.transformer = transformer
        self._register(pipe)
        self.max_sequence_length = int(max_sequence_length)
        self.guidance_embed = float(guidance_embed)
        self._scale = None
        self.register_buffer("image_ids", pipe._prepare_latent_image_ids(1, shape[1] // 2, shape[2] // 2, "cpu",
                                                                         torch.float32), persistent=False)

    @property
    def guidance_input(self) -> bool:
        """FLUX.1-dev's guidance embedding (guidance=distilled passes the scale into it)."""
        return bool(self.transformer.config.guidance_embeds)

    def check_scale(self, scale: float) -> None:
        pass

    def predict_guided(self, x, t, labels, w):
        self._scale = float(w)
        try:
            return self.predict(x, t, labels)
        finally:
            self._scale = None

    def max_tokens(self, name, tokenizer):
        return self.max_sequence_length if name == "tokenizer_2" else int(tokenizer.model_max_length)

    def encode(self, strings):
        embeds, pooled, _ = self.pipe.encode_prompt(strings, None, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _network(self, x, t, condition):
        batch, channels, h, w = x.shape
        packed = self.pipe._pack_latents(x, batch, channels, h, w)
        guidance = None
        if self.guidance_input:
            scale = self.guidance_embed if self._scale is None else self._scale
            guidance = torch.full((batch,), scale, device=x.device, dtype=torch.float32)
        text_ids = torch.zeros(condition["encoder_hidden_states"].shape[1], 3, device=x.device, dtype=x.dtype)
        out = self.transformer(hidden_states=packed, timestep=t.to(x.dtype), guidance=guidance,
                               pooled_projections=condition["pooled_projections"],
                               encoder_hidden_states=condition["encoder_hidden_states"], txt_ids=text_ids,
                               img_ids=self.image_ids.to(x.device, x.dtype), return_dict=False)[0]
        return self.pipe._unpack_latents(out, self.height, self.width, self.vae_scale_factor)

    def parts(self):
        double = self.transformer.transformer_blocks
        single = self.transformer.single_transformer_blocks
        return _transformer_parts(list(double) + list(single),
                                  [f"transformer_blocks.{i}" for i in range(len(double))] +
                                  [f"single_transformer_blocks.{i}" for i in range(len(single))])


class PixArtSigma(LatentTextDenoiser):
    """PixArt-Sigma: eps (and learned variance: out_channels = 2 x latent channels, split off as DiT's are) on the
    discrete VP schedule of its scheduler config, T5 embeddings with their attention mask (300 tokens)."""

    family = "pixart"

    def __init__(self, pipe, resolution=None, decode_batch_size: int = 8, vae_slicing=False, vae_tiling=False,
                 max_sequence_length: int = 300):
        from diffusers import DDPMScheduler

        transformer = pipe.transformer
        shape = self._setup_latents(pipe, resolution, decode_batch_size, vae_slicing, vae_tiling,
                                    transformer.config.in_channels, transformer.config.sample_size)
        scheduler_config = dict(pipe.scheduler.config)
        scheduler = DDPMScheduler.from_config(scheduler_config)
        Denoiser.__init__(self, scheduler.alphas_cumprod, shape, 0, None, scheduler_config, data_range=None,
                          parameterisation=self.parameterisation_of(scheduler_config))
        self.transformer = transformer
        self._register(pipe)
        self.max_sequence_length = int(max_sequence_length)

    @property
    def learned_variance(self):
        return self.transformer.config.out_channels == 2 * self.sample_shape[0]

    def max_tokens(self, name, tokenizer):
        return self.max_sequence_length

    def encode(self, strings):
        embeds, mask, _, _ = self.pipe.encode_prompt(strings, do_classifier_free_guidance=False, device=self.device,
                                                     clean_caption=False,
                                                     max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    def _network(self, x, t, condition):
        return self.transformer(x, encoder_hidden_states=condition["encoder_hidden_states"],
                                encoder_attention_mask=condition["encoder_attention_mask"], timestep=t,
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]

    def parts(self):
        blocks = self.transformer.transformer_blocks
        return _transformer_parts(blocks, [f"transformer_blocks.{i}" for i in range(len(blocks))])


_FAMILIES = {"sd3": ("StableDiffusion3Pipeline", StableDiffusion3), "flux_dev": ("FluxPipeline", Flux),
             "flux_schnell": ("FluxPipeline", Flux), "pixart_sigma": ("PixArtSigmaPipeline", PixArtSigma)}


def load(family: str, source: str, prompts=None, resolution=None, decode_batch_size: int = 8,
         vae_slicing: bool = False, vae_tiling: bool = False, max_sequence_length: int | None = None,
         guidance_embed: float = 3.5, revision: str | None = None, local_files_only: bool = False):
    """The `_target_` of conf/model/sd3.yaml, flux_dev.yaml, flux_schnell.yaml and pixart_sigma.yaml."""
    kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    if _FAMILIES.get(family, (None, None))[1] is Flux:
        kwargs["guidance_embed"] = guidance_embed
    return load_family(_FAMILIES, family, source, prompts, revision, local_files_only, resolution=resolution,
                       decode_batch_size=decode_batch_size, vae_slicing=vae_slicing, vae_tiling=vae_tiling, **kwargs)
