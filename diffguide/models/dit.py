"""DiT (Peebles & Xie 2023): in the latent space of its VAE, loaded from a diffusers DiT folder (a hub id such as
facebook/DiT-XL-2-256, or a local copy of one: transformer/, vae/, scheduler/), and in pixel space, the embedded
`fmnist_dit` (PixelDiT, a diffguide checkpoint trained by `python -m diffguide.train train=fmnist_dit`). Both are
diffusers' DiTTransformer2DModel, so both take the same network hooks (blocks = its transformer blocks).

The sampler and the guidance see the same Denoiser as for pixel models: eps in latent space, class labels 0..999 and
the null class 1000 for the unconditional prediction. The learned-variance channels (DiT-XL/2 outputs 8 channels for
its 4 latent ones: improved DDPM's `learned_range`) are split off from eps; DDPM with sampler.variance=learned uses
them, as DiT's own sampling does, and every other sampler leaves them unused, as DiTPipeline does. Latents are
decoded once, at the end, in batches of `decode_batch_size`.
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

from diffguide.store import checkpoint
from diffguide.models import hub
from diffguide.models.denoiser import Denoiser

KIND = "dit-denoiser"


class _DiTBlocks:
    """The perturbable modules of a DiTTransformer2DModel (`self.transformer`), shared by latent and pixel DiTs."""

    def parts(self):
        """blocks: DiT's transformer blocks (diffusers BasicTransformerBlock) in forward order, each with its `attn1`.
        time_embeddings: the timestep path of each block's conditioning, `norm1.emb.timestep_embedder` (a
        TimestepEmbedding) of every block's CombinedTimestepLabelEmbeddings, whose output the label embedding is added
        to afterwards (`conditioning = timesteps_emb + class_labels`), so perturbing it leaves the label embedding as
        it is. diffusers' DiT keeps one such embedder per block where facebookresearch/DiT has one shared
        `t_embedder` (the converted weights are the same in every block); block 0's is also called for the final
        layer's conditioning (DiTTransformer2DModel.forward: `self.transformer_blocks[0].norm1.emb(timestep, ...)`).
        label_embeddings: every block's own label table, `norm1.emb.class_embedder` (a LabelEmbedding; its last row
        the null class's), one per block likewise."""
        from diffguide.models.hooks import Parts

        blocks = list(self.transformer.transformer_blocks)
        return Parts(blocks=blocks, attention=[block.attn1 for block in blocks],
                     time_embeddings=[block.norm1.emb.timestep_embedder for block in blocks],
                     label_embeddings=[block.norm1.emb.class_embedder for block in blocks
                                       if isinstance(getattr(getattr(block.norm1, "emb", None), "class_embedder",
                                                             None), LabelEmbedding)])


class LatentDiT(_DiTBlocks, Denoiser):
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


def load(source: str, num_classes: int | None = None, decode_batch_size: int = 32, revision: str | None = None,
         local_files_only: bool = False) -> LatentDiT:
    """The `_target_` of conf/model/dit_*.yaml. `source`: a hub id or a local folder laid out as a DiT pipeline."""
    kwargs = {"revision": revision, "local_files_only": local_files_only}
    transformer = hub.from_pretrained(DiTTransformer2DModel, source, "model.source", "transformer", **kwargs)
    vae = hub.from_pretrained(AutoencoderKL, source, "model.source", "vae", **kwargs)
    scheduler = hub.load_config(DDPMScheduler, source, "model.source", "scheduler")
    model = LatentDiT(transformer, vae, scheduler, num_classes, decode_batch_size)
    return model.eval().requires_grad_(False)


class PixelDiT(_DiTBlocks, Denoiser):
    """A class-conditional DiT on pixels (no VAE): eps prediction on the discrete VP schedule of `scheduler_config`,
    classes 0..num_classes-1 and the null class num_classes (the last row of each block's label embedding, DiT's own
    layout: diffusers' LabelEmbedding keeps one extra row for the dropped label)."""

    def __init__(self, transformer: DiTTransformer2DModel, scheduler_config: dict):
        cfg = transformer.config
        scheduler = DDPMScheduler.from_config(scheduler_config)
        super().__init__(scheduler.alphas_cumprod, (cfg.in_channels, cfg.sample_size, cfg.sample_size),
                         cfg.num_embeds_ada_norm, null_class=cfg.num_embeds_ada_norm,
                         scheduler_config=scheduler.config, data_range=(-1.0, 1.0))
        self.transformer = transformer

    def _output(self, x, t, labels):
        return self.transformer(x, timestep=t, class_labels=labels).sample


def build(dit_config: dict, num_classes: int, scheduler_config: dict) -> PixelDiT:
    """A fresh pixel DiT. diffusers' LabelEmbedding drops labels by itself in training mode (rate 0.1, a separate
    draw in every block, from the global generator); the trainer drops labels once per sample, so that in-network
    dropout is turned off (the null row stays)."""
    transformer = DiTTransformer2DModel(**dit_config, num_embeds_ada_norm=num_classes)
    initialise(transformer)
    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return PixelDiT(transformer, scheduler_config)


def initialise(transformer: DiTTransformer2DModel) -> None:
    """DiT's own initialisation (facebookresearch/DiT models.py, `DiT.initialize_weights`), which diffusers' class
    does not apply (its adaLN and output layers start random, so a fresh network's eps loss starts near 1.6, not 1):
    xavier-uniform linears with zero bias, the patch embedding initialised like a linear, label tables and timestep
    MLPs N(0, 0.02), every adaLN modulation and the output layer zero (the network starts as the zero map). In
    diffusers' layout each block has its own timestep/label embedder (`norm1.emb`), and the final adaLN is
    `proj_out_1`, the output linear `proj_out_2`."""
    nn = torch.nn
    for module in transformer.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = transformer.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.data.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for block in transformer.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (transformer.proj_out_1, transformer.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def config_of(model: PixelDiT) -> dict:
    dit_config = {k: v for k, v in model.transformer.config.items()
                  if not k.startswith("_") and k != "num_embeds_ada_norm"}
    return {"dit": dit_config, "num_classes": model.num_classes,
            "scheduler": {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}}


def save(model: PixelDiT, path: Path, extra: dict | None = None) -> None:
    checkpoint.save(path, model.transformer.state_dict(), KIND, {**config_of(model), **(extra or {})})


def load_pixel(weights: str) -> PixelDiT:
    """The `_target_` of conf/model/fmnist_dit.yaml: rebuild the network from the checkpoint's own config."""
    tensors, config = checkpoint.load(weights, KIND)
    model = build(config["dit"], config["num_classes"], config["scheduler"])
    model.transformer.load_state_dict(tensors)
    return model.eval().requires_grad_(False)
