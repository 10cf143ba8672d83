"""DiT (Peebles & Xie 2023) in the latent space of its VAE, loaded from a diffusers DiT folder (a hub id such as
facebook/DiT-XL-2-256, or a local copy of one): transformer/, vae/, scheduler/.

The sampler and the guidance see the same Denoiser as for pixel models: eps in latent space, class labels 0..999 and
the null class 1000 for the unconditional prediction. The learned-variance channels (DiT-XL/2 outputs 8 channels for
its 4 latent ones: improved DDPM's `learned_range`) are split off from eps; DDPM with sampler.variance=learned uses
them, as DiT's own sampling does, and every other sampler leaves them unused, as DiTPipeline does. Latents are
decoded once, at the end, in batches of `decode_batch_size`.
"""

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

from diffguide.models import hub
from diffguide.models.denoiser import Denoiser


class LatentDiT(Denoiser):
    def __init__(self, transformer: DiTTransformer2DModel, vae: AutoencoderKL, scheduler_config: dict,
                 num_classes: int | None = None, decode_batch_size: int = 32):
        scheduler = DDPMScheduler.from_config(scheduler_config)
        cfg = transformer.config
        num_classes = num_classes or cfg.num_embeds_ada_norm
        super().__init__(scheduler.alphas_cumprod, (cfg.in_channels, cfg.sample_size, cfg.sample_size), num_classes,
                         null_class=cfg.num_embeds_ada_norm, scheduler_config=scheduler.config, data_range=None)
        self.transformer, self.vae = transformer, vae
        self.latent_channels = cfg.in_channels
        self.scaling_factor = float(vae.config.scaling_factor)
        self.decode_batch_size = int(decode_batch_size)

    @property
    def image_shape(self):
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)  # the VAE's upsampling, as diffusers computes it
        _, h, w = self.sample_shape
        return (self.vae.config.out_channels, h * factor, w * factor)

    @property
    def learned_variance(self):
        return self.transformer.out_channels == 2 * self.latent_channels

    def _output(self, x, t, labels):
        out = self.transformer(x, timestep=t, class_labels=labels).sample
        # eps and, where the network has them, the learned-variance channels (Denoiser.forward splits them off)
        return out if self.learned_variance else out[:, :self.latent_channels]

    def decode(self, x0):
        """Latents -> images in [-1, 1], batch by batch (the VAE decoder dominates memory at 256x256)."""
        images = []
        dtype = next(self.vae.parameters()).dtype
        for chunk in x0.split(self.decode_batch_size):
            with self.autocast(chunk.device.type):
                images.append(self.vae.decode((chunk / self.scaling_factor).to(dtype)).sample.float())
        return torch.cat(images).clamp(-1, 1)

    def blocks(self):
        """DiT's transformer blocks (diffusers BasicTransformerBlock), in forward order."""
        return list(self.transformer.transformer_blocks)

    def self_attention(self, block):
        return block.attn1


def load(source: str, num_classes: int | None = None, decode_batch_size: int = 32, revision: str | None = None,
         local_files_only: bool = False) -> LatentDiT:
    """The `_target_` of conf/model/dit_*.yaml. `source`: a hub id or a local folder laid out as a DiT pipeline."""
    kwargs = {"revision": revision, "local_files_only": local_files_only}
    transformer = hub.from_pretrained(DiTTransformer2DModel, source, "model.source", "transformer", **kwargs)
    vae = hub.from_pretrained(AutoencoderKL, source, "model.source", "vae", **kwargs)
    scheduler = hub.load_config(DDPMScheduler, source, "model.source", "scheduler")
    model = LatentDiT(transformer, vae, scheduler, num_classes, decode_batch_size)
    return model.eval().requires_grad_(False)
