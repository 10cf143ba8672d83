"""Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis").

eps = eps_base - sqrt(1 - a_t) s grad_x log p_phi(y | x_t, t), with a noise-aware classifier p_phi; eps_base is the
unconditional model (conditional_model=false, the paper's main setting) or the conditional one. With the exact
classifier of the data at s = 1 this is the exact conditional model (Bayes' rule on the scores). scale = s.
"""

from diffguide.classifiers.base import Classifier
from diffguide.errors import UserError
from diffguide.guidance.base import Guidance


class ClassifierGuidance(Guidance):
    name = "classifier"

    def __init__(self, classifier: Classifier, scale: float, conditional_model: bool = False):
        if not isinstance(classifier, Classifier):
            raise UserError("guidance=classifier needs a noise-aware classifier: choose one with classifier=NAME")
        self.classifier, self.scale = classifier, self.check_scale(self.name, scale)
        self.conditional_model = conditional_model

    def start(self, denoiser, labels):
        self.check_classes(self.classifier, denoiser)
        self.classifier.to(denoiser.device)

    def __call__(self, denoiser, x, t, labels):
        condition = denoiser.condition(labels, self.conditional_model)
        eps = denoiser(x, t, condition)
        if self.scale != 0.0:
            grad = self.classifier.grad_log_prob(x, t, labels)
            eps = eps - (1 - denoiser.alpha(t)) ** 0.5 * self.scale * grad
        return self.from_eps(denoiser, x, t, eps, nfe=1)
