import pytest
import torch

from diffguide.errors import UserError
from diffguide.guidance.autoguidance import AutoGuidance
from diffguide.guidance.none import NoGuidance
from diffguide.models import gmm
from tests.helpers import ToyDenoiser


class WeakToy(ToyDenoiser):
    """eps = 0.3 x + 0.05 (y + 1) + t / 1000."""

    def _output(self, x, t, labels):
        self.calls.append(x.shape[0])
        y = torch.where(labels == self.null_class, -1, labels).to(x.dtype).view(-1, 1, 1, 1)
        return 0.3 * x + 0.05 * (y + 1) + t.to(x.dtype).view(-1, 1, 1, 1) / 1000


def test_autoguidance_by_hand(toy):
    weak = WeakToy()
    x, labels, t = torch.full((1, 1, 2, 2), 1.0), torch.tensor([1]), 200
    pred = AutoGuidance(weak, scale=2.5)(toy, x, t, labels)
    # main: 0.5 + 0.2 + 0.2 = 0.9; weak: 0.3 + 0.1 + 0.2 = 0.6; eps = 0.6 + 2.5 * 0.3 = 1.35
    assert torch.allclose(pred.eps, torch.full_like(x, 1.35)) and pred.nfe == 2
    assert toy.calls == [1] and weak.calls == [1], "both models conditional, one pass each"


def test_autoguidance_endpoints_on_the_mixture():
    main, weak = gmm.image(num_classes=3, std=0.2), gmm.image(num_classes=3, std=0.5)
    x, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    assert torch.allclose(AutoGuidance(weak, 1.0)(main, x, 300, labels).eps, NoGuidance()(main, x, 300, labels).eps)
    assert torch.allclose(AutoGuidance(weak, 0.0)(main, x, 300, labels).eps, NoGuidance()(weak, x, 300, labels).eps)


def test_autoguidance_refuses_a_weak_model_on_another_schedule():
    main = gmm.image(num_classes=3)
    other = gmm.GaussianMixture(main.means, 0.3, scheduler_config={"num_train_timesteps": 1000,
                                                                  "beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(UserError, match="noise schedule"):
        AutoGuidance(other, 2.0).check(main)
    with pytest.raises(UserError, match="weak model"):
        AutoGuidance(None, 2.0)
