"""The plumbing the secondary commands share (`python -m diffguide.classify`, `python -m diffguide.edit`): their own
primary config composed with Hydra's compose API (no `.hydra/` folder, no multirun: one job per command), and every
user error as one line on stderr with exit 2 (Ctrl-C: one line, exit 130: what was kept, where the command has
said so by raising `errors.Interrupted`), as `diffguide.run` promises."""

import errno
import sys
from typing import Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffguide.command import checks
from diffguide.command.config import compose_config
from diffguide.errors import Interrupted, UserError


def _keys(config_name: str, overrides: list[str], parent: str) -> list[str]:
    try:
        cfg = compose_config(config_name, overrides)
    except Exception:
        return []
    node = OmegaConf.select(cfg, parent) if parent else cfg
    hidden = {"_target_", "hydra"}
    return sorted(k for k in node.keys() if k not in hidden) if isinstance(node, DictConfig) else []


def describe(config_name: str, exc: BaseException, overrides: list[str], model_refusal: str) -> str:
    """One line for a config error; an unknown key lists the keys of this command's config (not the run's); a model
    config that sets the sampling run's other groups (a student's guidance, a hub model's metric) is refused with
    `model_refusal` ("model=NAME sets the sampling run's GROUP and " + model_refusal)."""
    for e in checks.causes(exc):
        full_key = getattr(e, "full_key", None)
        if isinstance(e, OmegaConfBaseException) and full_key and "not in" in str(e) and "Key" in str(e):
            parent, _, leaf = full_key.rpartition(".")
            rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != full_key]
            keys = _keys(config_name, rest, parent)
            hint = checks._suggest(leaf, keys) if keys else ""
            listing = f"; the keys{' of ' + parent if parent else ''} are: {', '.join(keys)}" if keys else ""
            return f"{full_key} is not a key{hint}{listing}"
    text = str(exc)
    if "No match in the defaults list" in text and text.startswith("In 'model/"):
        name = text.split("'")[1].split("/", 1)[1]
        return f"model={name} sets the sampling run's {text.split('override ')[1].split('.')[0]} and {model_refusal}"
    return checks.describe(exc, overrides)


def entry(argv: list[str] | None, config_name: str, usage: str, keys_help: str, model_refusal: str,
          run: Callable[[DictConfig], object], resolved: tuple[str, ...] = ("model",)) -> int:
    """Compose, resolve the `resolved` nodes (a bad value fails here, before any work), then `run(cfg)`; returns the
    exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(f"{usage}\nkeys (conf/{config_name}.yaml): {keys_help}")
        return 0
    folder = "the output folder"
    try:
        flags = [a for a in argv if a.startswith("-")]
        if flags:
            raise UserError(f"{flags[0]} is not an option ({usage})")
        try:
            cfg = compose_config(config_name, argv)
            folder = str(cfg.hydra.run.dir)
            for key in resolved:
                node = OmegaConf.select(cfg, key)
                if isinstance(node, DictConfig):
                    OmegaConf.to_container(node, resolve=True)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(describe(config_name, exc, argv, model_refusal)) from None
        try:
            run(cfg)
        except OmegaConfBaseException as exc:
            raise UserError(describe(config_name, exc, argv, model_refusal)) from None
        except Exception as exc:
            from hydra.errors import InstantiationException

            interrupted = next((e for e in checks.causes(exc) if isinstance(e, KeyboardInterrupt)), None)
            if interrupted is not None:
                raise interrupted from None
            if isinstance(exc, InstantiationException):
                raise UserError(checks.describe(exc, argv)) from None
            raise
    except KeyboardInterrupt as exc:
        print(exc.message if isinstance(exc, Interrupted) else "interrupted: nothing was written", file=sys.stderr,
              flush=True)
        return 130
    except UserError as exc:
        print(f"diffguide: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"diffguide: error: no space left on the device of {exc.filename or folder}", file=sys.stderr)
            return 2
        raise
    return 0
