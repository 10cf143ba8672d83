"""A run's fingerprint: the settings its images depend on, recorded in sampling.json by `SampleStore.claim` (the
digest of it is the `run` every sample carries), so that a resumed run never mixes samples of other settings."""

from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from diffguide.store import checkpoint

#: paths in a config that a run writes to rather than reads from
_NOT_INPUTS = {"cache_root"}


def dependency_files(node, prefix: str) -> dict[str, str]:
    """config key -> path, for every value under `node` that names an existing file or folder (weights, a weak model,
    a classifier, a hub folder): what the images depend on besides the settings themselves."""
    found = {}
    if isinstance(node, dict):
        for key, value in node.items():
            if key not in _NOT_INPUTS:
                found.update(dependency_files(value, f"{prefix}.{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.update(dependency_files(value, f"{prefix}.{i}"))
    elif isinstance(node, str) and node and (Path(node).is_file() or ("/" in node and Path(node).is_dir())):
        found[prefix] = node  # a folder only when written as a path: a bare word may match a folder by chance
    return found


#: Keys added to a group after samples were first recorded, with the default that reproduces the images made before
#: they existed: left out of the fingerprint at that default, so that a folder made before them still resumes (its
#: sampling.json and every sample's `run` digest stay what they were).
ADDED_KEYS = {("sampler", "variance"): "fixed_small", ("guidance", "channels"): None,
              ("model", "family"): "vp", ("model", "parameterisation"): None,
              ("sampler", "dynamic_threshold"): None, ("guidance", "schedule"): None}


def revision(node) -> int:
    """The `revision` of the class a config node's `_target_` names (0 when it has none, or names a function): a
    class raises it when a correction changes the images its unchanged settings make."""
    target = node.get("_target_") if isinstance(node, dict) else None
    if not isinstance(target, str):
        return 0
    try:
        return int(getattr(get_class(target), "revision", 0))
    except (ImportError, ValueError, AttributeError):
        return 0


def fingerprint(cfg: DictConfig) -> tuple[dict, dict[str, str]]:
    """The settings an image depends on (not batch size, device split or sample count), with the content digest of
    every file they name, and the code revision of the sampler and guidance where it is not 0; and those files'
    paths by config key (to name the one that changed)."""
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    keys = ("model", "sampler", "guidance", "classifier", "seed", "precision")
    fp = {key: resolved[key] for key in keys}
    for (group, key), default in ADDED_KEYS.items():
        if isinstance(fp[group], dict) and key in fp[group] and fp[group][key] == default:
            fp[group] = {k: v for k, v in fp[group].items() if k != key}
    for group in ("sampler", "guidance"):
        code = revision(fp[group])
        if code:
            fp[group] = {**fp[group], "_revision": code}
    files = {}
    for key in ("model", "sampler", "guidance", "classifier"):
        files.update(dependency_files(resolved[key], key))
    fp["files"] = {key: checkpoint.path_digest(path) for key, path in sorted(files.items())}
    return fp, files
