import copy

import torch
from omegaconf import OmegaConf

from diffguide.metrics import evaluator as evaluator_lib
from diffguide.models import unet as unet_lib
from diffguide.train import diffusion_loss, train_evaluator, train_unet
from tests.conftest import SCHEDULE, TINY_UNET, run_cli


def _fixed_loss(model, x0, labels):
    return diffusion_loss(model, x0, labels, 0.0, torch.Generator().manual_seed(123)).item()


def _toy_images(n=64):
    """Bright squares at class-dependent positions: something a UNet can learn in a few steps."""
    labels = torch.arange(n) % 4
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    for i, y in enumerate(labels.tolist()):
        images[i, 0, 4 + 5 * y:10 + 5 * y, 6:20] = 255
    return images, labels


def test_two_training_steps_lower_the_loss(tmp_path):
    cfg = OmegaConf.create(dict(seed=0, steps=2, batch_size=64, lr=3e-3, warmup_steps=1, weight_decay=0.0,
                                ema_decay=0.0, label_dropout=0.1, log_every=1, checkpoint_every=0, precision="fp32",
                                out=str(tmp_path / "u.safetensors"), num_classes=4))
    torch.manual_seed(0)
    model = unet_lib.build(TINY_UNET, 4, SCHEDULE)
    images, labels = _toy_images()
    x0 = images.float() / 127.5 - 1
    before = _fixed_loss(model, x0, labels)
    trained, stats = train_unet(cfg, images, labels, torch.device("cpu"), log=lambda *_: None,
                                model=copy.deepcopy(model))
    after = _fixed_loss(trained, x0, labels)
    assert after < before * 0.9, (before, after)
    reloaded = unet_lib.load(cfg.out)
    assert abs(_fixed_loss(reloaded, x0, labels) - after) < 1e-2 * after  # fp16 storage, fp32 network
    assert stats["steps"] == 2


def test_evaluator_training_lowers_the_loss(tmp_path):
    cfg = OmegaConf.create(dict(seed=0, steps=40, batch_size=64, lr=3e-3, warmup_steps=1, weight_decay=0.0,
                                log_every=1, precision="fp32", out=str(tmp_path / "e.safetensors"),
                                timm_model="test_resnet", num_classes=4))
    images, labels = _toy_images()
    model, stats = train_evaluator(cfg, images, labels, torch.device("cpu"), test=(images, labels),
                                   log=lambda *_: None)
    assert stats["final_loss"] < stats["first_loss"] * 0.7
    assert stats["test_accuracy"] > 0.5  # four classes: chance is 0.25
    assert torch.allclose(evaluator_lib.load(cfg.out)(images[:8]), model(images[:8]), atol=1e-2)


def test_train_entrypoint_writes_weights_and_card(tmp_path):
    out = tmp_path / "unet.safetensors"
    proc = run_cli("diffguide.train", "train.steps=2", "train.batch_size=8", "train.log_every=1",
                   f"train.out={out}", f"hydra.run.dir={tmp_path / 'hydra'}")
    assert proc.returncode == 0, proc.stderr
    card = out.with_suffix(".md").read_text()
    assert "steps: 2" in card and '"final_loss"' in card
    assert unet_lib.load(out).num_classes == 10


def test_noisy_classifier_training_lowers_the_loss_and_reloads(tmp_path):
    from diffguide.classifiers import noisy as noisy_lib
    from diffguide.train import train_noisy_classifier

    cfg = OmegaConf.create(dict(seed=0, steps=200, batch_size=64, lr=3e-3, warmup_steps=1, weight_decay=0.0,
                                log_every=1, precision="fp32", out=str(tmp_path / "n.safetensors"), num_classes=4,
                                channels=[8, 16], scheduler=SCHEDULE))
    images, labels = _toy_images()
    model, stats = train_noisy_classifier(cfg, images, labels, torch.device("cpu"), test=(images, labels),
                                          log=lambda *_: None)
    # Averaged over all noise levels the loss cannot fall far (at t near 999 nothing is left to classify);
    # at t = 0 the classes must be told apart.
    assert stats["final_loss"] < stats["first_loss"] * 0.9
    assert stats["test_accuracy_t0"] > 0.5 and stats["test_accuracy_t999"] < 0.6  # chance: 0.25
    reloaded = noisy_lib.load(cfg.out)
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(reloaded.log_prob(x, 100), model.log_prob(x, 100), atol=1e-2)
