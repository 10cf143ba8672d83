"""Guidance-distilled students (Meng et al. 2023, "On Distillation of Guided Diffusion Models"): a class-conditional
UNet with a guidance-scale input that predicts, in one network evaluation, what the teacher's classifier-free
guidance predicts in two. Trained by diffguide/training/distill.py; sampled with `guidance=distilled` (the scale goes to the
network, not to a combination of two predictions).

Scale convention: diffguide's w (1 is the conditional model, as in cfg); Meng et al.'s w is this w minus one (their
guided prediction is (1 + w) x_c - w x_u).

Three kinds share the class `GuidedStudent`:
- stage 1 (`fmnist_guided_student`): a full copy of the teacher plus the scale embedding, for every sampler and step
  count;
- the LoRA variant (`fmnist_guided_student_lora`, "LoRA-Enhanced Distillation on Guided Diffusion Models"): the
  frozen teacher plus LoRA adapters (peft) and the scale embedding; its checkpoint holds only those and names the
  teacher's file by digest;
- progressive students (`fmnist_guided_student_8step`, ...): stage 1 distilled further (Salimans & Ho 2022) for one
  DDIM grid, `trained_steps` steps; they refuse other samplers and step counts.
"""

import copy
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from diffguide.store import checkpoint
from diffguide.errors import UserError
from diffguide.models import unet as unet_lib
from diffguide.models.parameterisation import Prediction

KIND = "guided-student"
LORA_KIND = "guided-student-lora"
#: the scale's sinusoidal features see 100 w: over w in [1, 4] the fastest of them turns about 50 times, the slowest
#: not at all (diffusers' Timesteps spans frequencies 1 .. 1e-4 as for timesteps 0..1000)
SCALE_FACTOR = 100.0


class GuidanceEmbedding(nn.Module):
    """The UNet's class embedding plus an embedding of the guidance scale (sinusoidal features -> MLP), as Meng et al.
    condition their student on w. UNet2DModel adds its class embedding to the time embedding, so this adds the
    scale's embedding there too. The MLP's last layer starts at zero: the untrained student is the teacher's
    conditional model at every scale.

    diffusers' UNet2DModel takes no extra embedding input (only `class_labels`), so the scale is set on this module
    for the length of one forward (`GuidedStudent.guided_output` does it)."""

    def __init__(self, classes: nn.Embedding, dim: int, features: int = 64):
        super().__init__()
        self.classes = classes
        self.features = Timesteps(features, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(features, dim)
        nn.init.zeros_(self.mlp.linear_2.weight)
        nn.init.zeros_(self.mlp.linear_2.bias)
        self.scale: torch.Tensor | None = None
        self.bypass = False  # True: the class embedding alone (a LoRA student's base run as the teacher)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return self.classes(labels)
        if self.scale is None:
            raise RuntimeError("a guided student's forward needs its guidance scale (GuidedStudent.guided_output)")
        emb = self.classes(labels)
        scale = self.scale.to(labels.device, torch.float32).expand(labels.shape[0])
        return emb + self.mlp(self.features(scale * SCALE_FACTOR).to(emb.dtype))


class GuidedStudent(unet_lib.UNetDenoiser):
    """A UNet denoiser with a guidance-scale input. `predict_guided(x, t, labels, w)` is the student's guided
    prediction; plain `predict` is refused (the student has no conditional or unconditional model apart from w).

    w_range: the scales it was trained on; trained_steps: None for a stage-1 student (any sampler), else the number
    of DDIM (eta = 0, trailing) steps a progressive student was distilled for."""

    #: a guidance method that feeds the scale to the network (guidance=distilled) checks for this
    guidance_input = True

    def __init__(self, unet, num_classes, scheduler_config, w_range, trained_steps=None):
        super().__init__(unet, num_classes, scheduler_config)
        if not isinstance(unet.class_embedding, GuidanceEmbedding):
            unet.class_embedding = GuidanceEmbedding(unet.class_embedding, unet.time_embedding.linear_2.out_features)
        self.w_range = (float(w_range[0]), float(w_range[1]))
        self.trained_steps = trained_steps
        self.teacher = None  # {"file": name, "sha256": digest} of the teacher a LoRA student is built on
        self.lora = None     # the LoRA config (peft LoraConfig's fields) of a LoRA student (set by add_lora)

    @property
    def embedding(self) -> GuidanceEmbedding:
        return self.unet.class_embedding

    def _output(self, x, t, labels):
        if labels is None or (self.null_class is not None and bool((labels == self.null_class).any())):
            raise UserError("a guided student predicts for a class only: it has no unconditional model")
        return super()._output(x, t, labels)

    @contextmanager
    def _at_scale(self, w, device: torch.device):
        """The forwards within see guidance scale(s) w (a number or a (batch,) tensor)."""
        self.embedding.scale = torch.as_tensor(w, dtype=torch.float32, device=device)
        try:
            yield
        finally:
            self.embedding.scale = None

    def guided_output(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, w) -> torch.Tensor:
        """The network's output (eps) at per-row model times t for guidance scale(s) w: the batched forward of
        training."""
        with self._at_scale(w, x.device):
            return self.raw_output(x, t, labels)

    def predict_guided(self, x: torch.Tensor, t, labels: torch.Tensor, w) -> Prediction:
        """The student's guided prediction at level t: one network evaluation."""
        with self._at_scale(w, x.device):
            return self.predict(x, t, labels)

    def check_sampling(self, sampler, guidance) -> None:
        refuse_other_guidance(guidance)
        if self.trained_steps is None:
            return
        eta = getattr(sampler, "eta", 0.0)
        if sampler.name != "ddim" or eta != 0 or sampler.spacing != "trailing" or sampler.steps != self.trained_steps:
            raise UserError(f"this student was distilled for sampler=ddim steps={self.trained_steps} (eta 0, "
                            f"trailing spacing): run it with steps={self.trained_steps} sampler=ddim")

    def check_scale(self, scale: float) -> None:
        lo, hi = self.w_range
        if not lo - 1e-9 <= scale <= hi + 1e-9:
            raise UserError(f"scale={scale:g} is outside the scales this student was trained on, [{lo:g}, {hi:g}]")


def refuse_other_guidance(guidance) -> None:
    """A guidance-distilled model is sampled with its own guidance only (guidance=distilled)."""
    if guidance is not None and guidance.name != "distilled":
        raise UserError(f"guidance={guidance.name} does not apply to a guidance-distilled student: the student "
                        f"takes the scale itself; use guidance=distilled scale=W (it is this model's default)")


def from_teacher(teacher: unet_lib.UNetDenoiser, w_range, trained_steps=None) -> GuidedStudent:
    """A stage-1 student initialised from the teacher: the same weights, and a scale embedding that starts at zero."""
    if teacher.parameterisation.name != "eps" or teacher.null_class is None:
        raise UserError("guidance distillation needs an eps-prediction teacher with a null class (fmnist_unet)")
    unet = copy.deepcopy(teacher.unet)
    return GuidedStudent(unet, teacher.num_classes, teacher.scheduler_config, w_range, trained_steps)


def copy_student(student: GuidedStudent, trained_steps=None) -> GuidedStudent:
    """A full student with the weights of `student`, for the next round of progressive distillation."""
    if student.lora is not None:
        raise UserError("progressive distillation starts from a full stage-1 student, not a LoRA one")
    return GuidedStudent(copy.deepcopy(student.unet), student.num_classes, student.scheduler_config,
                         student.w_range, trained_steps)


# --- LoRA -----------------------------------------------------------------------------------------------------------

def add_lora(student: GuidedStudent, rank: int, alpha: float, target_modules: list[str]) -> GuidedStudent:
    """Freeze the student's UNet and inject LoRA adapters into `target_modules` (peft's inject_adapter_in_model, the
    call diffusers' own PeftAdapterMixin makes; UNet2DModel does not inherit that mixin). The scale embedding's MLP
    stays trainable: it is new, the teacher has nothing to adapt."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True)
    student.unet.requires_grad_(False)
    inject_adapter_in_model(config, student.unet)
    student.embedding.mlp.requires_grad_(True)
    student.lora = {"r": rank, "lora_alpha": alpha, "target_modules": list(target_modules)}
    return student


def adapters_disabled(student: GuidedStudent):
    """A context within which a LoRA student's network is its frozen base (the teacher): LoRA-Enhanced
    Distillation's teacher shares the student's weights, one network in memory, not two."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    @contextmanager
    def context():
        layers = [m for m in student.unet.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        student.embedding.bypass = True
        try:
            yield
        finally:
            student.embedding.bypass = False
            for layer in layers:
                layer.enable_adapters(True)

    return context()


class LoraBase(unet_lib.UNetDenoiser):
    """A LoRA student's frozen base as a denoiser of its own: the same modules (no copy of the weights), run with
    the adapters and the scale embedding switched off: the teacher of LoRA-Enhanced Distillation."""

    def __init__(self, student: GuidedStudent):
        super().__init__(student.unet, student.num_classes, student.scheduler_config)
        self._student = [student]  # a list: not registered as a submodule

    def _output(self, x, t, labels):
        with adapters_disabled(self._student[0]):
            return super()._output(x, t, labels)


def trainable_state(student: GuidedStudent) -> dict[str, torch.Tensor]:
    """What a LoRA student stores: its adapters and the scale embedding's MLP (the base is the teacher's file)."""
    return {k: v for k, v in student.unet.state_dict().items()
            if "lora_" in k or k.startswith("class_embedding.mlp.")}


def base_state(student: GuidedStudent) -> dict[str, torch.Tensor]:
    """The LoRA student's frozen base weights under the teacher's own names (peft renames a wrapped layer's weight
    to `base_layer.weight`)."""
    return {k.replace(".base_layer.", ".").replace("class_embedding.classes.", "class_embedding."): v
            for k, v in student.unet.state_dict().items()
            if "lora_" not in k and not k.startswith("class_embedding.mlp.")}


# --- checkpoints ----------------------------------------------------------------------------------------------------

def _card(student: GuidedStudent) -> dict:
    return {"w_range": list(student.w_range), "trained_steps": student.trained_steps}


def save(student: GuidedStudent, path: Path, extra: dict | None = None) -> None:
    if student.lora is not None:
        checkpoint.save(path, trainable_state(student), LORA_KIND,
                        {**_card(student), "teacher": student.teacher, "lora": student.lora, **(extra or {})})
        return
    checkpoint.save(path, student.unet.state_dict(), KIND,
                    {**unet_lib.config_of(student), **_card(student), **(extra or {})})


def load(weights: str, teacher: str | None = None, merge: bool = True) -> GuidedStudent:
    """The `_target_` of conf/model/fmnist_guided_student*.yaml. A full student rebuilds from its own checkpoint; a
    LoRA student needs its teacher's file (`teacher`), checked against the digest recorded at training, and with
    `merge` its adapters are merged into the base weights (peft's merge: the same network, sampled at a full
    student's speed; the frozen base is then no longer the teacher's bit for bit)."""
    if teacher is None:
        tensors, config = checkpoint.load(weights, KIND)
        base = unet_lib.build(config["unet"], config["num_classes"], config["scheduler"])
        student = GuidedStudent(base.unet, config["num_classes"], config["scheduler"], config["w_range"],
                                config.get("trained_steps"))
        student.unet.load_state_dict(tensors)
        return student.eval().requires_grad_(False)
    tensors, config = checkpoint.load(weights, LORA_KIND)
    if not Path(teacher).is_file():
        raise UserError(f"model.teacher: weights file not found: {teacher} (a LoRA student is its teacher's file "
                        f"plus the adapters in {Path(weights).name})")
    recorded = (config.get("teacher") or {}).get("sha256")
    if recorded is not None and checkpoint.file_digest(teacher, 64) != recorded:
        raise UserError(f"model.teacher={teacher} is not the teacher this LoRA student was trained on (its sha256 "
                        f"differs from the one recorded in {Path(weights).name})")
    student = from_teacher(unet_lib.load(teacher), config["w_range"], config.get("trained_steps"))
    lora = config["lora"]
    add_lora(student, lora["r"], lora["lora_alpha"], lora["target_modules"])
    student.teacher = config.get("teacher")
    missing = set(trainable_state(student)) - set(tensors)
    if missing or set(tensors) - set(trainable_state(student)):
        raise UserError(f"{weights} does not match the LoRA layout it names ({len(missing)} tensors missing)")
    student.unet.load_state_dict(tensors, strict=False)
    if merge:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in student.unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
    return student.eval().requires_grad_(False)


def parameter_counts(student: GuidedStudent) -> dict:
    """Parameters in all, trainable ones, and those a checkpoint of this student stores."""
    total = sum(p.numel() for p in student.unet.parameters())
    trainable = sum(p.numel() for p in student.unet.parameters() if p.requires_grad)
    stored = sum(v.numel() for v in (trainable_state(student) if student.lora is not None
                                     else student.unet.state_dict()).values())
    return {"parameters": total, "trainable": trainable, "stored": stored,
            "trainable_fraction": round(trainable / total, 4) if total else math.nan}
