"""Perturbed forwards of a model's own network, for guidance methods that contrast the network with a weakened
copy of itself, without knowing the model family.

A model family declares the parts of its network that hooks may act on (`Denoiser.parts()`: a `Parts` of its
blocks, each block's self-attention, its time embeddings and its label embeddings); every hook lives here. A guidance
method declares what to do to the blocks (`Perturbation`) and runs its extra forward inside
`network_perturbed(model, perturbation)`; TSG perturbs the time embeddings' outputs (`outputs_perturbed`); null-text
inversion replaces the null class's rows of the label embeddings (`null_embeddings_replaced`). Text conditioning
declares its encoders' parts the same way. Three perturbation kinds, those of diffusers' guiders:

- attention_identity (PAG, Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with Perturbed-Attention
  Guidance"): the self-attention map of the chosen blocks is the identity, so the attention's output is its value
  projection, then its output projection (diffusers' PAGIdentitySelfAttnProcessor2_0, perturbed path).
- attention_blur (SEG, Hong 2024, "Smoothed Energy Guidance"): the queries of the chosen self-attentions are
  Gaussian-blurred over the token grid; blur_sigma=inf (the default) replaces every query by their mean, i.e. a
  uniform attention map.
- skip_block (SLG / STG): the chosen blocks are skipped (each returns its input).

The change is made with diffusers' hook machinery (`diffusers.hooks.HookRegistry`, the layer-skip hooks that
diffusers' SkipLayerGuidance and PerturbedAttentionGuidance install in `prepare_models` and remove in
`cleanup_models`) and leaves no trace: on exit, even through an exception, every module has the forward, the
processor and the hook registry (none, where it had none) it had before. Parameters are never touched.
"""

import itertools
import math
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks._helpers import AttentionProcessorRegistry, TransformerBlockRegistry
from diffusers.hooks.layer_skip import AttentionProcessorSkipHook, TransformerBlockSkipHook
from diffusers.models.attention_processor import Attention
from torch import nn

from diffguide.errors import UserError

KINDS = ("attention_identity", "attention_blur", "skip_block")

_names = itertools.count()  # each context's hooks get their own name, so perturbations nest
_MISSING = object()


@dataclass(frozen=True)
class Perturbation:
    """What to do to the network: `kind` (one of KINDS) in the blocks `blocks` (indices into the model's
    `blocks()`); `blur_sigma` is attention_blur's Gaussian width in tokens (inf: the mean query)."""

    kind: str
    blocks: tuple[int, ...]
    blur_sigma: float = math.inf

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"unknown network perturbation {self.kind!r}: choose one of {', '.join(KINDS)}")
        blocks = (self.blocks,) if isinstance(self.blocks, int) else tuple(dict.fromkeys(int(k) for k in self.blocks))
        if not blocks:
            raise UserError(f"perturbation {self.kind} needs at least one block index")
        object.__setattr__(self, "blocks", blocks)
        if self.kind == "attention_blur" and not float(self.blur_sigma) > 0:
            raise UserError(f"attention_blur needs blur_sigma > 0 (inf: uniform attention); got {self.blur_sigma}")
        object.__setattr__(self, "blur_sigma", float(self.blur_sigma))


@dataclass
class Parts:
    """What a model family declares to the hooks (`Denoiser.parts()`); empty lists where it has none of a kind.

    blocks: the blocks a perturbation may act on (`Perturbation.blocks` indexes this list), in forward order.
    attention: each block's self-attention layer (a diffusers Attention), or None where it has none.
    time_embeddings: the modules whose outputs are the timestep embedding, (batch, dim) per call: the time path only,
        never a class or label embedding (TSG perturbs them; a module may be called more than once in a forward).
    label_embeddings: the modules mapping class labels (batch,) to class embeddings (batch, dim), the null class's
        row included (null-text inversion replaces that row's output per image).
    names: each block's name in the network (diffusers' module path: "down_blocks.1.attentions.0.transformer_blocks.0"),
        where the family gives them, so that a method's layer list can be read against the paper's.
    """

    blocks: list[nn.Module] = field(default_factory=list)
    attention: list[nn.Module | None] = field(default_factory=list)
    time_embeddings: list[nn.Module] = field(default_factory=list)
    label_embeddings: list[nn.Module] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.attention:
            self.attention = [None] * len(self.blocks)
        if len(self.attention) != len(self.blocks):
            raise ValueError(f"{len(self.blocks)} blocks but {len(self.attention)} attention entries")


def self_attention_layers(*parts: nn.Module | None) -> list[nn.Module]:
    """The diffusers self-attention layers (`Attention`, not cross-attention) inside `parts`, in the order given
    (e.g. a UNet's down blocks, mid block, up blocks: its forward order); None parts are passed over."""
    return [m for part in parts if part is not None for m in part.modules()
            if isinstance(m, Attention) and not m.is_cross_attention]


class QueryBlurHook(ModelHook):
    """SEG's query blur as a diffusers hook on an attention's `to_q`, written here because diffusers' own
    (diffusers/hooks/smoothed_energy_guidance_utils.py, 0.42.1: SmoothedEnergyGuidanceHook / _gaussian_blur_2d) has
    its two branches swapped: a finite sigma gives the mean query and sigma=inf raises OverflowError in
    math.ceil(6 * inf) (huggingface/diffusers PR #14187, open). As SEG-SDXL's pipeline_seg.py: kernel size
    ceil(6 sigma) rounded up to odd, reflect padding; the kernel is clamped to the grid, as diffusers does."""

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma

    def post_forward(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
        if math.isinf(self.sigma):  # uniform attention: every query is the mean query (any token layout)
            return output.mean(dim=1, keepdim=True).expand_as(output)
        batch, tokens, dim = output.shape
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise UserError(f"attention_blur with a finite blur_sigma needs a square token grid; this attention has "
                            f"{tokens} tokens (blur_sigma=inf works on any)")
        size = math.ceil(6 * self.sigma) + 1 - math.ceil(6 * self.sigma) % 2
        size = min(size, side - (side % 2 - 1))
        x = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size, device=output.device)
        kernel = torch.exp(-0.5 * (x / self.sigma) ** 2)
        kernel = kernel / kernel.sum()
        kernel = (kernel[:, None] * kernel[None, :]).to(output.dtype).expand(dim, 1, size, size)
        grid = F.pad(output.transpose(1, 2).reshape(batch, dim, side, side), [size // 2] * 4, mode="reflect")
        return F.conv2d(grid, kernel, groups=dim).reshape(batch, dim, tokens).transpose(1, 2)


def _skip_output_fn(attention: nn.Module, what: str):
    """diffusers' layer-skip metadata for this attention's processor (it knows which processors compute attention
    through scaled_dot_product_attention, the call the identity hook intercepts)."""
    try:
        return AttentionProcessorRegistry.get(type(attention.processor)).skip_processor_output_fn
    except ValueError:
        raise UserError(f"{what}: diffusers' layer skip does not know its attention processor "
                        f"{type(attention.processor).__name__}") from None


def _hooks(modules: Sequence[tuple[nn.Module, nn.Module | None]], perturbation: Perturbation, name: str):
    """(module, hook) pairs to install, every module checked before anything is installed."""
    n = len(modules)
    if not n:
        raise UserError(f"{perturbation.kind} guidance needs a network with self-attention blocks; model {name} "
                        f"has none")
    pairs = []
    for k in perturbation.blocks:
        if not 0 <= k < n:
            raise UserError(f"{perturbation.kind}: block {k} is out of range; model {name} has {n} blocks (0..{n - 1})")
        block, attention = modules[k]
        what = f"{perturbation.kind} in block {k} of model {name}"
        if perturbation.kind == "skip_block":
            try:  # a transformer block diffusers knows how to skip (it returns its hidden_states input)
                TransformerBlockRegistry.get(type(block))
                pairs.append((block, TransformerBlockSkipHook(dropout=1.0)))
            except ValueError:
                if not isinstance(block, Attention):
                    raise UserError(f"{what}: diffusers cannot skip a {type(block).__name__}") from None
                # a block that is an attention layer itself (a UNet's): skipping it returns its input
                pairs.append((block, AttentionProcessorSkipHook(_skip_output_fn(block, what), dropout=1.0)))
            continue
        if attention is None:
            raise UserError(f"{what}: the block has no self-attention")
        if perturbation.kind == "attention_identity":
            # diffusers' PAG: scaled_dot_product_attention(q, k, v) returns v (layer_skip.py,
            # AttentionScoreSkipFunctionMode), so the processor's norms, output projection and residual still apply
            pairs.append((attention, AttentionProcessorSkipHook(_skip_output_fn(attention, what),
                                                                skip_attention_scores=True)))
        else:
            if not isinstance(getattr(attention, "to_q", None), nn.Linear):
                raise UserError(f"{what}: the attention has no to_q projection to blur")
            pairs.append((attention.to_q, QueryBlurHook(perturbation.blur_sigma)))
    return pairs


def _install(module: nn.Module, hook: ModelHook, hook_name: str):
    """Register `hook` on `module`; the returned record undoes it (also when the registration itself fails)."""
    record = (module, "_diffusers_hook" in module.__dict__, module.__dict__.get("forward", _MISSING), hook_name)
    try:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, hook_name)
    except BaseException:
        _uninstall(record)
        raise
    return record


def _uninstall(record) -> None:
    """Remove the hook, then what diffusers' remove_hook leaves behind: the registry it created and the instance
    attribute `forward` it sets (the module's class forward is then its forward again)."""
    module, had_registry, forward, hook_name = record
    registry = module.__dict__.get("_diffusers_hook")
    if registry is None:
        return
    registry.remove_hook(hook_name, recurse=False)
    if registry.hooks:
        return
    if not had_registry:
        del module._diffusers_hook
    if forward is _MISSING:
        module.__dict__.pop("forward", None)
    else:
        module.forward = forward


def perturbed(modules: Sequence[tuple[nn.Module, nn.Module | None]], perturbation: Perturbation,
              name: str = "network") -> AbstractContextManager[None]:
    """A context manager within which the network whose blocks are `modules` ((block, its self-attention or None)
    pairs, in the order `perturbation.blocks` indexes) runs perturbed; on exit it is as it was. Raises here, at the
    call, before anything is changed, a one-line UserError for a network without blocks or a bad block index
    (`name` names the model in it)."""
    pairs = _hooks(list(modules), perturbation, name)
    return _installed(pairs, f"diffguide_{perturbation.kind}_{next(_names)}")


def network_perturbed(model, perturbation: Perturbation) -> AbstractContextManager[None]:
    """`perturbed` on the blocks `model.parts()` declares: within the context, the model's forwards run its network
    perturbed as `perturbation` says; on exit the network is as it was. Raises, at the call, a one-line UserError
    when the model declares no blocks or a block index is out of range."""
    parts = model.parts()
    return perturbed(list(zip(parts.blocks, parts.attention)), perturbation, name=type(model).__name__)


@contextmanager
def _installed(pairs: list[tuple[nn.Module, ModelHook]], hook_name: str) -> Iterator[None]:
    installed = []
    try:
        for module, hook in pairs:
            installed.append(_install(module, hook, hook_name))
        yield
    finally:
        for record in reversed(installed):
            _uninstall(record)


# --- Output perturbation (TSG): a module's output replaced by a function of it ----------------------------------------


class OutputHook(ModelHook):
    """Replaces a module's output y by perturb(y), as a diffusers hook (post_forward)."""

    def __init__(self, perturb):
        super().__init__()
        self.perturb = perturb

    def post_forward(self, module: nn.Module, output):
        return self.perturb(output)


def outputs_perturbed(modules: Sequence[nn.Module], perturb, name: str = "network",
                      what: str = "output perturbation") -> AbstractContextManager[None]:
    """A context manager within which every forward of each module in `modules` returns perturb(output) instead of
    its output (`perturb` is called once per call of a module, with that call's output; a module called twice in a
    forward is perturbed twice). On exit, even through an exception, every module has the forward and the hook
    registry it had before; parameters are never touched. Raises here, at the call, a one-line UserError where
    `modules` is empty (`name` names the model, `what` the method, in it)."""
    modules = list({id(module): module for module in modules}.values())  # each module hooked once
    if not modules:
        raise UserError(f"{what} needs the network's modules to perturb; model {name} declares none")
    pairs = [(module, OutputHook(perturb)) for module in modules]
    return _installed(pairs, f"diffguide_output_{next(_names)}")


# --- The null class's embedding replaced (null-text inversion) -------------------------------------------------------


class NullEmbeddingHook(ModelHook):
    """Replaces, in the output of a label-embedding module (labels (batch,) -> (batch, dim)), the rows of the null
    class by `value` ((n, dim): one row per null row of the call, in order; or (1, dim): the same for all). The
    labels are read in pre_forward (the module's first argument, or its `labels`/`class_labels` keyword)."""

    def __init__(self, value: torch.Tensor, null_class: int):
        super().__init__()
        self.value, self.null_class = value, null_class
        self._labels = None

    def pre_forward(self, module, *args, **kwargs):
        labels = args[0] if args else kwargs.get("labels", kwargs.get("class_labels"))
        self._labels = labels
        return args, kwargs

    def post_forward(self, module, output):
        labels, self._labels = self._labels, None
        if labels is None or not torch.is_tensor(output):
            return output
        mask = labels.reshape(-1) == self.null_class
        n = int(mask.sum())
        if n == 0:
            return output
        value = self.value
        if value.shape[0] == 1:
            value = value.expand(n, *value.shape[1:])
        elif value.shape[0] != n:
            raise ValueError(f"null-embedding override: this forward has {n} null-class rows, but {value.shape[0]} "
                             f"embeddings were given (one per image, or one for all)")
        out = output.clone()
        out[mask] = value.to(device=out.device, dtype=out.dtype)
        return out


def null_embeddings_replaced(denoiser, values: Sequence[torch.Tensor]):
    """A context manager within which the null-class rows of every label-embedding module of `denoiser`
    (`parts().label_embeddings`, in order) are replaced by `values[k]` (module k's (batch, dim) or (1, dim) tensor;
    may require grad). On exit, even through an exception, every module has the forward and the hook registry it had
    before; parameters are never touched."""
    modules = denoiser.parts().label_embeddings
    if not modules:
        raise UserError(f"model {type(denoiser).__name__} has no label embedding to replace the null class's "
                        f"(null-text inversion needs one: the UNet and DiT families have it)")
    if denoiser.null_class is None:
        raise UserError(f"model {type(denoiser).__name__} has no null class")
    values = list(values)
    if len(values) != len(modules):
        raise ValueError(f"{len(values)} null embeddings given for {len(modules)} label-embedding modules")
    pairs = [(module, NullEmbeddingHook(value, denoiser.null_class)) for module, value in zip(modules, values)]
    return _installed(pairs, f"diffguide_null_embedding_{next(_names)}")
