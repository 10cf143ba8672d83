"""Gradient methods build an autograd graph at every step; none of it may outlive its step, or memory grows with the
number of steps. Every tensor autograd saves for a backward pass is tracked by a weak reference; after each step
the number still alive must stay the same (the classifiers' own weights), however many steps have run."""

import gc
import weakref

import pytest
import torch

from diffguide.classifiers.base import Classifier
from diffguide.guidance.classifier import ClassifierGuidance
from diffguide.guidance.offshelf import OffTheShelfGuidance
from diffguide.guidance.universal import UniversalGuidance
from diffguide.samplers.ddpm import DDPM
from tests.helpers import W, LinearClassifier


class LinearNoisyClassifier(Classifier):
    def __init__(self):
        super().__init__()
        self.register_buffer("weight", W.clone())
        self.num_classes = 3

    def log_prob(self, x, t):
        return torch.log_softmax(x.flatten(1) @ self.weight.T * (1 + t.t / 1000), dim=1)


GUIDANCES = {
    "classifier": lambda: ClassifierGuidance(LinearNoisyClassifier(), scale=2.0),
    "offshelf": lambda: OffTheShelfGuidance(LinearClassifier(W.clone()), scale=1.0, through_denoiser=True),
    "universal": lambda: UniversalGuidance(LinearClassifier(W.clone()), rho=1.0, mu=0.5, sigma=0.1, iter_steps=2,
                                           recurrence=2),
}


def saved_tensors_alive_after_each_step(guidance, toy, steps):
    refs, alive = [], []

    def pack(tensor):
        refs.append(weakref.ref(tensor))
        return tensor

    def on_step(i, n):
        gc.collect()
        alive.append(sum(ref() is not None for ref in refs))

    labels = torch.tensor([0, 1, 2])
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        DDPM(steps).sample(toy, guidance, torch.randn(3, 1, 2, 2), labels, generators=gens, on_step=on_step)
    return len(refs), alive


@pytest.mark.parametrize("name", sorted(GUIDANCES))
def test_graphs_are_freed_every_step(toy, name):
    saved, alive = saved_tensors_alive_after_each_step(GUIDANCES[name](), toy, steps=12)
    assert saved > 12  # graphs were built at every step ...
    assert len(set(alive)) == 1 and alive[0] <= 2  # ... and none of them survived it


def test_the_check_catches_a_leak(toy):
    """A guidance that keeps each step's graph alive (here: in a list) must fail the check above."""

    class Leaky(ClassifierGuidance):
        kept = []

        def __call__(self, denoiser, x, t, labels):
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                self.kept.append(self.classifier.log_prob(x_in, t).sum())
            return super().__call__(denoiser, x, t, labels)

    _, alive = saved_tensors_alive_after_each_step(Leaky(LinearNoisyClassifier(), 1.0), toy, steps=10)
    assert alive[-1] > alive[0]
