"""The checks and placement of a second model: autoguidance's weak model, gfcg's autoguidance base."""

from diffguide.errors import UserError
from diffguide.models.denoiser import Denoiser


def prepare_weak_model(name: str, weak: Denoiser, denoiser: Denoiser) -> None:
    """The weak model must share the main model's noise process and classes; it runs on its device and precision."""
    if not isinstance(weak, Denoiser):
        raise UserError(f"guidance={name} needs a weak model: set guidance.weak_model")
    if not weak.same_noise_process(denoiser):
        raise UserError(f"guidance={name}: the weak model was trained on another noise schedule than the "
                        "main model, so their predictions cannot be mixed")
    if weak.num_classes != denoiser.num_classes:
        raise UserError(f"guidance={name}: the weak model knows {weak.num_classes} classes, "
                        f"the main model {denoiser.num_classes}")
    weak.to(denoiser.device).set_precision(denoiser.autocast_dtype)
