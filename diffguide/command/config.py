"""Where the configs live, the resolvers they use, and the schema that validates the run config."""

import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, DictConfig, OmegaConf

from diffguide.errors import UserError
from diffguide.runtime.device import resolve_device
from diffguide.data import prompts
from diffguide.store.checkpoint import asset_path

_HERE = Path(__file__).resolve().parent.parent  # the package
# A checkout keeps conf/ at the top level; an installed wheel ships it inside the package (pyproject maps it).
CONF_DIR = _HERE.parent / "conf" if (_HERE.parent / "conf").is_dir() else _HERE / "conf"


class Precision(enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class TuneConfig:
    """What a `hydra/sweeper=tune` sweep minimises (see run.objective)."""

    metric: Optional[str] = None                 # null: the first fid_* the metric writes
    min_class_accuracy: Optional[float] = None   # a floor: points below it are penalised


@dataclass
class RunConfig:
    """Top-level keys of `python -m diffguide.run`; the groups are validated by their own targets."""

    model: Any = MISSING
    sampler: Any = MISSING
    guidance: Any = MISSING
    classifier: Any = None
    metric: Any = None
    logger: Any = None
    prompts: Any = None
    scale: Optional[float] = None  # null: the guidance method's paper default
    steps: int = 25
    num_samples: int = 1000
    batch_size: int = 125
    seed: int = 0
    device: str = "auto"
    precision: Precision = Precision.bf16
    out_dir: Optional[str] = None
    grid_size: int = 100
    equivalent_scale: bool = False
    tune: TuneConfig = field(default_factory=TuneConfig)


def _first_not_null(*values):
    return next((v for v in values if v is not None), None)


def job_dirname(overrides, exclude) -> str:
    """A sweep job's folder name from its own overrides, like Hydra's override_dirname, but leaving out the keys
    that do not change the images (paths, device, batch size, sample count: a sweep can be extended in place) and
    with no path separators, so every job is one folder under the sweep dir."""
    exclude = set(exclude or ())
    prefixes = tuple(e[:-1] for e in exclude if e.endswith(".*"))  # `group.*`: every key of the group

    def left_out(key: str) -> bool:
        return key in exclude or key.startswith(prefixes) if prefixes else key in exclude

    kept = sorted(o for o in overrides if not left_out(o.split("=", 1)[0].lstrip("+~")))
    return ",".join(o.replace("/", "_") for o in kept) or "defaults"


def register() -> None:
    """Resolvers and schemas; safe to call more than once."""
    OmegaConf.register_new_resolver("dg.asset", asset_path, replace=True)
    OmegaConf.register_new_resolver("dg.data", prompts.shipped, replace=True)
    OmegaConf.register_new_resolver("dg.or", _first_not_null, replace=True)
    OmegaConf.register_new_resolver("dg.job_dirname", job_dirname, replace=True)
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """conf/CONFIG_NAME.yaml with the overrides, by Hydra's compose API (the hydra node included, for the run folder);
    Hydra's global state is left as it was found."""
    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose(config_name, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


#: sample i is seeded with seed + i, a 64-bit generator seed
SEED_MAX = 2 ** 64 - 1


def validate(cfg: DictConfig) -> None:
    """Range checks the schema's types cannot express; one clear message for the first problem."""
    for key, lo in (("steps", 1), ("num_samples", 1), ("batch_size", 1), ("seed", 0), ("grid_size", 0)):
        if cfg[key] < lo:
            raise UserError(f"{key} must be >= {lo} (got {cfg[key]})")
    if cfg.scale is not None and not math.isfinite(cfg.scale):
        raise UserError(f"scale must be a finite number (got {cfg.scale})")
    resolve_device(cfg.device)
    if cfg.seed + cfg.num_samples - 1 > SEED_MAX:  # sample i is seeded with seed + i, a 64-bit generator seed
        raise UserError(f"seed + num_samples - 1 must be <= {SEED_MAX} (2^64 - 1), the largest generator seed "
                        f"(got seed={cfg.seed}, num_samples={cfg.num_samples})")
