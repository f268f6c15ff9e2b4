"""Layered config: defaults, dataset recipe, file, --set; clean messages for bad input."""
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
    ("budget=1.5", "MACs reduction in"),
    ("runtime.device=tpu", "valid values"),
    ("noequals", "key=value"),
])
def test_malformed_values_are_refused_with_the_key(assignment, message):
    with pytest.raises(UserError, match=message):
        resolve(assignments=[assignment])
