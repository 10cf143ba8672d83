"""The command line's promise: every configuration mistake is one line on stderr and exit 2, before any work.

Hydra reports its own errors (an unknown option, a typo in a key, a value of the wrong type) as several lines with a
stack-trace hint and exit 1, and it reports them per job, after a sweep has started. So `precheck` composes every
point of the command (each combination of a `-m` sweep) with Hydra's compose API before Hydra runs anything, and
turns what is wrong into one line per bad point: the valid choices of a group, the nearest key of a typo, the keys a
method's constructor takes.
"""

import difflib
import inspect
import itertools
import os
import types
import typing
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException, MissingConfigException, OverrideParseException
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from diffguide.command.config import compose_config, validate
from diffguide.errors import UserError
from diffguide.runtime import slurm

#: instantiate's own keys, never constructor arguments
_INSTANTIATE_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
GROUPS = ("model", "sampler", "guidance", "classifier", "metric", "logger")


def sweep_points(overrides: list[str], multirun: bool) -> list[tuple[str, list[str]]]:
    """Every combination a `-m` sweep runs, as Hydra's basic sweeper forms them (comma lists, range(), choice()):
    (the point's swept values, to name it; its overrides)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    if not multirun:
        return [("", list(overrides))]
    axes = [_search_space(o) if _searched(o) else
            [(f"{o.get_key_element()}={v}", True) for v in o.sweep_string_iterator()] if o.is_sweep_override()
            else [(o.input_line, False)] for o in parsed]
    return [(" ".join(o for o, swept in point if swept), [o for o, _ in point]) for point in itertools.product(*axes)]


#: an optimising sweeper's search space (hydra/sweeper=tune): hydra.sweeper.params.KEY=interval(a,b) | choice(...)
_SEARCH = "hydra.sweeper.params."


def _searched(override) -> bool:
    from hydra.core.override_parser.types import IntervalSweep

    return override.get_key_element().startswith(_SEARCH) or isinstance(override.value(), IntervalSweep)


def _search_space(override) -> list[tuple[str, bool]]:
    """The points an optimising sweeper's search space stands for, to check: KEY at both ends of an interval
    (`scale=interval(1,3)`, or `hydra.sweeper.params.scale='interval(1,3)'`), at every value of a choice or range.
    The search itself is the sweeper's."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    key = override.get_key_element()
    if key.startswith(_SEARCH):  # the search space written as a string: read it as the sweeper will
        key = key[len(_SEARCH):]
        override = OverridesParser.create().parse_overrides([f"{key}={override.value()}"])[0]
    value = override.value()
    if isinstance(value, IntervalSweep):
        values = [value.start, value.end]
    elif isinstance(value, (ChoiceSweep, RangeSweep)):
        values = list(override.sweep_string_iterator())
    else:
        values = [override.get_value_element_as_str()]
    return [(f"{key}={v}", True) for v in values]


def compose_point(overrides: list[str]) -> DictConfig:
    """One point of `python -m diffguide.run` (conf/config.yaml) with its overrides."""
    return compose_config("config", overrides)


def causes(exc: BaseException):
    """The exception and everything it was raised from or during (once each: a re-raised error can make a loop)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _keys_of(overrides: list[str], parent: str) -> list[str]:
    """The keys at `parent` ('' for the top) of the config these overrides compose to without the bad one."""
    try:
        cfg = compose_point(overrides)
    except Exception:
        return []
    node = OmegaConf.select(cfg, parent) if parent else cfg
    hidden = _INSTANTIATE_KEYS | ({"hydra"} if not parent else set())
    return [k for k in node.keys() if k not in hidden] if isinstance(node, DictConfig) else []


def describe(exc: BaseException, overrides: list[str] | None = None) -> str:
    """One line for a configuration error raised by Hydra or OmegaConf."""
    overrides = list(overrides or [])
    for e in causes(exc):
        if isinstance(e, UserError):
            return _first_line(e)
        if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
            group, option = e.missing_cfg_file.rsplit("/", 1)
            options = [o for o in (e.options or []) if o]
            return f"{group}={option} is not an option{_suggest(option, options)}; choose one of: {', '.join(options)}"
    for e in causes(exc):
        full_key = getattr(e, "full_key", None)
        if isinstance(e, OmegaConfBaseException) and full_key and "not in" in str(e) and "Key" in str(e):
            parent, _, leaf = full_key.rpartition(".")
            rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != full_key]
            keys = _keys_of(rest, parent) if not parent.startswith("hydra") else []
            listing = f"; the keys{' of ' + parent if parent else ''} are: {', '.join(sorted(keys))}" if keys else ""
            hint = _suggest(leaf, keys) if keys else ""
            return f"{full_key} is not a key{hint}{listing} (add a new one with +{full_key}=...)"
        if isinstance(e, OmegaConfBaseException) and full_key and not full_key.startswith("hydra."):
            return f"{full_key}: {_first_line(e)}"
    for e in causes(exc):
        if isinstance(e, InstantiationException):
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), "")
            detail = next((line for line in lines[1:] if not line.startswith("full_key:")), lines[0] if lines else "")
            return f"{key or 'a config node'}: {detail}"
    for e in causes(exc):
        if isinstance(e, OverrideParseException):
            return f"cannot parse the overrides ({_first_line(e)}); see `python -m diffguide.run --help`"
    return _first_line(exc)


def check_targets(cfg: DictConfig) -> None:
    """Every key of an instantiated node must be an argument of its `_target_`: else `+guidance.bogus=1` reaches the
    constructor as a TypeError after the model has loaded."""

    def visit(node, path: str):
        if not isinstance(node, DictConfig):
            return
        target = node.get("_target_") if "_target_" in node else None
        if isinstance(target, str):
            try:
                params = inspect.signature(get_method(target)).parameters
            except Exception:
                raise UserError(f"{path}._target_={target} cannot be imported") from None
            names = [n for n in params if n != "self"]
            open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            for key in node.keys():
                if key in _INSTANTIATE_KEYS:
                    continue
                if key not in names:
                    if open_ended:
                        continue
                    raise UserError(f"{path}.{key} is not a key of {target.rsplit('.', 1)[-1]}"
                                    f"{_suggest(str(key), names)}; its keys are: {', '.join(names)}")
                value = node[key]
                wanted = _wanted(params[key].annotation)
                if wanted and not isinstance(node._get_node(key), DictConfig) and not _fits(value, wanted):
                    raise UserError(f"{path}.{key}={value!r}: expected {' or '.join(_NAMES[w] for w in wanted)}")
        for key in node.keys():
            if key != "_target_" and OmegaConf.is_config(node._get_node(key)):
                visit(node[key], f"{path}.{key}")

    for group in GROUPS:
        if group in cfg:
            visit(cfg[group], group)


_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", type(None): "null"}


def _wanted(annotation) -> tuple | None:
    """The plain types an annotation admits (bool, int, float, str, None), or None where it says more than that."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    return tuple(options) if options and all(o in _NAMES for o in options) else None


def _fits(value, wanted: tuple) -> bool:
    if isinstance(value, bool):
        return bool in wanted
    if isinstance(value, int):
        return int in wanted or float in wanted
    return any(isinstance(value, w) for w in wanted if w is not bool)


def check_writable(folder: Path, key: str) -> None:
    """The run (or sweep) folder can be made and written: else Hydra's own mkdir is a traceback before the job."""
    probe = Path(folder)
    try:
        probe.mkdir(parents=True, exist_ok=True)
        test = probe / f".diffguide-write-test.{os.getpid()}"
        test.write_bytes(b"")
        test.unlink()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        if isinstance(exc, FileExistsError) or (probe.exists() and not probe.is_dir()):
            why = "it is a file, not a folder"
        raise UserError(f"{key}={folder} cannot be used as the output folder: {why}") from None


def check_point(overrides: list[str], multirun: bool) -> str:
    """Compose one point and run every check that needs no model: raises UserError with one line. Returns the point's
    output folder (the sweep's, for `-m`)."""

    try:
        cfg = compose_point(overrides)
        hydra_node = cfg.hydra
        with open_dict(cfg):
            del cfg["hydra"]
        OmegaConf.to_container(cfg, resolve=True)  # interpolations resolve
        validate(cfg)
        check_targets(cfg)
        folder = hydra_node.sweep.dir if multirun else hydra_node.run.dir
        launcher = OmegaConf.select(hydra_node, "launcher._target_", default="") or ""
        if multirun and launcher.endswith("SlurmLauncher"):
            slurm.check_gpus(hydra_node.launcher.get("gpus_per_node"), hydra_node.launcher.get("partition"))
    except UserError:
        raise
    except Exception as exc:
        raise UserError(describe(exc, overrides)) from None
    # The default run folder is named by the clock; check its parent, which Hydra's folder will be made in.
    explicit = OmegaConf.select(cfg, "out_dir") is not None
    check_writable(Path(folder) if explicit else Path(folder).parent, "out_dir" if explicit else "the output folder")
    return str(folder)


def precheck(overrides: list[str], multirun: bool) -> tuple[list[str], str | None]:
    """One line per bad point of the command (empty: all good), and the output folder of the last point checked (for
    an error raised before Hydra has set up the job; None when no point got that far)."""
    try:
        points = sweep_points(overrides, multirun)
    except Exception as exc:
        return [describe(exc, overrides)], None
    problems, folder, reasons = [], None, set()
    for name, point in points:
        try:
            folder = check_point(point, multirun)
        except UserError as exc:
            problems.append(f"{name}: {_first_line(exc)}" if name else _first_line(exc))
            reasons.add(_first_line(exc))
    if len(points) > 1 and len(problems) == len(points) and len(reasons) == 1:
        return [f"{reasons.pop()} (every point of the sweep)"], folder  # a sweep-wide mistake is said once
    return problems, folder
