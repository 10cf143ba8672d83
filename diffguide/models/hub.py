"""Loading pretrained diffusers / timm components from a hub id or a local folder, with one clear line when they
cannot be had (offline cluster nodes, no cache, a typo in the id)."""

import importlib.util
import os

from diffguide.errors import UserError


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def not_found(source: str, what: str, key: str, exc: BaseException | None = None) -> UserError:
    if source.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(source)):
        return UserError(f"{key}={source}: no such folder")
    if os.path.isdir(source):
        why = f"the folder {source} has no loadable {what}"
    elif offline():
        why = "it is not in the local cache and the hub is offline (HF_HUB_OFFLINE=1)"
    else:
        why = "it is neither a local folder nor in the local cache, and the hub could not be reached"
    detail = f" ({type(exc).__name__})" if exc is not None else ""
    return UserError(f"cannot load {what} from {source!r}: {why}{detail}; looked in the cache {hub_cache()}. "
                     f"Download it where the hub is reachable (huggingface-cli download {source}) and set "
                     f"{key}=/path/to/that/folder")


def from_pretrained(cls, source: str, key: str, subfolder: str | None = None, what: str | None = None, **kwargs):
    """cls.from_pretrained(source, subfolder=...), with a missing model turned into one UserError line."""
    what = what or (f"{cls.__name__} ({subfolder})" if subfolder else cls.__name__)
    if importlib.util.find_spec("accelerate") is None:  # diffusers models: else a warning on every load
        kwargs.setdefault("low_cpu_mem_usage", False)
    try:
        return cls.from_pretrained(source, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as exc:  # huggingface_hub's not-found and offline errors are OSErrors
        raise not_found(source, what, key, exc) from None


def load_config(cls, source: str, key: str, subfolder: str | None = None, what: str | None = None) -> dict:
    what = what or f"the {subfolder or 'model'} config"
    try:
        return dict(cls.load_config(source, subfolder=subfolder))
    except (OSError, ValueError) as exc:
        raise not_found(source, what, key, exc) from None
