"""The run schema's defaults are conf/config.yaml's: a value changed in one place only fails here."""

from omegaconf import OmegaConf

from diffguide.command.config import CONF_DIR, RunConfig


def _schema_defaults() -> dict:
    return OmegaConf.to_container(OmegaConf.structured(RunConfig), enum_to_str=True)


def _config_yaml() -> tuple[set[str], dict]:
    """The groups config.yaml's defaults list chooses, and its own top-level values (hydra's settings left out)."""
    config = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"), resolve=False)
    groups = {key for entry in config.pop("defaults") if isinstance(entry, dict) for key in entry}
    config.pop("hydra")
    return groups, config


def test_every_schema_default_equals_config_yaml():
    schema = _schema_defaults()
    groups, values = _config_yaml()
    assert groups <= set(schema), f"groups the schema does not declare: {sorted(groups - set(schema))}"
    assert set(values) == set(schema) - groups, "config.yaml's values and the schema's keys differ"
    differ = {key: (schema[key], values[key]) for key in values if schema[key] != values[key]}
    assert not differ, f"schema default vs config.yaml: {differ}"
