"""The layers of docs/architecture.md, as import-linter contracts (pyproject.toml [tool.importlinter]): no import goes
up a layer, no package or module closes a circle with its siblings, and the top of the package holds the entry
points and what every layer shares."""

import contextlib
import io
import tomllib

from importlinter.cli import lint_imports

from tests.helpers import ROOT

ENTRY_POINTS = {"run", "train", "classify", "edit", "report"}


def _lint(config: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = lint_imports(config_filename=config, no_cache=True, no_logo=True)
    return status, out.getvalue()


def test_the_import_contracts_hold():
    status, report = _lint(str(ROOT / "pyproject.toml"))
    assert status == 0, report
    assert "2 kept, 0 broken" in report, report


def test_the_layers_contract_can_fail(tmp_path):
    """The same contract with two layers swapped must break (the check is not vacuous): samplers import guidance."""
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in settings["contracts"] if c["type"] == "layers")["layers"]
    i = layers.index("diffguide.samplers")
    j = layers.index("diffguide.guidance | diffguide.metrics | diffguide.logging")
    layers[i], layers[j] = layers[j], layers[i]
    body = "\n".join(f'    "{layer}",' for layer in layers)
    config = tmp_path / "swapped.toml"
    config.write_text(f'[tool.importlinter]\nroot_package = "diffguide"\n\n[[tool.importlinter.contracts]]\n'
                      f'name = "swapped"\ntype = "layers"\nlayers = [\n{body}\n]\n')
    status, report = _lint(str(config))
    assert status == 1, report
    assert "diffguide.samplers is not allowed to import diffguide.guidance" in report, report


def test_the_top_of_the_package_holds_the_entry_points_and_the_shared_errors():
    modules = {p.stem for p in (ROOT / "diffguide").glob("*.py")} - {"__init__"}
    assert modules == ENTRY_POINTS | {"errors"}
