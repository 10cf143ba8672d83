"""timm classifiers as a user configures them (`classifier=imagenet_resnet50 classifier.weights=FILE`), on tiny
timm networks saved to a local file: the input follows timm's data config, and a missing hub model is one line."""

import pytest
import torch
from safetensors.torch import save_file

from diffguide.classifiers.clean import TimmHubClassifier
from diffguide.errors import UserError
from tests.helpers import compose_run_config


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=7, pretrained=False)
    path = tmp_path_factory.mktemp("timm") / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model.eval()


def test_local_weights_and_timms_normalisation(tiny_weights):
    path, reference = tiny_weights
    clf = TimmHubClassifier("resnet10t", weights=str(path), num_classes=7)
    assert clf.num_classes == 7 and clf.input_size == (176, 176)  # resnet10t's pretrained_cfg: 176 px, bicubic
    assert clf.interpolation == "bicubic"
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    # by hand: [-1, 1] -> [0, 1], resized to 176 bicubic, ImageNet mean/std
    x = torch.nn.functional.interpolate((images + 1) / 2, size=(176, 176), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(clf.classify(images), reference((x - mean) / std), atol=1e-5)


def test_data_config_overrides_for_cifar_weights(tiny_weights):
    path, reference = tiny_weights
    clf = TimmHubClassifier("resnet10t", weights=str(path), num_classes=7,
                            data_config={"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25] * 3})
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert clf.input_size == (32, 32)
    assert torch.allclose(clf.classify(images), reference(((images + 1) / 2 - 0.5) / 0.25), atol=1e-5)


def test_the_config_path_a_user_takes(tiny_weights, tmp_path):
    from hydra.utils import instantiate

    path, _ = tiny_weights
    cfg = compose_run_config(["guidance=offshelf", "classifier=imagenet_resnet50", "classifier.model_name=resnet10t",
                              f"classifier.weights={path}", "classifier.num_classes=7"], tmp_path)
    clf = instantiate(cfg.classifier)
    assert isinstance(clf, TimmHubClassifier) and clf.num_classes == 7


def test_missing_weights_are_one_clear_line(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="classifier.weights=") as err:
        TimmHubClassifier("resnet50.a1_in1k")
    assert "\n" not in str(err.value) and "resnet50.a1_in1k" in str(err.value)
    with pytest.raises(UserError, match="no such file"):
        TimmHubClassifier("resnet50", weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match="not a timm model"):
        TimmHubClassifier("no_such_net", weights=None)
