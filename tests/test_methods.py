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


class _EntryPoint:
    """Stands in for importlib.metadata.EntryPoint: a name, a value, and what load() does."""

    def __init__(self, name, value, target=None, error=None):
        self.name, self.value, self._target, self._error = name, value, target, error

    def load(self):
        if self._error:
            raise self._error
        return self._target


def test_registry_reads_the_entry_point_group():
    from importlib.metadata import entry_points

    from manidp.methods import ENTRY_POINT_GROUP

    names = {point.name for point in entry_points(group=ENTRY_POINT_GROUP)}
    assert {"dense", "manidp", "l1", "fpgm", "sfp", "channel_gating", "fbs"} <= names
    assert names == set(METHODS.names())


@pytest.mark.parametrize("points, message", [
    ([_EntryPoint("broken", "nowhere:Broken", error=ImportError("No module named 'nowhere'"))],
     "method entry point broken = 'nowhere:Broken' (group manidp.methods) failed to import: ImportError"),
    ([_EntryPoint("dense", "manidp.methods.dense:Dense", METHODS.get("dense")),
      _EntryPoint("dense", "other.pkg:Dense", METHODS.get("dense"))],
     "method 'dense' is registered twice: by entry points 'manidp.methods.dense:Dense' and 'other.pkg:Dense'"),
    ([_EntryPoint("l1", "other.pkg:Fake", METHODS.get("fbs"))], "must name a Method subclass whose name is 'l1'"),
])
def test_bad_entry_points_give_one_clear_error(points, message, monkeypatch):
    import manidp.methods as methods
    from manidp.errors import UserError

    monkeypatch.setattr(methods, "entry_points", lambda group: points)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        methods.load_all()
