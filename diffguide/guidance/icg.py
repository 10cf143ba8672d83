"""Independent condition guidance (Sadat, Kansy, Hilliges & Weber, "No Training, No Problem: Rethinking
Classifier-Free Guidance for Diffusion Models", ICLR 2025, arXiv 2407.02687; Sec. 4 and its Algorithm 1).

CFG's unconditional prediction is replaced by the conditional model fed a condition y_hat drawn independently of
the sample, so that a model trained without label dropout (no null class) can be guided:

    D_ICG(z_t, t, y) = D(z_t, t, y_hat) + w (D(z_t, t, y) - D(z_t, t, y_hat))

Sec. 4's argument: for y_hat independent of z_t, grad log p_t(z_t | y_hat) = grad log p_t(z_t) (in expectation over
y_hat: p(z_t) = E_{y ~ p(y)} p(z_t | y)), so the extra term is the conditional model against an estimate of the
unconditional score. Taken here, as CFG is, on the network's own output (eps, v, x0 or the flow velocity).

The independent condition. The paper uses either a Gaussian vector in the condition's embedding space or a random
condition from the condition space (a random class label for class-conditional models), drawn afresh at every step;
its ablation (Table 5, DiT-XL/2) finds them equal (FID 5.50 vs 5.55). Our models take class indices, so y_hat is a
random class: uniform over ALL the model's classes 0..K-1, the true one included. Excluding the true class would make
y_hat depend on y, hence on z_t, which is exactly what the derivation forbids; uniform is the class prior of the
class-conditional datasets here (a reviewer of the paper suggests p(y) for imbalanced data). The null class is never
used, so a model without one (null_class None) is guided. (The paper was read second-hand: its equations, Algorithm
1's fresh draw per step and Table 5 as the ICLR 2025 reviews and a public summary of it quote them.)

The draw comes from the sampler's per-sample noise source (`Guidance.begin`'s `noise`, each sample's own generator):
one standard normal z per sample and step (the first entry of one `noise()` draw), y_hat = floor(K Phi(z)) with Phi
the normal CDF, so a sample's classes do not depend on the batch it ran in. On the exact mixture (model=gmm) y_hat's
prediction is the exact class-y_hat denoiser E[x0 | x, y_hat]: ICG runs there, as "another class's prediction".

Cost: 2 evaluations per step (D(y_hat) and D(y) in one batched forward); a step whose weight w_t is exactly 1 (the
conditional model, e.g. the first step of schedule=linear) spends 1 and draws nothing. scale = w in CFG's
convention (1: the conditional model); `schedule` as for cfg (diffguide/guidance/weights.py).
"""

import torch

from diffguide.errors import UserError
from diffguide.guidance.base import CFGLike, GuidedPrediction
from diffguide.guidance.combine import combine


def random_classes(z: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Uniform classes 0..num_classes-1 from standard normals z (batch,): floor(K Phi(z)), int64."""
    u = torch.special.ndtr(z.double())
    return torch.clamp((u * num_classes).floor().long(), 0, num_classes - 1)


class ICG(CFGLike):
    name = "icg"
    #: the unconditional branch is a random other class, not the null class
    needs_null_class = False

    def __init__(self, scale: float, schedule=None):
        super().__init__(scale, schedule)

    def check(self, denoiser):
        if (denoiser.num_classes or 0) < 2 or getattr(denoiser, "conditional", True) is False:
            raise UserError(f"guidance=icg guides a class-conditional model with a random other class as its "
                            f"unconditional branch; model {type(denoiser).__name__} takes no class labels "
                            f"(guidance=tsg guides an unconditional network)")

    def independent_labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """y_hat for each sample: a uniform class from one standard normal of the sample's own noise source."""
        if self.noise is None:
            raise RuntimeError("guidance=icg draws a random class at every step: begin() needs the sampler's "
                               "per-sample noise source")
        z = self.noise().flatten(1)[:, 0]
        return random_classes(z, num_classes).to(labels.device)

    def __call__(self, denoiser, x, t, labels):
        w = self.weight(denoiser, t)
        if w == 1.0:
            return GuidedPrediction.of(denoiser.predict(x, t, labels), nfe=1)
        y_hat = self.independent_labels(labels, denoiser.num_classes)
        independent, cond = denoiser.predict_many(x, t, [y_hat, labels])
        return GuidedPrediction.of(combine(denoiser, x, t, independent, cond, w), nfe=2)
