"""Classifiers that guidance methods use: log p(y | x_t, t) over classes, and its gradient in x."""

import torch
from torch import nn


class Classifier(nn.Module):
    """A noise-aware classifier: log-probabilities (batch, num_classes) of the class given x_t at noise level t (a
    Level of the model it guides, or a timestep of its own schedule)."""

    num_classes: int

    def log_prob(self, x: torch.Tensor, t: int) -> torch.Tensor:
        raise NotImplementedError

    def grad_log_prob(self, x: torch.Tensor, t: int, labels: torch.Tensor) -> torch.Tensor:
        """grad_x log p(labels | x_t); autograd only here, and the graph is freed before returning."""
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            selected = self.log_prob(x_in, t).gather(1, labels.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(selected, x_in)
        return grad.detach()
