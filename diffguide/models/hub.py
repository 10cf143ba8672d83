"""Loading pretrained diffusers / timm components from a hub id or a local folder, with one clear line when they
cannot be had (offline cluster nodes, no cache, a typo in the id)."""

import importlib.util
import os
import socket
from contextlib import contextmanager
from urllib.parse import urlparse

from diffguide.errors import UserError

#: whether the hub answered, asked once per process
_HUB_STATE: dict[str, bool] = {}


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether `url`'s host answers a TCP connect within `timeout`."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable() -> bool:
    """huggingface_hub retries an unreachable hub for about a minute with a warning per try; a cluster node without
    internet should be told at once instead."""
    from huggingface_hub import constants

    return reachable(constants.ENDPOINT)


def not_found(source: str, what: str, key: str, exc: BaseException | None = None) -> UserError:
    if source.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(source)):
        return UserError(f"{key}={source}: no such folder")
    if os.path.isdir(source):
        why = f"the folder {source} has no loadable {what}"
    elif offline():
        why = "it is not in the local cache and the hub is offline (HF_HUB_OFFLINE=1)"
    elif not _HUB_STATE.get("reachable", True):
        from huggingface_hub import constants

        why = f"it is not in the local cache and the hub ({constants.ENDPOINT}) could not be reached"
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
    _go_local_if_hub_unreachable(source, kwargs)
    if subfolder is not None:  # a pipeline takes no subfolder (and warns of one on stderr)
        kwargs["subfolder"] = subfolder
    try:
        with quiet_loading():
            return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:  # huggingface_hub's not-found and offline errors are OSErrors
        raise not_found(source, what, key, exc) from None


@contextmanager
def quiet_loading():
    """No progress bars while diffusers and transformers load weights: stderr is for what went wrong."""
    from diffusers.utils import logging as diffusers_logging

    bars = [diffusers_logging]
    try:
        from transformers.utils import logging as transformers_logging

        bars.append(transformers_logging)
    except ImportError:
        pass
    enabled = [lib.is_progress_bar_enabled() for lib in bars]
    for lib in bars:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, on in zip(bars, enabled):
            if on:
                lib.enable_progress_bar()


def _go_local_if_hub_unreachable(source: str, kwargs: dict) -> None:
    """A hub id, not offline by configuration, and the hub unreachable: load from the local cache only (one check
    per process)."""
    if os.path.isdir(os.path.expanduser(source)) or offline() or kwargs.get("local_files_only"):
        return
    if "reachable" not in _HUB_STATE:
        _HUB_STATE["reachable"] = hub_reachable()
    if not _HUB_STATE["reachable"]:
        kwargs["local_files_only"] = True


def load_config(cls, source: str, key: str, subfolder: str | None = None, what: str | None = None) -> dict:
    what = what or f"the {subfolder or 'model'} config"
    kwargs = {}
    _go_local_if_hub_unreachable(source, kwargs)
    try:
        return dict(cls.load_config(source, subfolder=subfolder, **kwargs))
    except (OSError, ValueError) as exc:
        raise not_found(source, what, key, exc) from None
