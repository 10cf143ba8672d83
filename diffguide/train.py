"""Train the embedded Fashion-MNIST networks: `python -m diffguide.train train=NAME` runs the trainer that
conf/train/NAME.yaml names by `_target_` (diffguide/training/: recipes.train_unet, train_dit, train_evaluator,
train_noisy_classifier; distill.train_guided_student, train_progressive; ppap.train_ppap)."""

import inspect
import json
import logging
import os
import sys

import hydra
import torch
from hydra.utils import get_method
from omegaconf import DictConfig

from diffguide.command.config import CONF_DIR, register
from diffguide.data import fashion_mnist
from diffguide.errors import UserError
from diffguide.runtime.device import resolve_device, resolve_precision
from diffguide.training.loop import write_card


def resolve_trainer(tcfg: DictConfig):
    """The function train._target_ names; a missing one, one that cannot be imported or one that does not take a
    trainer's arguments (cfg, images, labels, device, test=, log=) is a UserError."""
    target = tcfg.get("_target_")
    if not target:
        raise UserError("train._target_ is missing: name the trainer, e.g. "
                        "train._target_=diffguide.training.recipes.train_unet")
    hydra_log = logging.getLogger("hydra.utils")  # get_method logs a failure over lines: the UserError is one line
    disabled, hydra_log.disabled = hydra_log.disabled, True
    try:
        trainer = get_method(str(target))
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"train._target_={target} cannot be imported: name a trainer such as "
                        f"diffguide.training.recipes.train_unet, train_evaluator or train_noisy_classifier") from None
    finally:
        hydra_log.disabled = disabled
    try:
        inspect.signature(trainer).bind(tcfg, None, None, None, test=None, log=print)
    except (TypeError, ValueError):
        raise UserError(f"train._target_={target} is not a trainer: a trainer takes "
                        f"(cfg, images, labels, device, test=None, log=print)") from None
    return trainer


register()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        tcfg = cfg.train
        trainer = resolve_trainer(tcfg)
        device = resolve_device(cfg.device)
        resolve_precision(tcfg.precision)
        if tcfg.steps < 1 or tcfg.batch_size < 1:
            raise UserError(f"train.steps and train.batch_size must be >= 1 (got {tcfg.steps}, {tcfg.batch_size})")
        images, labels = fashion_mnist.load("train")
        test = fashion_mnist.load("test")
    except UserError as exc:
        print(f"diffguide: error: {exc}", file=sys.stderr)
        sys.exit(2)
    _, stats = trainer(tcfg, images, labels, device, test=test)
    print(json.dumps(stats))
    if "rounds" not in tcfg:  # progressive distillation writes every round's file and card itself
        print(f"wrote {tcfg.out} and {write_card(tcfg, stats)}")


if __name__ == "__main__":
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
    main()
