"""A guidance-distilled student's own guidance (Meng et al. 2023): the scale is an input of the network, which
predicts the guided eps in one evaluation per step (diffguide/models/student.py). scale = w in diffguide's
convention (1: the conditional model; Meng et al.'s w is this minus one)."""

from diffguide.errors import UserError
from diffguide.guidance.base import CFGLike, GuidedPrediction


class Distilled(CFGLike):
    name = "distilled"
    #: the student takes the scale as an input: no unconditional prediction
    needs_null_class = False

    def __init__(self, scale: float):
        super().__init__(scale)

    def check(self, denoiser):
        if not getattr(denoiser, "guidance_input", False):
            raise UserError("guidance=distilled needs a guidance-distilled student (model=fmnist_guided_student, "
                            "fmnist_guided_student_lora, fmnist_guided_student_8step, ..., or flux_dev): this model has no "
                            "guidance-scale input")
        denoiser.check_scale(self.scale)

    def __call__(self, denoiser, x, t, labels):
        return GuidedPrediction.of(denoiser.predict_guided(x, t, labels, self.scale), nfe=1)
