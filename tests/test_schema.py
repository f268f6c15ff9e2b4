"""One schema for a run's keys: the package's run.schema.yaml, which the CLI checks and the workflow's schema
refers to, so a key, its range and its help text are declared once."""
import copy
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

from manidp.config import defaults, recipes, resolve, run_schema, validate
from manidp.errors import UserError
from manidp.plan import check_config

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
TINY_CONFIG = ROOT / ".test" / "config" / "config.yaml"
# The workflow's definitions that are a run's own sections.
SHARED = ("train", "runtime", "data")
FREE_FORM = ("method_options", "tags")


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and key not in FREE_FORM:
            keys += _leaves(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _schema_leaves(node: dict, prefix: str = "") -> list[str]:
    if "$ref" in node:
        node = run_schema()["$defs"][node["$ref"].removeprefix("#/$defs/")]
    keys = []
    for key, spec in node["properties"].items():
        if "$ref" in spec or "properties" in spec:
            keys += _schema_leaves(spec, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_every_key_the_cli_takes_is_declared_once_in_the_run_schema():
    declared = _schema_leaves(run_schema())
    assert sorted(declared) == sorted(_leaves(defaults()))
    assert len(declared) == len(set(declared))


def test_every_run_key_has_help_text_and_no_default():
    """Defaults live in defaults.yaml: snakemake's validate() would fill a schema default into every workflow
    section that refers to these definitions."""
    jsonschema.Draft202012Validator.check_schema(run_schema())
    specs = [spec for node in _walk(run_schema()) for spec in node.get("properties", {}).values()]
    assert specs and all("description" in spec or "$ref" in spec for spec in specs)
    assert not [node for node in _walk(run_schema()) if "default" in node]


def test_the_defaults_and_every_recipe_validate():
    validate(defaults())
    for dataset in recipes():
        assert resolve(flags={"dataset": dataset})["dataset"] == dataset


def test_the_workflow_schema_refers_to_the_package_definitions():
    workflow = yaml.safe_load(WORKFLOW_SCHEMA.read_text())
    package_file = Path(str(resources.files("manidp.configs").joinpath("run.schema.yaml"))).resolve()
    for name in SHARED:
        definition = workflow["$defs"][name]
        target, pointer = definition["$ref"].split("#")
        assert (WORKFLOW_SCHEMA.parent / target).resolve() == package_file
        assert pointer == f"/$defs/{name}"
        assert "properties" not in definition and "type" not in definition
    # Nor declares a section's keys again elsewhere (a hardware profile shares two names with runtime: device,
    # threads, which a latency measurement sets).
    run_keys = [set(run_schema()["$defs"][name]["properties"]) for name in SHARED]
    maps = [set(node["properties"]) for node in _walk(workflow) if isinstance(node.get("properties"), dict)]
    copies = [sorted(keys & names) for names in maps for keys in run_keys if len(keys & names) > 2]
    assert not copies, f"the workflow's schema declares a run's keys again: {copies}"


# A bad value of a run key, as a workflow section sets it: both readers refuse it, from the one definition.
BAD_VALUES = [("train", "momentum", 1), ("train", "lr", 0), ("train", "schedule", "linear"),
              ("data", "max_train", 0), ("data", "nope", 1), ("runtime", "device", "tpu")]


@pytest.mark.parametrize("section,key,bad", BAD_VALUES)
def test_cli_and_workflow_refuse_the_same_values(section, key, bad):
    with pytest.raises(UserError, match=f"'{section}.{key}'"):
        resolve({section: {key: bad}})
    config = yaml.safe_load(TINY_CONFIG.read_text())
    dataset = config["datasets"]["digits-c"]
    (dataset["dense"] if section == "train" else dataset).setdefault(section, {})[key] = bad
    with pytest.raises(UserError, match=rf"{section}\.{key}"):
        check_config(config, WORKFLOW_SCHEMA)


def test_snakemake_validate_resolves_the_reference():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate as snakemake_validate

    config = yaml.safe_load(TINY_CONFIG.read_text())
    good = copy.deepcopy(config)
    snakemake_validate(good, str(WORKFLOW_SCHEMA))
    assert good["datasets"]["digits-c"]["data"] == config["datasets"]["digits-c"]["data"]  # no defaults filled in
    config["datasets"]["digits-c"]["data"]["max_train"] = 0
    with pytest.raises(WorkflowError):
        snakemake_validate(config, str(WORKFLOW_SCHEMA))


def test_the_workflow_leaves_threads_to_resources():
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["datasets"]["digits-c"]["runtime"] = {"threads": 2}
    with pytest.raises(UserError, match="invalid name 'threads': threads come from resources"):
        check_config(config, WORKFLOW_SCHEMA)
