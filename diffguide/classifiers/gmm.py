"""The exact noisy-data classifier p(y | x_t) of a Gaussian mixture model: ground truth for classifier guidance."""

import torch

from diffguide.classifiers.base import Classifier
from diffguide.models.gmm import GaussianMixture


class ExactMixtureClassifier(Classifier):
    def __init__(self, model: GaussianMixture):
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes

    def log_prob(self, x, t):
        t_batch = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        return self.model.class_log_posterior(x, t_batch).to(x.dtype)
