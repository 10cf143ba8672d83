import pytest
import torch

from diffguide.classifiers.clean import CleanClassifier

#: the weights of the linear test classifier: three classes over 2x2 images
W = torch.tensor([[1.0, 0.0, -1.0, 0.5], [0.0, 2.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])


class LinearClassifier(CleanClassifier):
    """f_k(x0) = W_k . flatten(x0): its input gradients are the rows of W."""

    def __init__(self, weight):
        super().__init__()
        self.register_buffer("weight", weight)
        self.num_classes = weight.shape[0]

    def classify(self, x0):
        return x0.flatten(1) @ self.weight.T


@pytest.fixture
def linear():
    return LinearClassifier(W.clone())
