import torch
from torch import nn

from diffguide.classifiers.clean import TimmClassifier


def test_softplus_surgery_replaces_every_relu(tiny_evaluator_path):
    plain = TimmClassifier(str(tiny_evaluator_path))
    smooth = TimmClassifier(str(tiny_evaluator_path), softplus_beta=3.0)
    assert any(isinstance(m, nn.ReLU) for m in plain.modules())
    assert not any(isinstance(m, nn.ReLU) for m in smooth.modules())
    assert any(isinstance(m, nn.Softplus) and m.beta == 3.0 for m in smooth.modules())
    x0 = torch.rand(2, 1, 28, 28) * 2 - 1
    assert not torch.allclose(plain.logits(x0), smooth.logits(x0))
    # x0 in [-1, 1] is what the evaluator sees as [0, 1]
    assert torch.allclose(plain.logits(x0), plain.model(((x0 + 1) / 2)))
