"""Layered config: defaults, dataset recipe, file, --set; clean messages for bad input."""
import copy

import pytest

from manidp.config import resolve
from manidp.errors import UserError


def test_recipe_and_overrides_layer_in_order():
    cfg = resolve({"train": {"lr": 0.2}}, ["train.lr=0.05"], {"seed": 3})
    assert cfg["train"]["lr"] == 0.05 and cfg["seed"] == 3
    imagenet = resolve(flags={"dataset": "imagenet"})
    assert imagenet["backbone"] == "resnet18" and imagenet["train"]["weight_decay"] == 1e-4


@pytest.mark.parametrize("assignment,message", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("train.lr=fast", "must be a number"),
    ("train.schedule=linear", "valid values: cosine, step, constant"),
    ("budget=1.5", "'budget' must be a number >= 0 and < 1 or null, got 1.5. budget: requested MACs reduction"),
    ("runtime.device=tpu", "valid values"),
    ("noequals", "key=value"),
])
def test_malformed_values_are_refused_with_the_key(assignment, message):
    with pytest.raises(UserError, match=message):
        resolve(assignments=[assignment])


@pytest.mark.parametrize("text,value", [("1e6", 1e6), ("1.0e6", 1e6), ("1e-2", 0.01), ("-1E+3", -1000.0),
                                        (".5", 0.5), ("3", 3), ("0x10", 16), ("1e", "1e"), ("abc", "abc")])
def test_yaml_numbers_read_as_yaml_1_2(text, value):
    from manidp.config import yaml_load

    parsed = yaml_load(f"x: {text}")["x"]
    assert parsed == value and type(parsed) is type(value)


def test_config_file_and_set_take_exponent_floats(tmp_path):
    from manidp.config import load_yaml

    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 1e-2, weight_decay: 5e-4}\n")
    cfg = resolve(load_yaml(path), ["train.min_lr=1e-6", "train.gamma=1.0e-1"])
    assert cfg["train"]["lr"] == 0.01 and cfg["train"]["weight_decay"] == 5e-4
    assert cfg["train"]["min_lr"] == 1e-6 and cfg["train"]["gamma"] == 0.1


def test_workflow_config_numbers_are_retyped_in_place():
    from manidp.config import yaml12_numbers

    config = {"datasets": {"d": {"finetune": {"train": {"lr": "1e-2", "epochs": 3}}, "seeds": ["2e0", "x"]}},
              "name": "1e-2 lr", "quoted": "12"}
    assert yaml12_numbers(config) is config
    assert config["datasets"]["d"]["finetune"]["train"] == {"lr": 0.01, "epochs": 3}
    assert config["datasets"]["d"]["seeds"] == [2.0, "x"] and config["name"] == "1e-2 lr" and config["quoted"] == "12"


def test_data_keys_at_their_default_change_neither_the_config_nor_its_hash():
    """A run saved before a data key existed (a new dataset's, at its default) is the same run: resuming
    or re-running into its folder needs no --force, and its hash stays."""
    from manidp.config import config_differences, config_hash

    new = resolve(flags={"dataset": "digits-c"})
    assert "image_folder" in new["data"] and "digits_c_seed" in new["data"]
    old = copy.deepcopy(new)
    del old["data"]["image_folder"], old["data"]["val_holdout"]
    assert config_differences(old, new) == [] and config_hash(old) == config_hash(new)
    changed = copy.deepcopy(new)
    changed["data"]["digits_c_seed"] = 3  # a key digits-c takes still counts
    assert config_differences(new, changed) == ["data.digits_c_seed: 0 -> 3"]
    assert config_hash(changed) != config_hash(new)


def test_changed_keys_are_listed():
    from manidp.config import config_differences

    old = resolve(flags={"train.epochs": 10})
    new = resolve(flags={"train.epochs": 5, "train.lr": 0.5, "runtime.threads": 2, "out": "elsewhere"})
    assert config_differences(old, new) == ["train.epochs: 10 -> 5", "train.lr: 0.1 -> 0.5"]
