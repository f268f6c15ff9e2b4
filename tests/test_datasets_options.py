"""Datasets declare their data.* options: the run schema's data block, the packaged defaults and
``manidp datasets`` follow the declarations, and a dataset refuses a key it does not take."""
import pytest

from manidp.cli import main
from manidp.config import defaults, run_schema
from manidp.data import DATASETS, SHARED_OPTIONS, Option, all_options, build_dataset, register_dataset
from manidp.errors import UserError


def _other_value(option: Option):
    """A valid value of ``option`` other than its default."""
    kinds = option.schema["type"] if isinstance(option.schema["type"], list) else [option.schema["type"]]
    if "boolean" in kinds:
        return not option.default
    if "string" in kinds:
        return "elsewhere"
    return (option.default or 0) + 1


def test_the_schema_data_block_is_the_union_of_the_declared_options():
    declared = {key: option.schema_property() for key, option in all_options().items()}
    assert run_schema()["$defs"]["data"]["properties"] == declared


def test_the_packaged_defaults_are_the_declared_defaults():
    """A resolved config carries every data key; each dataset lets the others' keys through at these values."""
    assert defaults()["data"] == {key: option.default for key, option in all_options().items()}


@pytest.mark.parametrize("name", DATASETS.names())
def test_a_dataset_takes_the_whole_default_block_and_keeps_its_own_keys(name):
    entry = DATASETS.get(name)
    settings = entry.settings(defaults()["data"])
    assert list(settings) == list(entry.options) and set(SHARED_OPTIONS) <= set(settings)
    assert entry.settings({}) == {key: option.default for key, option in entry.options.items()}


FOREIGN = [(name, key) for name in DATASETS.names() for key in all_options() if key not in DATASETS.get(name).options]


@pytest.mark.parametrize("name,key", FOREIGN)
def test_a_key_the_dataset_does_not_take_is_refused_naming_it_and_the_keys_it_takes(name, key):
    with pytest.raises(UserError) as err:
        build_dataset(name, {key: _other_value(all_options()[key])})
    message = str(err.value)
    assert f"data.{key} applies to " in message and f"not to dataset '{name}'" in message and "\n" not in message
    assert message.endswith(f"{name} takes " + ", ".join(f"data.{k}" for k in DATASETS.get(name).options))
    owners = [n for n in DATASETS.names() if key in DATASETS.get(n).own_options]
    assert f"applies to {' and '.join(owners)} only" in message


def test_a_key_no_dataset_takes_is_refused():
    with pytest.raises(UserError, match=r"data.imagenet_root is not an option of any dataset \('digits-c' was "
                                        r"chosen\); digits-c takes data.digits_c_seed, "):
        build_dataset("digits-c", {"imagenet_root": "/data"})


def test_one_key_keeps_one_meaning():
    other_seed = Option(1, "a different default", {"type": "integer", "minimum": 0})
    with pytest.raises(ValueError, match="data.split_seed"):
        register_dataset("clashing", {"split_seed": other_seed})(lambda data_cfg, seed=0: None)
    assert "clashing" not in DATASETS


def test_the_datasets_command_prints_each_option_with_its_default_and_help(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    blocks, name = {}, None
    for line in out.splitlines():
        if line.startswith("  "):
            blocks[name].append(line.strip())
        else:
            name = line
            blocks[name] = []
    assert list(blocks) == [*DATASETS.names(), "every dataset also takes"]
    for name in DATASETS.names():
        own = DATASETS.get(name).own_options
        assert blocks[name] == [f"data.{k} (default: {o.default_text()}): {o.help}" for k, o in own.items()]
    assert blocks["every dataset also takes"] == [f"data.{k} (default: {o.default_text()}): {o.help}"
                                                   for k, o in SHARED_OPTIONS.items()]
    assert "data.cache_dir (default: null)" in out and "data.root (default: data)" in out
