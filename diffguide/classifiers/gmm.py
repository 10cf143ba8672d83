"""The exact classifiers of a Gaussian mixture model: p(y | x_t) of noisy data (ground truth for classifier
guidance) and p(y | x0) of clean data (an ideal off-the-shelf classifier for offshelf, universal and gfcg)."""

import torch

from diffguide.classifiers.base import Classifier
from diffguide.classifiers.clean import CleanClassifier
from diffguide.models.gmm import GaussianMixture


class ExactMixtureClassifier(Classifier):
    def __init__(self, model: GaussianMixture):
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes

    def log_prob(self, x, t):
        return self.model.class_log_posterior(x, t).to(x.dtype)


class ExactMixtureCleanClassifier(CleanClassifier):
    """logits(x0) = log p(y | x0) under the mixture, noise-free."""

    def __init__(self, model: GaussianMixture):
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes

    def classify(self, x0):
        a = torch.ones(x0.shape[0], 1, dtype=torch.float64, device=x0.device)
        return self.model.log_posterior_at(x0, a).to(x0.dtype)
