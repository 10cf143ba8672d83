"""Pixel-space class-conditional UNets (diffusers UNet2DModel) stored as diffguide checkpoints."""

from pathlib import Path

from diffusers import DDPMScheduler, UNet2DModel

from diffguide.store import checkpoint
from diffguide.errors import UserError
from diffguide.models.denoiser import Denoiser
from diffguide.models.schedules import FlowSchedule

KIND = "unet-denoiser"
#: diffusers' scheduler prediction_type -> this project's parameterisation
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


class UNetDenoiser(Denoiser):
    """UNet2DModel with a class embedding of num_classes + 1 rows; the last row is the null class.

    parameterisation eps (or v, x0) on the discrete VP schedule of `scheduler_config` (DDPMScheduler's), or flow:
    the flow-matching velocity on FlowMatchEulerDiscreteScheduler's time (`scheduler_config` is then its config)."""

    def __init__(self, unet: UNet2DModel, num_classes: int, scheduler_config: dict, parameterisation: str = "eps"):
        size = unet.config.sample_size
        shape = (unet.config.in_channels, size, size)
        if parameterisation == "flow":
            schedule = FlowSchedule(scheduler_config)
            super().__init__(None, shape, num_classes, null_class=num_classes,
                             scheduler_config=schedule.scheduler_config, data_range=(-1.0, 1.0), schedule=schedule,
                             parameterisation="flow")
        else:
            scheduler = DDPMScheduler.from_config(scheduler_config)
            super().__init__(scheduler.alphas_cumprod, shape, num_classes, null_class=num_classes,
                             scheduler_config=scheduler.config, data_range=(-1.0, 1.0),
                             parameterisation=parameterisation)
        self.unet = unet

    def _output(self, x, t, labels):
        return self.unet(x, t, class_labels=labels).sample

    def parts(self):
        """blocks: the UNet's self-attention layers (diffusers Attention in its down, mid and up blocks, in forward
        order), each its own block and its own self-attention (skipping it returns its input); fmnist_unet has one,
        in its mid block. time_embeddings: UNet2DModel's `time_embedding` (TimestepEmbedding: the MLP on the
        sinusoidal projection of t), whose output the class embedding is added to afterwards, so perturbing it
        leaves the class embedding as it is. label_embeddings: its `class_embedding` (an nn.Embedding of
        num_classes + 1 rows, the last the null class's)."""
        from torch import nn

        from diffguide.models.hooks import Parts, self_attention_layers

        blocks = self_attention_layers(self.unet.down_blocks, self.unet.mid_block, self.unet.up_blocks)
        embedding = getattr(self.unet, "class_embedding", None)
        return Parts(blocks=blocks, attention=list(blocks), time_embeddings=[self.unet.time_embedding],
                     label_embeddings=[embedding] if isinstance(embedding, nn.Embedding) else [])


def build(unet_config: dict, num_classes: int, scheduler_config: dict, parameterisation: str = "eps") -> UNetDenoiser:
    unet = UNet2DModel(**unet_config, num_class_embeds=num_classes + 1)
    return UNetDenoiser(unet, num_classes, scheduler_config, parameterisation)


def config_of(model: UNetDenoiser) -> dict:
    unet_config = {k: v for k, v in model.unet.config.items() if not k.startswith("_") and k != "num_class_embeds"}
    config = {"unet": unet_config, "num_classes": model.num_classes,
              "scheduler": {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}}
    if model.parameterisation.name != "eps":
        config["parameterisation"] = model.parameterisation.name
    return config


def save(model: UNetDenoiser, path: Path, extra: dict | None = None) -> None:
    checkpoint.save(path, model.unet.state_dict(), KIND, {**config_of(model), **(extra or {})})


def load(weights: str) -> UNetDenoiser:
    """The `_target_` of conf/model/fmnist_unet.yaml: rebuild the network from the checkpoint's own config."""
    tensors, config = checkpoint.load(weights, KIND)
    model = build(config["unet"], config["num_classes"], config["scheduler"], config.get("parameterisation", "eps"))
    model.unet.load_state_dict(tensors)
    return model.eval().requires_grad_(False)


class PretrainedUNet(Denoiser):
    """A diffusers UNet2DModel from a hub id or a local folder (e.g. google/ddpm-cifar10-32: unconditional, so the
    classes only label samples and steer classifier-based guidance; CFG needs a null class and is refused). Its
    parameterisation is the scheduler config's `prediction_type`: epsilon, v_prediction (Stable Diffusion 2's v) or
    sample (x0)."""

    def __init__(self, unet: UNet2DModel, scheduler_config: dict, num_classes: int):
        scheduler = DDPMScheduler.from_config(scheduler_config)
        size = unet.config.sample_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        conditional = unet.config.num_class_embeds is not None
        prediction = scheduler.config.prediction_type
        if prediction not in PREDICTION_TYPES:
            raise UserError(f"model.source: scheduler prediction_type {prediction!r} is not one of "
                            f"{', '.join(PREDICTION_TYPES)}")
        super().__init__(scheduler.alphas_cumprod, (unet.config.in_channels, *size), num_classes,
                         null_class=None, scheduler_config=scheduler.config, data_range=(-1.0, 1.0),
                         parameterisation=PREDICTION_TYPES[prediction])
        self.unet, self.conditional = unet, conditional

    def _output(self, x, t, labels):
        out = self.unet(x, t, class_labels=labels if self.conditional else None).sample
        return out[:, :x.shape[1]]  # learned-variance channels, when present, are not used by these samplers

    def parts(self):
        """The same UNet2DModel layout as UNetDenoiser's, less the label embeddings (its classes only label samples:
        no null class to replace)."""
        parts = UNetDenoiser.parts(self)
        parts.label_embeddings = []
        return parts


def load_pretrained(source: str, num_classes: int = 10, revision: str | None = None,
                    local_files_only: bool = False) -> PretrainedUNet:
    """The `_target_` of conf/model/ddpm_cifar10.yaml. `source`: a hub id or a folder with unet/ and scheduler/
    (a pipeline folder), or with the UNet's config and weights at its top level (older hub layouts)."""
    from diffguide.models import hub

    kwargs = {"revision": revision, "local_files_only": local_files_only}
    try:
        unet = hub.from_pretrained(UNet2DModel, source, "model.source", "unet", **kwargs)
        scheduler = hub.load_config(DDPMScheduler, source, "model.source", "scheduler")
    except UserError:
        unet = hub.from_pretrained(UNet2DModel, source, "model.source", None, **kwargs)
        scheduler = hub.load_config(DDPMScheduler, source, "model.source", None)
    return PretrainedUNet(unet, scheduler, num_classes).eval().requires_grad_(False)
