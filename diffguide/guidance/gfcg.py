"""Gradient-free classifier guidance (Shenoy et al. 2024, "Gradient-Free Classifier Guidance for Diffusion Model
Sampling", arXiv 2411.15393).

An off-the-shelf classifier, used in inference mode only (no gradients), looks at the conditional model's denoised
estimate x0_c at every step and picks a reference class and a scale; the guidance direction is the difference
between the target-class and the reference-class predictions, added to a base prediction:
    eps = eps_base + s_t (eps(x_t, y) - eps(x_t, c_ref))
    base = none:          eps_base = eps(x_t, y)
           cfg:           eps_base = eps(x_t, null) + w (eps(x_t, y) - eps(x_t, null))
           autoguidance:  eps_base = eps_weak(x_t, y) + w (eps(x_t, y) - eps_weak(x_t, y))     (w = base_scale)
NOT THE PAPER'S METHOD AS PUBLISHED, in three ways, so that no result of it is taken for the paper's:
  1. the paper's method section was not reachable from this project (no official code is public either);
  2. the reference-class and scale rules below are this project's reading of "a time-adaptive reference class and
     a scale that depends on how confused the model is", not the paper's formulas;
  3. it costs one more network evaluation per step than its base (3 with cfg or autoguidance), where the paper's
     abstract says the combination with autoguidance has no additional computational overhead.
The two rules, with p = softmax(f(x0_c)):
    c_ref = argmax_{k != y} p_k                  (the class the sample is most at risk of turning into)
    s_t   = scale * p_ref / (p_y + p_ref)        (0 when the classifier is sure of y, scale/2 when it cannot tell
                                                  y from c_ref, towards scale when c_ref dominates)
NFE per step: 1 (target) + 1 (reference, which depends on the target's x0, so it cannot share its batch) + 1 for a
cfg or autoguidance base (batched with the target). The classifier's forward is not counted.
"""

import torch

from diffguide.classifiers.clean import CleanClassifier
from diffguide.errors import UserError
from diffguide.guidance.base import Guidance, GuidedPrediction
from diffguide.guidance.combine import combine
from diffguide.guidance.weak_model import prepare_weak_model
from diffguide.models.denoiser import Denoiser

BASES = ("none", "cfg", "autoguidance")


class GradientFreeClassifierGuidance(Guidance):
    name = "gfcg"

    def __init__(self, classifier: CleanClassifier, scale: float = 1.0, base: str = "cfg", base_scale: float = 1.5,
                 weak_model=None):
        if not isinstance(classifier, CleanClassifier):
            raise UserError("guidance=gfcg needs a clean-image classifier: choose one with classifier=NAME")
        if base not in BASES:
            raise UserError(f"guidance=gfcg: base {base!r} is not one of {', '.join(BASES)}")
        if base == "autoguidance" and callable(weak_model) and not isinstance(weak_model, Denoiser):
            weak_model = weak_model()  # a `_partial_` model node: loaded only when the autoguidance base uses it
        if base == "autoguidance" and not isinstance(weak_model, Denoiser):
            raise UserError("guidance=gfcg base=autoguidance needs a weak model: set guidance.weak_model")
        self.classifier, self.scale = classifier, self.check_scale(self.name, scale)
        self.base, self.base_scale = base, self.check_scale(self.name + " base_scale", base_scale)
        self.weak = weak_model

    def check(self, denoiser):
        if not denoiser.num_classes:
            raise UserError("guidance=gfcg needs a class-conditional model")
        self.check_classes(self.classifier, denoiser)
        if self.classifier.num_classes < 2:
            raise UserError("guidance=gfcg needs a classifier of at least two classes")
        self.classifier.attach(denoiser)
        if self.base == "cfg":
            self.require_null_class(self.name, denoiser)
        if self.base == "autoguidance":
            prepare_weak_model(self.name, self.weak, denoiser)

    @torch.no_grad()
    def reference(self, x0: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_ref, s_t / scale) per sample from the classifier's view of x0."""
        p = torch.softmax(self.classifier.logits(x0).float(), dim=1)
        p_y = p.gather(1, labels.view(-1, 1)).squeeze(1)
        others = p.scatter(1, labels.view(-1, 1), -1.0)
        p_ref, ref = others.max(dim=1)
        return ref, p_ref / (p_y + p_ref).clamp_min(1e-12)

    def __call__(self, denoiser, x, t, labels):
        if self.base == "cfg":
            uncond, cond = denoiser.pair(x, t, labels)
            base, nfe = combine(denoiser, x, t, uncond, cond, self.base_scale), 3
        elif self.base == "autoguidance":
            cond, weak = denoiser.predict(x, t, labels), self.weak.predict(x, t, labels)
            base, nfe = combine(denoiser, x, t, weak, cond, self.base_scale), 3
        else:
            cond = denoiser.predict(x, t, labels)
            base, nfe = cond, 2
        x0_c = cond.x0
        if denoiser.data_range is not None:
            x0_c = x0_c.clamp(*denoiser.data_range)
        ref_class, ratio = self.reference(x0_c, labels)
        ref = denoiser.predict(x, t, ref_class)
        s_t = (self.scale * ratio).view(-1, *[1] * (x.ndim - 1)).to(cond.eps.dtype)
        # on the network's own output, as `combine` (eps_base + s_t (eps_c - eps_ref) on an eps model)
        out = lambda pred: denoiser.output(pred, x, t)  # noqa: E731
        guided = denoiser.from_output(out(base) + s_t * (out(cond) - out(ref)), x, t)
        return GuidedPrediction.of(guided, nfe=nfe)
