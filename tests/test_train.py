import copy
import math
import re
import time

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from diffguide import train as train_lib
from diffguide.training.distill import train_guided_student, train_progressive
from diffguide.command.config import CONF_DIR
from diffguide.models import unet as unet_lib
from diffguide.classifiers import evaluator as evaluator_lib
from diffguide.training.ppap import train_ppap
from diffguide.runtime.device import resolve_precision
from diffguide.training import recipes
from diffguide.training.loop import hardware
from diffguide.training.recipes import (diffusion_loss, flow_loss, train_dit, train_evaluator, train_noisy_classifier,
                                        train_unet)
from tests.helpers import SCHEDULE, TINY_UNET, run_cli, toy_images


def _fixed_loss(model, x0, labels):
    return diffusion_loss(model, x0, labels, 0.0, torch.Generator().manual_seed(123)).item()


def test_two_training_steps_lower_the_loss(tmp_path):
    cfg = OmegaConf.create(dict(seed=0, steps=2, batch_size=64, lr=3e-3, warmup_steps=1, weight_decay=0.0,
                                ema_decay=0.0, label_dropout=0.1, log_every=1, checkpoint_every=0, precision="fp32",
                                out=str(tmp_path / "u.safetensors"), num_classes=4))
    torch.manual_seed(0)
    model = unet_lib.build(TINY_UNET, 4, SCHEDULE)
    images, labels = toy_images()
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
    images, labels = toy_images()
    model, stats = train_evaluator(cfg, images, labels, torch.device("cpu"), test=(images, labels),
                                   log=lambda *_: None)
    assert stats["final_loss"] < stats["first_loss"] * 0.7
    assert stats["test_accuracy"] > 0.5  # four classes: chance is 0.25
    assert torch.allclose(evaluator_lib.load(cfg.out)(images[:8]), model(images[:8]), atol=1e-2)


def test_train_entrypoint_writes_weights_and_card(tmp_path):
    out = tmp_path / "unet.safetensors"
    proc = run_cli("diffguide.train", "train.steps=2", "train.batch_size=8", "train.log_every=1",
                   f"train.out={out}", f"out_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    card = out.with_suffix(".md").read_text()
    assert "steps: 2" in card and '"final_loss"' in card
    assert unet_lib.load(out).num_classes == 10


def test_noisy_classifier_training_lowers_the_loss_and_reloads(tmp_path):
    from diffguide.classifiers import noisy as noisy_lib

    cfg = OmegaConf.create(dict(seed=0, steps=200, batch_size=64, lr=3e-3, warmup_steps=1, weight_decay=0.0,
                                log_every=1, precision="fp32", out=str(tmp_path / "n.safetensors"), num_classes=4,
                                channels=[8, 16], scheduler=SCHEDULE))
    images, labels = toy_images()
    model, stats = train_noisy_classifier(cfg, images, labels, torch.device("cpu"), test=(images, labels),
                                          log=lambda *_: None)
    # Averaged over all noise levels the loss cannot fall far (at t near 999 nothing is left to classify);
    # at t = 0 the classes must be told apart.
    assert stats["final_loss"] < stats["first_loss"] * 0.9
    assert stats["test_accuracy_t0"] > 0.5 and stats["test_accuracy_t999"] < 0.6  # chance: 0.25
    reloaded = noisy_lib.load(cfg.out)
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(reloaded.log_prob(x, 100), model.log_prob(x, 100), atol=1e-2)


# The loops as they were before train.py's trainers shared `_train_loop` (HEAD's train_unet and _train_classifier,
# copied as they stood): the references the shared loop must match bit for bit.

def _old_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _old_save_unet(model, ema, cfg, step, losses, wall, device) -> dict:
    tail = losses[-min(len(losses), 100):]
    stats = {"steps": step, "final_loss": sum(tail) / len(tail), "first_loss": losses[0], "wall_time_s": round(wall, 1),
             "hardware": hardware(device), "parameters": sum(p.numel() for p in ema.parameters())}
    live = model.unet
    model.unet = ema
    try:
        unet_lib.save(model, cfg.out, extra={"training": stats})
    finally:
        model.unet = live
    return stats


def _old_train_unet(cfg, images, labels, device, log, model):
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = model.to(device).train().requires_grad_(True)
    model.set_precision(resolve_precision(cfg.precision))
    ema = copy.deepcopy(model.unet).requires_grad_(False)
    opt = torch.optim.AdamW(model.unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_all = images.float() / 127.5 - 1
    loss_fn = flow_loss if cfg.get("parameterisation", "eps") == "flow" else diffusion_loss
    losses, start = [], time.time()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _old_lr(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=generator)
        loss = loss_fn(model, x_all[idx].to(device), labels[idx].to(device), cfg.label_dropout, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.unet.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            recent = sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:])
            log(f"step {step + 1}/{cfg.steps} loss {recent:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{time.time() - start:.0f}s")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _old_save_unet(model, ema, cfg, step + 1, losses, time.time() - start, device)
    stats = _old_save_unet(model, ema, cfg, cfg.steps, losses, time.time() - start, device)
    model.unet.load_state_dict(ema.state_dict())
    return model, stats


def _old_train_classifier(cfg, model, device, draw_batch, forward, log=print) -> dict:
    generator = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dtype = resolve_precision(cfg.precision)
    losses, start = [], time.time()
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _old_lr(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        inputs, targets = draw_batch(generator)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = forward(*(x.to(device) for x in inputs))
        loss = F.cross_entropy(logits.float(), targets.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log(f"step {step + 1}/{cfg.steps} loss {sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]):.4f} "
                f"{time.time() - start:.0f}s")
    model.eval()
    tail = losses[-min(len(losses), 100):]
    return {"steps": cfg.steps, "final_loss": sum(tail) / len(tail), "first_loss": losses[0],
            "wall_time_s": round(time.time() - start, 1), "hardware": hardware(device),
            "parameters": sum(p.numel() for p in model.parameters())}


def _assert_same_weights(new: dict, old: dict):
    assert new.keys() == old.keys()
    differ = [k for k in old if not torch.equal(new[k], old[k])]
    assert not differ, f"not bit-identical: {differ}"


def _timeless(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "wall_time_s"}


def _losses_logged(lines: list[str]) -> list[str]:
    """The step and mean loss of each log line (the classifier lines did not give the lr, and the seconds vary)."""
    return [re.match(r"step \d+/\d+ loss \S+", line).group(0) for line in lines]


@pytest.mark.parametrize("parameterisation,precision", [("eps", "fp32"), ("flow", "fp32"), ("eps", "bf16")])
def test_shared_loop_trains_the_unet_bit_for_bit_as_the_old_loop(tmp_path, monkeypatch, parameterisation, precision):
    """Three steps with label dropout, grad clipping, EMA and weight decay: the saved and the returned (EMA)
    weights, the stats and the logged losses equal the old loop's. (The old loop also wrote its half-trained EMA into
    cfg.out at step 2; the shared loop writes cfg.out only at the end: its resumable state lives elsewhere.)"""
    cfg = OmegaConf.create(dict(seed=3, steps=3, batch_size=16, lr=3e-3, warmup_steps=1, weight_decay=0.01,
                                ema_decay=0.9, label_dropout=0.3, log_every=2, checkpoint_every=2,
                                precision=precision, out=str(tmp_path / "u.safetensors"), num_classes=4,
                                parameterisation=parameterisation))
    saved = []
    monkeypatch.setattr(unet_lib, "save", lambda model, out, extra: saved.append(
        (_timeless(extra["training"]), {k: v.clone() for k, v in model.unet.state_dict().items()})))
    torch.manual_seed(0)
    model = unet_lib.build(TINY_UNET, 4, SCHEDULE, parameterisation)
    images, labels = toy_images()
    device = torch.device("cpu")

    old_log, new_log = [], []
    old_model, old_stats = _old_train_unet(cfg, images, labels, device, old_log.append, copy.deepcopy(model))
    old_saved, saved[:] = list(saved), []
    new_model, new_stats = train_unet(cfg, images, labels, device, test=(images, labels), log=new_log.append,
                                      model=copy.deepcopy(model))

    _assert_same_weights(new_model.state_dict(), old_model.state_dict())
    assert _timeless(new_stats) == _timeless(old_stats)
    assert [s["steps"] for s, _ in old_saved] == [2, 3] and [s["steps"] for s, _ in saved] == [3]
    assert saved[0][0] == old_saved[-1][0]
    _assert_same_weights(saved[0][1], old_saved[-1][1])
    assert [line.rsplit(" ", 1)[0] for line in new_log] == [line.rsplit(" ", 1)[0] for line in old_log]
    assert len(new_log) == 2


@pytest.mark.parametrize("trainer,precision", [("evaluator", "fp32"), ("evaluator", "bf16"), ("noisy", "fp32")])
def test_shared_loop_trains_the_classifiers_bit_for_bit_as_the_old_loop(tmp_path, monkeypatch, trainer, precision):
    cfg = OmegaConf.create(dict(seed=5, steps=3, batch_size=16, lr=3e-3, warmup_steps=1, weight_decay=0.01,
                                log_every=2, precision=precision, num_classes=4, timm_model="test_resnet",
                                channels=[8, 16], scheduler=SCHEDULE))
    train = train_evaluator if trainer == "evaluator" else train_noisy_classifier
    images, labels = toy_images()
    device = torch.device("cpu")
    old_log, new_log = [], []

    with monkeypatch.context() as patch:
        patch.setattr(recipes, "_train_classifier", _old_train_classifier)
        old_model, old_stats = train(OmegaConf.merge(cfg, {"out": str(tmp_path / "old.safetensors")}), images, labels,
                                     device, test=(images, labels), log=old_log.append)
    new_model, new_stats = train(OmegaConf.merge(cfg, {"out": str(tmp_path / "new.safetensors")}), images, labels,
                                 device, test=(images, labels), log=new_log.append)

    _assert_same_weights(new_model.state_dict(), old_model.state_dict())
    assert _timeless(new_stats) == _timeless(old_stats)
    assert not new_model.training and not old_model.training
    assert _losses_logged(new_log) == _losses_logged(old_log) and len(new_log) == 2


TRAINERS = {"fmnist_unet": train_unet, "fmnist_dit": train_dit, "fmnist_unet_weak": train_unet,
            "fmnist_flow": train_unet,
            "fmnist_evaluator": train_evaluator, "fmnist_offshelf": train_evaluator,
            "fmnist_noisy_classifier": train_noisy_classifier, "fmnist_guided_student": train_guided_student,
            "fmnist_guided_student_lora": train_guided_student, "fmnist_progressive": train_progressive,
            "fmnist_ppap": train_ppap}


def test_every_train_recipe_names_its_trainer():
    assert set(TRAINERS) == {path.stem for path in (CONF_DIR / "train").glob("*.yaml")}
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            for name, trainer in TRAINERS.items():
                tcfg = compose("train", overrides=[f"train={name}"]).train
                assert train_lib.resolve_trainer(tcfg) is trainer, name
                assert "kind" not in tcfg, name
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("override,message", [
    ("train._target_=diffguide.train.nope", "train._target_=diffguide.train.nope cannot be imported"),
    ("~train._target_", "train._target_ is missing"),
    ("train._target_=diffguide.data.fashion_mnist.to_model_range", "train._target_=diffguide.data.fashion_mnist.to_model_range is not a trainer"),
])
def test_a_bad_trainer_target_is_one_line_and_exit_2_before_training(tmp_path, override, message):
    out = tmp_path / "u.safetensors"
    proc = run_cli("diffguide.train", "train=fmnist_unet", override, "train.steps=1", f"train.out={out}",
                   f"out_dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffguide: error: ") and message in lines[0], proc.stderr
    assert "step " not in proc.stdout and not out.exists()
