"""Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis").

With a noise-aware classifier p_phi and g = grad_x log p_phi(y | x_t, t), in the two forms of the official code
(openai/guided-diffusion, gaussian_diffusion.py), both applied after the model's x0 is clipped to the data range:
    ancestral sampler (ddpm):  mean = mu(x0_clipped, x_t) + Sigma_t s g                        (`condition_mean`)
    every other sampler:       eps  = eps(x0_clipped) - sqrt(1 - a_t) s g, x0 from that eps    (`condition_score`)
The base model is the unconditional one (conditional_model=false) or the conditional one. With the exact classifier
of the data at s = 1 the DDIM form is the exact conditional model (Bayes' rule on the scores). scale = s.
"""

from diffguide.classifiers.base import Classifier
from diffguide.errors import UserError
from diffguide.guidance.base import Guidance, GuidedPrediction


class ClassifierGuidance(Guidance):
    name = "classifier"
    revision = 1  # 1: the classifier term applied after the clip

    def __init__(self, classifier: Classifier, scale: float, conditional_model: bool = False):
        if not isinstance(classifier, Classifier):
            raise UserError("guidance=classifier needs a noise-aware classifier: choose one with classifier=NAME")
        self.classifier, self.scale = classifier, self.check_scale(self.name, scale)
        self.conditional_model = conditional_model

    def check(self, denoiser):
        self.check_classes(self.classifier, denoiser)
        self.classifier.to(denoiser.device)

    def __call__(self, denoiser, x, t, labels):
        condition = denoiser.condition(labels, self.conditional_model)
        pred = GuidedPrediction.of(denoiser.predict(x, t, condition), nfe=1)
        if self.scale != 0.0:
            pred.score = self.scale * self.classifier.grad_log_prob(x, t, labels)
        return pred
