"""Every registered method trains a few steps on digits-c and writes the outputs every method must write.

Parametrized over the method registry: a method is tested the moment it is
registered. Methods start from the session's dense run and get a budget.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import small_run_config
from manidp.engine import train
from manidp.methods import METHODS, load_all

load_all()

METRIC_FIELDS = {"test_top1", "test_top5", "val_top1", "macs", "macs_dense", "macs_reduction", "params",
                 "params_dense", "method", "dynamic", "budget", "method_info", "config", "epochs_trained"}


@pytest.mark.parametrize("name", METHODS.names())
def test_method_trains_and_writes_every_output(name, dense_run, data_cache, tmp_path):
    method = METHODS.get(name)
    out = train(small_run_config(tmp_path / name, data_cache, method=name, budget=0.4, init_from=str(dense_run),
                                 **{"train.epochs": 1, "data.max_train": 128, "data.max_eval": 128}))
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_FIELDS <= set(metrics)
    assert metrics["method"] == name and metrics["dynamic"] == method.dynamic
    assert metrics["method_info"]["name"] == name
    assert 0 <= metrics["test_top1"] <= 100
    if method.needs_budget:
        assert metrics["macs"] < metrics["macs_dense"]
        assert metrics["macs_reduction"] > 0
    instances = pd.read_csv(out / "instances_test.csv")
    assert len(instances) == metrics["test_instances"] == 128
    if method.dynamic:
        assert "macs" in instances and instances["macs"].notna().all()
        assert instances["macs"].mean() == pytest.approx(metrics["macs"])
    assert (out / "model.pt").is_file()
