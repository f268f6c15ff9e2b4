"""manidp.runid: one identity per result, from which its folder follows and which metrics.json records."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from conftest import small_run_config
from manidp import reporting
from manidp.config import config_hash, default_out_dir, resolve
from manidp.errors import UserError
from manidp.plan import Plan, run_dir
from manidp.runid import RunId
from test_reporting import make_run
from test_workflow import DEFAULT_CONFIG

METHOD_RUN = RunId("digits-c", "cifar_resnet20", entry="manidp_eta0", method="manidp", budget=0.55, seed=2,
                   config_hash="0123456789abcdef")


@pytest.fixture(scope="module")
def plan() -> Plan:
    return Plan(yaml.safe_load(DEFAULT_CONFIG.read_text()))


def test_round_trip_through_json():
    assert RunId.from_dict(json.loads(json.dumps(METHOD_RUN.to_dict()))) == METHOD_RUN
    dense = RunId("digits-c", "cifar_resnet20", entry="dense", method="dense", budget=None, seed=0)
    assert RunId.from_dict(json.loads(json.dumps(dense.to_dict()))) == dense


@pytest.mark.parametrize("broken", [{"dataset": "digits-c"}, {**METHOD_RUN.to_dict(), "folder": "x"}, "runs/x"])
def test_a_damaged_identity_is_refused(broken):
    with pytest.raises(UserError, match="not a run identity"):
        RunId.from_dict(broken)


@pytest.mark.parametrize("folder, expected", [
    # The layouts the workflow builds, as they were named before RunId existed.
    (lambda p: p.dense_dirs("digits-c")[0], "runs/digits-c/cifar_resnet20/dense/seed0"),
    (lambda p: p.method_dirs("digits-c")[0], "runs/digits-c/cifar_resnet20/manidp-b0.4/seed0"),
    (lambda p: p.ablation_dirs("digits-c")[-1], "runs/digits-c/cifar_resnet20/manidp_authors-b0.55/seed2"),
    (lambda p: p.tuning_dirs("digits-c")[0], "runs/tuning/digits-c/cifar_resnet20/manidp-b0.55/lr0.02-lam0.0125/seed0"),
    (lambda p: p.augment_dirs("digits-c")[0], "runs/augment/digits-c/cifar_resnet20/dense/seed0"),
    (lambda p: p.budget_curve_dirs("digits-c")[-1], "runs/budget/digits-c/cifar_resnet20/fbs-b0.55/e16/seed2"),
    (lambda p: p.seed_runs("digits-c", "cifar_resnet20")[0], "runs/{dataset}/{backbone}/manidp-b0.4/seed{seed}"),
])
def test_plan_folders_keep_their_names(plan, folder, expected):
    assert folder(plan) == expected


@pytest.mark.parametrize("rid, expected", [
    (RunId("digits-c", "cifar_resnet20", "dense", "dense", None, 0), "runs/digits-c/cifar_resnet20/dense/seed0"),
    (RunId("digits-c", "cifar_resnet20", "l1", "l1", 0.4, 1), "runs/digits-c/cifar_resnet20/l1-b0.4/seed1"),
    (METHOD_RUN, "runs/digits-c/cifar_resnet20/manidp_eta0-b0.55/seed2"),
])
def test_folder_is_the_plans_run_dir_and_the_engines_default(rid, expected):
    """An entry that runs another method is named by the entry, as the plan names it."""
    assert rid.folder() == expected == run_dir(rid.dataset, rid.backbone, rid.entry, rid.budget, rid.seed)
    cfg = resolve(flags={"method": rid.method, "budget": rid.budget, "seed": rid.seed, "entry": rid.entry})
    assert str(default_out_dir(cfg)) == expected


def test_the_entry_names_a_run_without_changing_its_hash():
    """The hash of a run trained before the entry key existed stays what it was."""
    cfg = resolve(flags={"method": "manidp", "budget": 0.55})
    named = resolve(flags={"method": "manidp", "budget": 0.55, "entry": "manidp_eta0"})
    assert config_hash(named) == config_hash(cfg) == config_hash({k: v for k, v in cfg.items() if k != "entry"})


def test_only_an_entry_that_runs_another_method_passes_its_name(plan):
    """An entry named after its method keeps the arguments it always had (Snakemake re-runs a job whose
    params change); one that runs another method tells manidp train its name."""
    assert not any("entry=" in arg for arg in plan.method_args("digits-c", "manidp"))
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg["datasets"]["digits-c"]["methods"]["manidp_eta0"] = {"method": "manidp", "options": {"eta": 0.0}}
    args = Plan(cfg).method_args("digits-c", "manidp_eta0")
    assert args[:2] == ["--method", "manidp"] and "entry=\"manidp_eta0\"" in " ".join(args)


def test_metrics_json_records_the_run_id(dense_run, data_cache, tmp_path):
    dense = json.loads((dense_run / "metrics.json").read_text())
    assert RunId.from_dict(dense["run_id"]) == RunId("digits-c", "cifar_resnet20", "dense", "dense", None, 0,
                                                     config_hash(dense["config"]))
    from manidp.engine import train

    out = train(small_run_config(tmp_path / "any-name", data_cache, method="l1", budget=0.4, entry="l1_renamed",
                                 init_from=str(dense_run),
                                 **{"train.epochs": 1, "data.max_train": 128, "data.max_eval": 128}))
    metrics = json.loads((out / "metrics.json").read_text())
    assert RunId.from_dict(metrics["run_id"]) == RunId("digits-c", "cifar_resnet20", "l1_renamed", "l1", 0.4, 0,
                                                       config_hash(metrics["config"]))
    row = reporting.load_runs([dense_run, out]).set_index("method").loc["l1_renamed"]
    assert row["registered_method"] == "l1"


def _without_folders(table):
    return table.drop(columns=[c for c in ("run_dir", "runs") if c in table]).reset_index(drop=True)


@pytest.mark.parametrize("recorded", [True, False], ids=["run_id", "before-run_id"])
def test_renamed_folders_give_the_same_table(tmp_path, recorded):
    """Nothing parses folder names: run folders moved to arbitrary names make the same table."""
    runs = []
    for seed in (0, 1):
        runs.append(make_run(tmp_path, "digits-c", "cifar_resnet20", "dense", seed, 85.0 + seed))
        for entry, method, top1 in [("l1", "l1", 80.0), ("manidp_eta0", "manidp", 83.0)]:
            rid = RunId("digits-c", "cifar_resnet20", entry, method, 0.4, seed)
            extra = {"run_id": rid.to_dict()} if recorded else {}
            run = make_run(tmp_path / entry, "digits-c", "cifar_resnet20", method, seed, top1 + seed, budget=0.4,
                           reduction=0.4, extra=extra)
            runs.append(run)  # in make_run's folder, named after the method whatever the entry
    renamed = []
    for i, run in enumerate(runs):
        renamed.append(tmp_path / "moved" / f"folder {i}")
        shutil.copytree(run, renamed[-1])
    before = reporting.build_table(reporting.load_runs(runs))
    after = reporting.build_table(reporting.load_runs(renamed))
    assert sorted(before["method"]) == (["dense", "l1", "manidp_eta0"] if recorded else ["dense", "l1", "manidp"])
    assert _without_folders(after).equals(_without_folders(before))
