"""The one MAC counter: reference counts, static shapes, per-instance counting."""
import json
import subprocess

import pytest
import timm
import torch
import torch.nn as nn

import manidp.models  # noqa: F401  (registers CIFAR ResNets)
from manidp.macs import InstanceMacs, count_macs, trace_layers
from conftest import manidp_cli

# flops.md: conv + Linear MACs at batch 1 (CIFAR ResNets with option-A shortcuts).
REFERENCE = [
    ("cifar_resnet20", 32, 10, 40.55e6),
    ("cifar_resnet56", 32, 10, 125.49e6),
    ("cifar_resnet110", 32, 10, 252.9e6),
    ("resnet18", 224, 1000, 1.814e9),
    ("resnet34", 224, 1000, 3.664e9),
    ("resnet50", 224, 1000, 4.089e9),
]


@pytest.mark.parametrize("name,size,classes,expected", REFERENCE)
def test_reference_counts(name, size, classes, expected):
    model = timm.create_model(name, num_classes=classes)
    assert count_macs(model, (3, size, size)) == pytest.approx(expected, rel=1e-3)


def test_cli_macs_json_matches_reference():
    """The console command itself (one process): the other CLI cases run its main() in this one."""
    out = subprocess.run(manidp_cli("macs", "resnet34", "--input-size", "224", "--json"),
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["macs"] == pytest.approx(3.664e9, rel=1e-3)


@pytest.mark.parametrize("args,expected", [
    ((), 125_485_696),  # a CIFAR backbone keeps its own 10-class head
    (("--num-classes", "1000"), 125_549_056),
])
def test_cli_macs_cifar_head(args, expected, capsys):
    from manidp.cli import main

    assert main(["macs", "cifar_resnet56", "--input-size", "32", "--json", *args]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] == expected


def test_pruned_model_counted_as_it_physically_is():
    wide = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    narrow = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(5, 8, 3, padding=1))
    assert count_macs(wide, (3, 4, 4)) == 9 * 3 * 8 * 16 + 9 * 8 * 8 * 16
    assert count_macs(narrow, (3, 4, 4)) == 9 * 3 * 5 * 16 + 9 * 5 * 8 * 16


def test_depthwise_and_linear_costs():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Flatten(), nn.Linear(4 * 9, 7))
    layers = trace_layers(model, (4, 3, 3))
    assert layers["0"].macs == 9 * 1 * 4 * 9
    assert layers["2"].macs == 36 * 7


def test_instance_counter_uses_kept_channels():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1))
    counter = InstanceMacs(model, (3, 5, 5))
    kept = torch.tensor([8, 4, 0])
    macs = counter(3, out_kept={"0": kept}, in_kept={"2": kept})
    expected = [9 * 3 * k * 25 + k * 6 * 25 for k in (8, 4, 0)]
    assert macs.tolist() == expected
    assert counter(1).item() == counter.dense == count_macs(model, (3, 5, 5))


def test_instance_counter_refuses_unknown_layers():
    counter = InstanceMacs(nn.Sequential(nn.Conv2d(1, 2, 1)), (1, 2, 2))
    with pytest.raises(KeyError, match="never saw"):
        counter(1, out_kept={"nope": torch.ones(1)})
