"""PPAP experts (Go et al. 2023, "Towards Practical Plug-and-Play Diffusion Models", CVPR): one off-the-shelf
clean-image classifier turned into K noise-aware experts, expert k fine-tuned on the noise levels of its own range
of timesteps [b_k, b_{k+1}), parameter-efficiently (LoRA adapters on a shared frozen backbone, or only the last
blocks per expert), by knowledge transfer from the clean classifier on images the diffusion model generated itself
(no labels; `diffguide/training/ppap.py` trains them). Classifier guidance (`guidance=classifier classifier=fmnist_ppap`)
asks `log_prob(x_t, t)`, which routes to the expert of t's range (the paper's Sec. 4.1: "each expert is
responsible for a range of timesteps" and guidance uses the expert of the current step).

Routing and storage are this project's: peft supplies the LoRA layers and the switch between adapters
(`PeftModel.set_adapter`); what no library does is pick an adapter from the noise level, which is the few lines here.
"""

import bisect
import copy
from pathlib import Path

import torch
from torch import nn

from diffguide.store import checkpoint
from diffguide.classifiers.base import Classifier
from diffguide.classifiers.clean import _relu_to_softplus
from diffguide.errors import UserError
from diffguide.models.schedules import DiscreteVP, Level
from diffguide.classifiers import evaluator as evaluator_lib

KIND = "ppap-experts"
TUNINGS = ("lora", "last", "full")


def uniform_boundaries(num_experts: int, num_timesteps: int) -> list[int]:
    """K + 1 boundaries splitting the timesteps 0..T-1 into K ranges of (nearly) equal length: expert k covers
    [b_k, b_{k+1}) (the paper's uniform split of the timesteps among its experts)."""
    if num_experts < 1 or num_experts > num_timesteps:
        raise UserError(f"num_experts must lie in [1, {num_timesteps}] (got {num_experts})")
    return [round(k * num_timesteps / num_experts) for k in range(num_experts + 1)]


def _lora_targets(net: nn.Module) -> list[str]:
    """Every convolution and linear layer of the backbone (the paper's LoRA on the classifier's weights)."""
    return [name for name, module in net.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]


def _last_blocks(net: nn.Module, count: int) -> list[str]:
    """The names of the backbone's last `count` top-level children that hold parameters (a timm ResNet: layer4 and
    fc for count 2), the part one expert fine-tunes with tuning=last."""
    named = [name for name, child in net.named_children() if any(True for _ in child.parameters())]
    if not 1 <= count <= len(named):
        raise UserError(f"last_blocks must lie in [1, {len(named)}] for this classifier (got {count})")
    return named[-count:]


class PPAPExperts(Classifier):
    """K experts p_k(y | x_t) over one backbone, `log_prob(x, t)` routed by t's timestep.

    The input is the noisy image in the model's coordinates; it enters the backbone as (x + 1) / 2 without a clip
    (a noisy image leaves [0, 1]; the experts were fine-tuned on it so), normalised as the clean classifier was.
    The backbone's BatchNorm layers keep the clean classifier's running statistics (frozen in training too: they
    are shared by every expert)."""

    def __init__(self, backbone: evaluator_lib.Evaluator, boundaries: list[int], scheduler_config: dict,
                 tuning: str = "lora", lora_rank: int = 8, last_blocks: int = 2, softplus_beta: float | None = None):
        super().__init__()
        if tuning not in TUNINGS:
            raise UserError(f"tuning={tuning!r} is not one of {', '.join(TUNINGS)}")
        if len(boundaries) < 2 or list(boundaries) != sorted(set(boundaries)):
            raise UserError(f"expert boundaries must increase strictly (got {list(boundaries)})")
        self.config = {"backbone": backbone.config, "boundaries": list(boundaries),
                       "scheduler": dict(scheduler_config), "tuning": tuning, "lora_rank": lora_rank,
                       "last_blocks": last_blocks, "softplus_beta": softplus_beta}
        self.boundaries = list(boundaries)
        self.num_experts = len(boundaries) - 1
        self.num_classes = backbone.config["num_classes"]
        from diffusers import DDPMScheduler

        alphas = DDPMScheduler.from_config(dict(scheduler_config)).alphas_cumprod
        self.schedule = DiscreteVP(alphas, dict(scheduler_config))
        self.normalize = backbone.normalize
        if softplus_beta is not None:
            _relu_to_softplus(backbone.net, float(softplus_beta))
        self.tuning = tuning
        self._active = None
        if tuning == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=_lora_targets(backbone.net),
                              lora_dropout=0.0)
            self.net = get_peft_model(backbone.net, lora, adapter_name="expert_0")
            for k in range(1, self.num_experts):
                self.net.add_adapter(f"expert_{k}", lora)
            self.experts = None
        else:
            tuned = (_last_blocks(backbone.net, last_blocks) if tuning == "last"
                     else [name for name, _ in backbone.net.named_children()])
            self.tuned = tuned
            self.net = backbone.net
            # one copy of the tuned children per expert; the rest of the backbone is shared
            self.experts = nn.ModuleList(nn.ModuleDict({name.replace(".", "_"): copy.deepcopy(getattr(self.net, name))
                                                        for name in tuned}) for _ in range(self.num_experts))
        self.select(0)
        self.eval()

    # -- routing --

    def expert_of(self, timestep: float) -> int:
        """The expert whose range [b_k, b_{k+1}) holds `timestep` (the ends clamp to the first and last expert)."""
        k = bisect.bisect_right(self.boundaries, float(timestep)) - 1
        return min(max(k, 0), self.num_experts - 1)

    def select(self, k: int) -> None:
        """Make expert k the one the backbone computes with."""
        if not 0 <= k < self.num_experts:
            raise ValueError(f"expert {k} out of range [0, {self.num_experts})")
        if k == self._active:
            return
        if self.experts is None:
            self.net.set_adapter(f"expert_{k}")
        else:
            for name in self.tuned:
                setattr(self.net, name, self.experts[k][name.replace(".", "_")])
        self._active = k

    def expert_parameters(self, k: int) -> list[nn.Parameter]:
        """The parameters that fine-tuning expert k trains (its LoRA factors, or its copy of the tuned blocks)."""
        if self.experts is None:
            return [p for name, p in self.net.named_parameters() if f".expert_{k}." in name and "lora_" in name]
        return list(self.experts[k].parameters())

    def train(self, mode: bool = True):
        """BatchNorm stays in eval mode (the clean classifier's statistics, shared by the experts)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    # -- classification --

    def logits_of(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Expert k's logits for noisy images x in the model's coordinates."""
        self.select(k)
        return self.net(self.normalize((x + 1) / 2))

    def timestep(self, x: torch.Tensor, t) -> tuple[torch.Tensor, float]:
        """(the input, the timestep on the experts' schedule) for a Level or a timestep: a Level of a continuous
        model (flow, EDM) is the VP state of the same sigma, x / sqrt(alpha^2 + noise^2), at its fractional
        timestep, as for the noise-aware classifier (classifiers/noisy.py)."""
        if isinstance(t, Level):
            if isinstance(t.t, int):
                return x, float(t.t)
            return x / t.norm, float(self.schedule.time_of(t.sigma))
        return x, float(t)

    def log_prob(self, x, t):
        x, time = self.timestep(x, t)
        return torch.log_softmax(self.logits_of(x, self.expert_of(time)).float(), dim=1)


def _stored(model: PPAPExperts, state: dict) -> dict:
    """The state without the backbone's slots of the tuned blocks (tuning last/full): those hold whichever expert's
    copy is selected, stored once already under experts.K."""
    if model.experts is None:
        return state
    attached = tuple(f"net.{name}." for name in model.tuned)
    return {k: v for k, v in state.items() if not k.startswith(attached)}


def save(model: PPAPExperts, path: Path, extra: dict | None = None) -> None:
    checkpoint.save(path, {k: v.detach() for k, v in _stored(model, model.state_dict()).items()}, KIND,
                    {**model.config, **(extra or {})})


def load(weights: str) -> PPAPExperts:
    """`classifier=fmnist_ppap`: the experts `python -m diffguide.train train=fmnist_ppap` wrote."""
    if not Path(weights).is_file():
        raise UserError(f"classifier.weights={weights}: no such file (train it with "
                        f"`python -m diffguide.train train=fmnist_ppap`)")
    tensors, config = checkpoint.load(weights, KIND)
    b = config["backbone"]
    backbone = evaluator_lib.Evaluator(b["timm_model"], b["num_classes"], b["in_chans"], b.get("timm_kwargs"))
    model = PPAPExperts(backbone, config["boundaries"], config["scheduler"], config["tuning"], config["lora_rank"],
                        config["last_blocks"], config["softplus_beta"])
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # the tuned slots of the backbone are the selected expert's own modules, loaded under experts.K
    if unexpected or set(missing) - (set(model.state_dict()) - set(_stored(model, model.state_dict()))):
        raise UserError(f"classifier.weights={weights}: the file's tensors do not match its experts' configuration")
    return model.eval().requires_grad_(False)
