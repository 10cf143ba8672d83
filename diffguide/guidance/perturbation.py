"""Perturbation guidance (PAG, SEG, SLG): the network contrasted with a weakened copy of itself."""

import math

import torch

from diffguide.errors import UserError
from diffguide.guidance.base import CFGLike, GuidedPrediction
from diffguide.models import hooks
from diffguide.models.denoiser import Denoiser
from diffguide.models.parameterisation import Prediction


#: diffusers' SEG treats a blur sigma above this as infinite (SEG-SDXL's README: "Setting this value greater than 9999.0
#: results in infinite blur, which means uniform queries"; diffusers' SmoothedEnergyGuidance seg_blur_threshold_inf)
SEG_INFINITE_BLUR = 9999.0


def default_blocks(denoiser: Denoiser) -> tuple[int, ...]:
    """The blocks a perturbation method perturbs when its config says `blocks: null`: the network's middle.

    A UNet (a model with `unet.mid_block`): the self-attention of its mid block, the layer PAG's paper and SEG's
    official code use on Stable Diffusion ("mid": diffusers' StableDiffusionPAGPipeline pag_applied_layers="mid",
    SEG-SDXL's seg_applied_layers=['mid']); fmnist_unet's only attention layer is that one. Any other network (a DiT):
    block len(blocks) // 2, e.g. 14 of DiT-XL/2's 28, the block diffusers' PAG examples for 28-block transformers name
    (pipeline_pag_hunyuandit.py pag_applied_layers=[14], pipeline_pag_pixart_sigma.py "blocks.14"); 3 of fmnist_dit's 6.
    """
    blocks = denoiser.parts().blocks
    mid = getattr(getattr(denoiser, "unet", None), "mid_block", None)
    if mid is not None:
        inside = {id(m) for m in mid.modules()}
        in_mid = [k for k, block in enumerate(blocks) if id(block) in inside]
        if in_mid:
            return (in_mid[0],)
    return (len(blocks) // 2,)


def require_network_blocks(name: str, denoiser: Denoiser, what: str) -> None:
    """Refuse, in one line, a model with no network blocks to perturb (the exact Gaussian mixture above all)."""
    from diffguide.models.gmm import GaussianMixture

    if isinstance(denoiser, GaussianMixture):
        raise UserError(f"guidance={name} guides with a perturbed network ({what}), and model=gmm is an exact "
                        f"Gaussian mixture with no network: the method has no closed-form meaning there; use a "
                        f"network model (model=fmnist_dit, fmnist_unet or dit_xl_2_256)")
    if not denoiser.parts().blocks:
        raise UserError(f"guidance={name} guides with a perturbed network ({what}); model {type(denoiser).__name__} "
                        f"declares no network blocks to perturb (model=fmnist_dit, fmnist_unet or dit_xl_2_256 do)")


def combine_perturbed(denoiser: Denoiser, x: torch.Tensor, t, cond: Prediction, perturbed: Prediction | None,
                      scale: float, uncond: Prediction | None = None, cfg_scale: float | None = None) -> Prediction:
    """cond + scale (cond - perturbed), or with CFG uncond + cfg_scale (cond - uncond) + scale (cond - perturbed)
    (the form of diffusers' pag_utils.py `_apply_perturbed_attention_guidance` and of its guiders with CFG on),
    taken on the network's own output as `combine` is. `perturbed` None (or scale 0): no perturbation term; the CFG
    part is then `combine`'s arithmetic exactly."""
    out_c = denoiser.output(cond, x, t)
    out = out_c
    if uncond is not None:
        out_u = denoiser.output(uncond, x, t)
        out = out_u + cfg_scale * (out_c - out_u)
    if perturbed is not None and scale != 0:
        out = out + scale * (out_c - denoiser.output(perturbed, x, t))
    return denoiser.from_output(out, x, t)


class PerturbationGuidance(CFGLike):
    """What PAG, SEG and SLG share: a conditional prediction contrasted with the same network perturbed (`kind`, one
    of diffguide/models/hooks.py's KINDS, in `blocks`), optionally on top of CFG, over a window of the trajectory.

        D = D_c + s (D_c - D_pert)                              cfg_scale null or 1 (NFE 2)
        D = D_u + w (D_c - D_u) + s (D_c - D_pert)              cfg_scale = w (NFE 3; D_c, D_u in one batched forward)

    on the network's own output (eps, v, x0 or velocity alike). s = the papers' scale (0: the conditional model, or
    CFG); w = CFG's scale in cfg.yaml's convention (1: conditional). s follows the `schedule` (weight()). The perturbed
    term is used inside the window [start, stop) of the trajectory (CFGLike.set_window: diffusers' guiders' window,
    with start = 0 including step 0); outside the window, and
    where s is 0, the perturbed forward is not run (NFE 1, or 2 with CFG)."""

    kind = ""
    #: what is perturbed, for messages
    what = ""
    #: s = 0 is no perturbation guidance: a weight schedule scales s itself (as CFG++'s lambda)
    neutral_scale = 0.0
    min_scale = 0.0
    #: the null class only with a CFG term (checked in `check`)
    needs_null_class = False

    def __init__(self, scale: float, blocks=None, cfg_scale: float | None = None, start: float = 0.0,
                 stop: float = 1.0, schedule=None):
        super().__init__(scale, schedule)
        self.blocks = self._parse_blocks(blocks)
        if cfg_scale is not None and (isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float))
                                      or not math.isfinite(cfg_scale)):
            raise UserError(f"guidance.cfg_scale must be a finite number (CFG's w; 1: no CFG term) or null "
                            f"(got {cfg_scale!r})")
        self.cfg_scale = None if cfg_scale is None or float(cfg_scale) == 1.0 else float(cfg_scale)
        self.set_window(start, stop)

    def _parse_blocks(self, blocks) -> tuple[int, ...] | None:
        if blocks is None:
            return None
        items = [blocks] if isinstance(blocks, int) else list(blocks) if hasattr(blocks, "__iter__") else None
        if (not items or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in items)):
            raise UserError(f"guidance.blocks must be a block index or a list of them, counted from 0, or null for "
                            f"the model's middle block (got {blocks!r})")
        return tuple(dict.fromkeys(int(k) for k in items))

    def perturbation(self, blocks: tuple[int, ...]):
        """The hooks.Perturbation of this method in `blocks`."""
        return hooks.Perturbation(self.kind, blocks)

    def blocks_for(self, denoiser: Denoiser) -> tuple[int, ...]:
        return self.blocks if self.blocks is not None else default_blocks(denoiser)

    def check(self, denoiser):
        require_network_blocks(self.name, denoiser, self.what)
        if self.cfg_scale is not None:
            self.require_null_class(self.name, denoiser)
        n, blocks = len(denoiser.parts().blocks), self.blocks_for(denoiser)
        bad = [k for k in blocks if not 0 <= k < n]
        if bad:
            raise UserError(f"guidance.blocks={list(blocks)}: block {bad[0]} is out of range; model "
                            f"{type(denoiser).__name__} has {n} blocks (0..{n - 1})")
        # the hooks check the rest (a block without self-attention, a processor diffusers cannot skip) at the call,
        # before anything is installed; the context is not entered here
        hooks.network_perturbed(denoiser, self.perturbation(blocks))

    def __call__(self, denoiser, x, t, labels):
        scale = self.weight(denoiser, t) if self.active(denoiser, t) else 0.0
        return perturbed_prediction(denoiser, x, t, labels, self.perturbation(self.blocks_for(denoiser)), scale,
                                    self.cfg_scale)


def perturbed_prediction(denoiser: Denoiser, x: torch.Tensor, t, labels: torch.Tensor, perturbation, scale: float,
                         cfg_scale: float | None = None) -> GuidedPrediction:
    """`combine_perturbed` of the predictions at (x, t): the perturbed conditional forward (skipped where scale is 0),
    then the conditional one (with the unconditional one in the same batched forward where cfg_scale is set).
    The perturbed forward runs first so that the last conditional forward, the one a sampler with learned variance
    takes its variance from (Denoiser.captured_variance), is the unperturbed network's."""
    cond_labels = denoiser.condition(labels, True)
    perturbed, nfe = None, 0
    if scale != 0:
        with hooks.network_perturbed(denoiser, perturbation):
            perturbed = denoiser.predict(x, t, cond_labels)
        nfe += 1
    if cfg_scale is not None:
        uncond, cond = denoiser.pair(x, t, labels)
        nfe += 2
    else:
        uncond, cond = None, denoiser.predict(x, t, cond_labels)
        nfe += 1
    return GuidedPrediction.of(combine_perturbed(denoiser, x, t, cond, perturbed, scale, uncond, cfg_scale), nfe=nfe)
