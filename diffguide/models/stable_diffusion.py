"""Stable Diffusion 1.5 / 2.1 (`sd15`, `sd21`) and SDXL (`sdxl`): a UNet2DConditionModel in the latent space of its
VAE, loaded with diffusers from `model.source` (a hub id or a local folder laid out as the pipeline: unet/, vae/,
text_encoder/, tokenizer/, scheduler/ and, for SDXL, text_encoder_2/ and tokenizer_2/).

Prompts are encoded by the pipeline's own `encode_prompt` (so a prompt becomes exactly what the pipeline would give
the UNet); the null condition is the empty prompt through the encoder (SD), or zeros where SDXL's
`force_zeros_for_empty_prompt` says so and no negative prompt is given, as StableDiffusionXLPipeline does. SDXL's
micro-conditioning (`add_time_ids`: original size, crop (0, 0), target size = the sampled resolution) and the
second encoder's pooled embedding go in `added_cond_kwargs`, as the pipeline passes them. The UNet predicts eps or v
(`prediction_type` of the scheduler config: SD 2.1 at 768 px is v); latents are divided by the VAE's
`scaling_factor` and decoded `decode_batch_size` at a time, with VAE slicing/tiling where asked.
"""

import torch

from diffguide.data import prompts as prompt_lib
from diffguide.errors import UserError
from diffguide.models import hub
from diffguide.models.denoiser import Denoiser
from diffguide.models.text import TextConditioned


def _resolution(resolution, default: int) -> tuple[int, int]:
    if resolution is None:
        return default, default
    size = [resolution] * 2 if isinstance(resolution, int) else list(resolution)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise UserError(f"model.resolution must be a size in pixels or [height, width] (got {resolution!r})")
    return size[0], size[1]


class LatentTextDenoiser(TextConditioned, Denoiser):
    """What the latent text-to-image families share: the pipeline object (its encoders, tokenizers, VAE), the
    latent shape of the resolution, and the batched VAE decode."""

    #: the channels the VAE's latents are shifted by before decoding (SD3, FLUX); 0 for SD and SDXL
    shift_factor = 0.0

    @staticmethod
    def parameterisation_of(scheduler_config: dict) -> str:
        """diffguide's parameterisation of a diffusers scheduler config's `prediction_type`."""
        return {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[
            scheduler_config.get("prediction_type", "epsilon")]

    def _register(self, pipe) -> None:
        """The pipeline's VAE and text encoders as this Module's own (after Denoiser.__init__), so that .to(device)
        and .eval() reach them; the network itself is registered by the family under its own name."""
        self.vae = pipe.vae
        self.text_encoders = torch.nn.ModuleList(
            [m for m in (getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3"))
             if m is not None])

    def _setup_latents(self, pipe, resolution, decode_batch_size: int, vae_slicing: bool, vae_tiling: bool,
                       latent_channels: int, default_size: int) -> tuple[int, int, int]:
        self.pipe = pipe  # not a Module: its components are registered by the family (after Denoiser.__init__)
        self.vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        height, width = _resolution(resolution, default_size * self.vae_scale_factor)
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise UserError(f"model.resolution={resolution}: height and width must be multiples of the VAE's "
                            f"{self.vae_scale_factor}")
        self.height, self.width = height, width
        self.scaling_factor = float(pipe.vae.config.scaling_factor)
        self.shift_factor = float(getattr(pipe.vae.config, "shift_factor", None) or 0.0)
        self.decode_batch_size = int(decode_batch_size)
        if vae_slicing:
            pipe.vae.enable_slicing()
        if vae_tiling:
            pipe.vae.enable_tiling()
        return latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    @property
    def image_shape(self):
        return (self.vae.config.out_channels, self.height, self.width)

    def latents_for_vae(self, x0: torch.Tensor) -> torch.Tensor:
        """The sampled latents as the VAE decoder takes them (FLUX unpacks its 2x2 patches here)."""
        return x0

    def decode(self, x0):
        images = []
        dtype = next(self.vae.parameters()).dtype
        for chunk in x0.split(self.decode_batch_size):
            latents = self.latents_for_vae(chunk) / self.scaling_factor + self.shift_factor
            with self.autocast(chunk.device.type):
                images.append(self.vae.decode(latents.to(dtype)).sample.float())
        return torch.cat(images).clamp(-1, 1)

    def token_limits(self):
        found = []
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            tokenizer = getattr(self.pipe, name, None)
            if tokenizer is not None:
                limit = self.max_tokens(name, tokenizer)
                found.append((f"the {name.replace('_', ' ')}", tokenizer, limit))
        return found

    def max_tokens(self, name: str, tokenizer) -> int:
        return int(tokenizer.model_max_length)


def _unet_parts(unet):
    """blocks: the UNet's transformer blocks (BasicTransformerBlock) in forward order, each with its self-attention
    `attn1`: the layers PAG and SEG perturb, named by diffusers' own identifiers (down_blocks.i.attentions.j...,
    mid_block..., up_blocks...) so that a method's layer list can pick them; blocks=null picks the mid block's
    first (perturbation.default_blocks: diffusers' pag_applied_layers="mid" on SD and SDXL).
    time_embeddings: `unet.time_embedding`, the timestep path alone (SDXL adds its text-and-size embedding
    `add_embedding` after it, which TSG leaves as it is)."""
    from diffusers.models.attention import BasicTransformerBlock

    from diffguide.models.hooks import Parts

    names, blocks = [], []
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            names.append(name)
            blocks.append(module)
    return Parts(blocks=blocks, attention=[block.attn1 for block in blocks], names=names,
                 time_embeddings=[unet.time_embedding])


class StableDiffusion(LatentTextDenoiser):
    """SD 1.x / 2.x: one CLIP text encoder, its last hidden state as the cross-attention context."""

    family = "sd"

    def __init__(self, pipe, resolution=None, decode_batch_size: int = 8, vae_slicing: bool = False,
                 vae_tiling: bool = False):
        from diffusers import DDPMScheduler

        scheduler_config = dict(pipe.scheduler.config)
        scheduler = DDPMScheduler.from_config(scheduler_config)
        unet = pipe.unet
        shape = self._setup_latents(pipe, resolution, decode_batch_size, vae_slicing, vae_tiling,
                                    unet.config.in_channels, unet.config.sample_size)
        Denoiser.__init__(self, scheduler.alphas_cumprod, shape, 0, None, scheduler_config, data_range=None,
                          parameterisation=self.parameterisation_of(scheduler_config))
        self.unet = unet
        self._register(pipe)

    def encode(self, strings):
        embeds, _ = self.pipe.encode_prompt(strings, self.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def _network(self, x, t, condition):
        return self.unet(x, t, encoder_hidden_states=condition["encoder_hidden_states"]).sample

    def parts(self):
        return _unet_parts(self.unet)


class StableDiffusionXL(StableDiffusion):
    """SDXL: two CLIP encoders (their penultimate hidden states concatenated), the second's pooled projection and the
    added time ids as `added_cond_kwargs`."""

    family = "sdxl"

    def __init__(self, pipe, resolution=None, decode_batch_size: int = 8, vae_slicing: bool = False,
                 vae_tiling: bool = False):
        super().__init__(pipe, resolution, decode_batch_size, vae_slicing, vae_tiling)
        size = (self.height, self.width)
        projection = (int(pipe.text_encoder_2.config.projection_dim) if pipe.text_encoder_2 is not None else None)
        # the pipeline's own computation of the micro-conditioning, which also checks it against the UNet
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=torch.float32,
                                          text_encoder_projection_dim=projection)
        self.register_buffer("add_time_ids", time_ids, persistent=False)

    def encode(self, strings):
        embeds, _, pooled, _ = self.pipe.encode_prompt(strings, None, self.device, 1, False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def null_encoding(self):
        empty = self.encode([""])
        if self.pipe.config.force_zeros_for_empty_prompt:
            return {k: torch.zeros_like(v) for k, v in empty.items()}
        return empty

    def _network(self, x, t, condition):
        added = {"text_embeds": condition["text_embeds"],
                 "time_ids": self.add_time_ids.to(x.dtype).expand(x.shape[0], -1)}
        return self.unet(x, t, encoder_hidden_states=condition["encoder_hidden_states"],
                         added_cond_kwargs=added).sample


_FAMILIES = {"sd15": ("StableDiffusionPipeline", StableDiffusion), "sd21": ("StableDiffusionPipeline", StableDiffusion),
             "sdxl": ("StableDiffusionXLPipeline", StableDiffusionXL)}


def load_pipeline(pipeline_class: str, source: str, revision=None, local_files_only: bool = False, **extra):
    import diffusers

    cls = getattr(diffusers, pipeline_class)
    kwargs = {"revision": revision, "local_files_only": local_files_only, **extra}
    with_checker = pipeline_class == "StableDiffusionPipeline"
    if with_checker:  # the safety checker is not part of sampling (and would blank images it flags)
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = hub.from_pretrained(cls, source, "model.source", None, what=f"a {pipeline_class}", **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_family(families: dict, family: str, source: str, prompts, revision, local_files_only: bool, **kwargs):
    """A family of `families` (name -> (pipeline class, Denoiser class)) from `source`, with the run's prompts: the
    prompt set first (a mistake in it is one line before any weights load), then the pipeline."""
    if family not in families:
        raise UserError(f"model.family={family!r}: one of {', '.join(families)}")
    prompt_set = prompt_lib.as_set(prompts)
    pipeline_class, cls = families[family]
    model = cls(load_pipeline(pipeline_class, source, revision, local_files_only), **kwargs)
    model.set_prompts(prompt_set)
    return model.eval().requires_grad_(False)


def load(family: str, source: str, prompts=None, resolution=None, decode_batch_size: int = 8,
         vae_slicing: bool = False, vae_tiling: bool = False, revision: str | None = None,
         local_files_only: bool = False):
    """The `_target_` of conf/model/sd15.yaml, sd21.yaml and sdxl.yaml."""
    return load_family(_FAMILIES, family, source, prompts, revision, local_files_only, resolution=resolution,
                       decode_batch_size=decode_batch_size, vae_slicing=vae_slicing, vae_tiling=vae_tiling)
