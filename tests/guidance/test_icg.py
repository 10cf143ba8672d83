"""ICG (Sadat et al. 2025, arXiv 2407.02687, independent condition guidance: a random other class as the unconditional
branch), worked by hand with a known random class, on the toy denoiser and the exact mixture, never asking for the
null class; its evaluations; refusals in one line."""

import pytest
import torch

from diffguide.errors import UserError
from diffguide.guidance.cfg import CFG
from diffguide.guidance.icg import ICG, random_classes
from diffguide.models import gmm
from diffguide.samplers.ddim import DDIM
from diffguide.samplers.ddpm import DDPM
from tests.helpers import ToyDenoiser, constant_noise, generators


def test_random_classes_are_uniform_quantiles_of_a_normal():
    """y_hat = floor(K Phi(z)): z = 0 is the median (class 1 of 3), far tails the first and last class."""
    assert random_classes(torch.tensor([0.0, -10.0, 10.0, -0.5, 0.5]), 3).tolist() == [1, 0, 2, 0, 2]
    z = torch.randn(30000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(random_classes(z, 10), minlength=10).float() / 30000
    assert torch.allclose(counts, torch.full((10,), 0.1), atol=0.01)


def test_icg_step_by_hand_with_a_known_random_class(toy):
    """eps(x, t, y) = 0.5 x + 0.1 (y + 1) + t / 1000. x = 0.4, t = 300, y = (0, 2), y_hat = 1 (z = 0 in both
    samples): eps(y_hat) = 0.2 + 0.2 + 0.3 = 0.7, eps(y) = 0.6, 0.8; w = 3: 0.7 + 3 (-0.1) = 0.4 and 0.7 + 3 (0.1) = 1.0."""
    x, labels = torch.full((2, 1, 2, 2), 0.4), torch.tensor([0, 2])
    guidance = ICG(3.0)
    guidance.begin(toy, labels, [300], constant_noise(torch.zeros(2, 1, 2, 2)))
    assert guidance.independent_labels(labels, 3).tolist() == [1, 1]
    toy.calls.clear()
    pred = guidance(toy, x, 300, labels)
    assert torch.allclose(pred.eps[0], torch.full((1, 2, 2), 0.4)) and torch.allclose(pred.eps[1], torch.full((1, 2, 2), 1.0))
    a = float(toy.alphas_cumprod[300])
    assert torch.allclose(pred.x0, (x - (1 - a) ** 0.5 * pred.eps) / a ** 0.5)
    assert pred.nfe == 2 and toy.calls == [4], "y_hat and y go through one batched forward"


def test_icg_at_weight_one_is_the_conditional_model_and_draws_nothing(toy):
    x, labels = torch.randn(3, 1, 2, 2), torch.tensor([0, 1, 2])
    noise = constant_noise(torch.zeros(3, 1, 2, 2))
    guidance = ICG(3.0, schedule="linear")
    guidance.begin(toy, labels, [700, 300], noise)
    pred = guidance(toy, x, 700, labels)  # p = 0: w_t = 1
    assert torch.allclose(pred.eps, toy.predict(x, 700, labels).eps) and pred.nfe == 1 and not noise.draws


class NoNullToy(ToyDenoiser):
    """The toy denoiser of a model trained without label dropout: no null class; it records every label it sees."""

    def __init__(self):
        super().__init__()
        self.null_class = None
        self.seen = []

    def _output(self, x, t, labels):
        self.seen.append(labels.clone())
        y = labels.to(x.dtype).view(-1, 1, 1, 1)
        return 0.5 * x + 0.1 * (y + 1) + t.to(x.dtype).view(-1, 1, 1, 1) / 1000


def test_icg_guides_a_model_without_a_null_class_and_never_asks_for_one():
    model = NoNullToy()
    labels = torch.tensor([0, 1, 2, 2])
    with pytest.raises(UserError, match="needs a model with a null class"):
        CFG(2.0).check(model)
    guidance = ICG(2.0)
    guidance.check(model)
    x0, nfe = DDIM(8, clip_x0=False).sample(model, guidance, torch.randn(4, 1, 2, 2), labels, generators(range(4)))
    assert torch.isfinite(x0).all() and nfe == 16
    seen = torch.cat(model.seen)
    assert ((seen >= 0) & (seen < 3)).all(), "only real classes, never a null label"
    assert len(set(seen.tolist())) == 3


def test_icg_samples_do_not_depend_on_the_batch():
    """y_hat comes from each sample's own noise source: sample 5 alone equals sample 5 in a batch (DDPM, so the
    sampler draws from the same sources as well)."""
    model = gmm.image(num_classes=3)
    sampler = DDPM(6, clip_x0=False)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2])
    batch, _ = sampler.sample(model, ICG(3.0), x_T, labels, generators([4, 5, 6]))
    alone, _ = sampler.sample(model, ICG(3.0), x_T[1:2], labels[1:2], generators([5]))
    assert torch.allclose(batch[1:2], alone, atol=1e-6)


def test_icg_on_the_exact_mixture_is_another_classes_prediction():
    """On model=gmm, D(y_hat) is the exact class-y_hat denoiser: D = D_yhat + w (D_y - D_yhat)."""
    model = gmm.image(num_classes=3)
    x, labels, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0]), 400
    z = torch.tensor([-3.0, 0.0, 3.0, 0.0]).view(4, 1, 1, 1).expand(4, 1, 8, 8)
    guidance = ICG(2.5)
    guidance.check(model)
    guidance.begin(model, labels, [t], constant_noise(z))
    pred = guidance(model, x, t, labels)
    y_hat = torch.tensor([0, 1, 2, 1])
    level = model.level(t)
    d_hat, d_y = model.exact(x, level, y_hat), model.exact(x, level, labels)
    assert torch.allclose(pred.eps.double(), d_hat.eps + 2.5 * (d_y.eps - d_hat.eps), atol=1e-5)


def test_icg_refuses_a_model_without_classes_in_one_line(toy):
    unconditional = ToyDenoiser()
    unconditional.conditional = False  # as PretrainedUNet without class embeddings
    for model in (ToyDenoiser(num_classes=1), unconditional):
        with pytest.raises(UserError, match="guidance=icg guides a class-conditional model") as caught:
            ICG(2.0).check(model)
        assert "\n" not in str(caught.value)
    with pytest.raises(RuntimeError, match="begin.. needs the sampler's per-sample noise"):
        ICG(2.0)(toy, torch.zeros(1, 1, 2, 2), 300, torch.tensor([0]))
