"""MLflow tracking: one run per result identity, the sqlite store under parallel first use, a real
`mlflow server`, an unreachable store (marker, import, summary), runs that die, the summary run."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import free_port, manidp_cli, small_run_config
from manidp import tracking
from manidp import engine
from manidp.engine import TrainingDiverged
from manidp.errors import UserError
from manidp.tracking import PENDING_FILE, import_run, init_store, log_summary, workflow
from manidp.tracking import store as tracking_store


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _runs(uri: str, experiment: str = "digits-c"):
    """The experiment's active runs (deleted, i.e. replaced, runs are not counted)."""
    client = _client(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    return [m.step for m in sorted(_client(uri).get_metric_history(run_id, key), key=lambda m: m.timestamp)]


def train(cfg: dict):
    """Train as ``manidp train`` does: with the MLflow observer."""
    return engine.train(cfg, tracking.MlflowObserver())


def _tracked(out, cache, uri, **overrides) -> dict:
    """A one-epoch run on a few images, tracked to ``uri``."""
    return small_run_config(out, cache, **{"train.epochs": 1, "train.batch_size": 32, "data.max_train": 64,
                                           "data.max_eval": 32, "tracking.enabled": True, "tracking.uri": uri,
                                           **overrides})


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """One migrated sqlite store; tests copy it (creating a store runs MLflow's migrations, seconds each)."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    init_store(f"sqlite:///{path}")
    return path


@pytest.fixture
def store(tmp_path, store_template) -> str:
    shutil.copy(store_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_sqlite_store_receives_params_metrics_and_tags(tmp_path, data_cache, store):
    uri = init_store(store, ("digits-c",))
    train(_tracked(tmp_path / "run", data_cache, uri, **{"train.epochs": 2}))
    (run,) = _runs(uri, "digits-c")
    assert run.data.params["train.epochs"] == "2" and run.data.params["method"] == "dense"
    assert {"test_top1", "macs", "train_loss", "val_top1"} <= set(run.data.metrics)
    assert run.data.tags["backbone"] == "cifar_resnet20" and run.data.tags["seed"] == "0"
    assert run.data.tags["manidp.identity"].startswith("digits-c/cifar_resnet20/dense/bnone/seed0/")
    assert run.data.tags["version.torch"] and run.data.tags["version.manidp"]
    if (Path(tracking.__file__).parents[2] / ".git").exists():
        assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    experiment = _client(uri).get_experiment_by_name("digits-c")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # Histories read forward: per-epoch values at steps 0, 1, the final value after them.
    assert _steps(uri, run.info.run_id, "val_top1") == [0, 1, 2]
    assert _steps(uri, run.info.run_id, "test_top1") == [2]


def test_a_run_reads_in_the_ui_name_constants_datasets_model_source(tmp_path, data_cache, dense_run, store,
                                                                     recwarn):
    """What a newcomer sees: method-first names, constants as params (no one-point charts of them), the
    splits as dataset inputs, the trained model in Logged models, a source, and how to compare methods."""
    uri = init_store(store, ("digits-c",))
    train(_tracked(tmp_path / "run", data_cache, uri, method="manidp", budget=0.5, init_from=str(dense_run)))
    # the gates' per-call state (masks, saliencies) set during torch.export is no news to the reader of a log
    assert not [w for w in recwarn if "assigned during export" in str(w.message)]
    (run,) = _runs(uri, "digits-c")
    assert run.info.run_name == "manidp b0.5 s0"
    assert not set(tracking.CONSTANTS) & set(run.data.metrics)
    assert run.data.params["final.epochs_trained"] == "1" and "final.macs_dense" in run.data.params
    inputs = {(i.dataset.name, i.tags[0].value) for i in run.inputs.dataset_inputs}
    assert inputs == {("digits-c/train", "training"), ("digits-c/val", "validation"), ("digits-c/test", "testing")}
    client = _client(uri)
    experiment = client.get_experiment_by_name("digits-c")
    (model,) = client.search_logged_models([experiment.experiment_id])
    assert model.source_run_id == run.info.run_id and run.data.tags["manidp.model_format"].startswith("pt2")
    assert run.data.tags["mlflow.source.name"] == "manidp train"
    assert "tags.budget" in experiment.tags["mlflow.note.content"]
    assert tracking.parent_run("digits-c", "cifar_resnet20", uri) in {
        r.info.run_id for r in _runs(uri) if r.info.run_name == "digits-c / cifar_resnet20"}


def test_log_model_switch_skips_the_model(tmp_path, data_cache, store):
    uri = init_store(store, ("digits-c",))
    train(_tracked(tmp_path / "run", data_cache, uri, **{"tracking.log_model": False}))
    client = _client(uri)
    assert not client.search_logged_models([client.get_experiment_by_name("digits-c").experiment_id])


def test_summary_metrics_name_every_row_of_a_per_seed_table():
    """Keyed without the seed, three seeds' rows would share one name and the last would win."""
    per_seed = pd.DataFrame({"backbone": ["cifar_resnet20"] * 3, "method": ["dense"] * 3, "budget": [None] * 3,
                             "seed": [0, 1, 2], "top1_err": [12.3, 12.26, 12.222]})
    metrics = workflow._table_metrics(per_seed)
    assert metrics == {"cifar_resnet20/dense/s0/top1_err": 12.3, "cifar_resnet20/dense/s1/top1_err": 12.26,
                       "cifar_resnet20/dense/s2/top1_err": 12.222}
    ambiguous = per_seed.drop(columns="seed")
    assert workflow._table_metrics(ambiguous) == {}  # rows it cannot tell apart get no metrics at all


def _parallel_train(out, cache, uri, seed: int) -> list[str]:
    return manidp_cli("train", "--out", str(out), "--seed", str(seed), "--epochs", "1", "--threads", "1",
                      "--set", "train.batch_size=32", "--set", "data.max_train=64", "--set", "data.max_eval=32",
                      "--set", f"data.cache_dir={cache}", "--set", "runtime.progress=log",
                      "--set", f"tracking.uri={uri}")


def test_parallel_first_use_of_a_fresh_store_records_every_run(tmp_path, data_cache):
    """Three runs start at once on a store nobody created: each is recorded, and MLflow prints no INFO lines."""
    from manidp.data import build_dataset

    build_dataset("digits-c", {"cache_dir": str(data_cache)})  # the runs share a ready data cache
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    outs = [tmp_path / f"seed{seed}" for seed in range(3)]
    procs = [subprocess.Popen(_parallel_train(out, data_cache, uri, seed), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed, out in enumerate(outs)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr[-3000:]
        assert "INFO" not in stderr and "NOT in the MLflow store" not in stderr, stderr[-3000:]
    runs = _runs(uri)
    assert sorted(r.data.tags["seed"] for r in runs) == ["0", "1", "2"]
    assert all(r.info.status == "FINISHED" and "test_top1" in r.data.metrics for r in runs)
    assert not any((out / PENDING_FILE).exists() for out in outs)


def test_import_twice_leaves_one_run(dense_run, store):
    uri = store
    first = import_run(dense_run, uri)
    second = import_run(dense_run, uri)
    (run,) = _runs(uri)
    assert run.info.run_id == second and run.info.status == "FINISHED"
    assert first != second and _client(uri).get_run(first).info.lifecycle_stage == "deleted"
    epochs = len((dense_run / "history.jsonl").read_text().splitlines())
    assert _steps(uri, second, "train_loss") == list(range(epochs))  # one history, not two
    assert _steps(uri, second, "val_top1") == list(range(epochs + 1))


def test_restarted_run_replaces_a_stale_run_with_a_clean_history(tmp_path, data_cache, store):
    """A result trained again from scratch (its folder gone) keeps one run; a run left RUNNING is closed as KILLED."""
    uri = store
    out = tmp_path / "run"
    train(_tracked(out, data_cache, uri))
    (old,) = _runs(uri)
    _client(uri).update_run(old.info.run_id, status="RUNNING")  # as a kill -9 leaves it
    shutil.rmtree(out)  # what the workflow does to a job that has no checkpoint
    train(_tracked(out, data_cache, uri))
    (new,) = _runs(uri)
    assert new.info.run_id != old.info.run_id and new.info.status == "FINISHED"
    stale = _client(uri).get_run(old.info.run_id)
    assert stale.info.status == "KILLED" and stale.info.lifecycle_stage == "deleted"
    assert new.data.tags["run_dir"] == old.data.tags["run_dir"]  # found by its folder (a new folder, a new id)
    assert _steps(uri, new.info.run_id, "train_loss") == [0]


def test_identity_is_the_result_not_where_or_how_it_ran(tmp_path, data_cache):
    from manidp.tracking import identity_tags

    base = small_run_config(tmp_path / "a", data_cache)
    same = small_run_config(tmp_path / "b", data_cache, **{"runtime.threads": 1, "tracking.enabled": True})
    assert identity_tags(same, "r1") == identity_tags(base, "r1")
    for key, value in {"train.lr": 0.05, "seed": 1, "data.max_train": 256}.items():
        changed = small_run_config(tmp_path / "a", data_cache, **{key: value})
        assert identity_tags(changed, "r1") != identity_tags(base, "r1")
    assert identity_tags(base, "r2") != identity_tags(base, "r1")  # another folder is another result


def test_runs_that_die_are_marked_failed_or_killed(tmp_path, data_cache, store, monkeypatch):
    uri = store
    with pytest.raises(TrainingDiverged):
        train(_tracked(tmp_path / "nan", data_cache, uri, **{"train.lr": 1e30}))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_tracked(tmp_path / "interrupted", data_cache, uri, seed=1))
    status = {r.data.tags["seed"]: r.info.status for r in _runs(uri)}
    assert status == {"0": "FAILED", "1": "KILLED"}


def test_sigterm_closes_the_run_as_killed(tmp_path, data_cache, store):
    out = tmp_path / "run"
    command = manidp_cli("train", "--out", str(out), "--epochs", "50", "--threads", "1", "--set",
                         "train.batch_size=32", "--set", "data.max_train=64", "--set", "data.max_eval=32",
                         "--set", f"data.cache_dir={data_cache}", "--set", f"tracking.uri={store}")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (out / "tracking.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.terminate()  # SIGTERM, as Slurm or snakemake send before killing
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + 15 and "Traceback" not in stderr, stderr[-2000:]
    (run,) = _runs(store)
    assert run.info.status == "KILLED"


def test_locked_database_is_retried_not_given_up(monkeypatch):
    monkeypatch.setattr(tracking_store, "RETRY_DELAYS", (0.01,) * 4)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "logged"

    assert tracking_store._retry(flaky) == "logged" and len(calls) == 3

    def broken():
        calls.append(1)
        raise RuntimeError("no such table: runs")

    calls.clear()
    with pytest.raises(RuntimeError, match="no such table"):
        tracking_store._retry(broken)
    assert len(calls) == 1  # other errors are not retried


@pytest.fixture
def mlflow_server(mlflow_server_process) -> str:
    return mlflow_server_process[0]


def test_real_mlflow_server_receives_a_run(tmp_path, data_cache, mlflow_server):
    train(_tracked(tmp_path / "run", data_cache, mlflow_server))  # what reaches the server, not what it learns
    (run,) = _runs(mlflow_server, "digits-c")
    assert run.data.params["dataset"] == "digits-c"
    assert run.data.metrics["test_top1"] == pytest.approx(
        json.loads((tmp_path / "run" / "metrics.json").read_text())["test_top1"])


def test_unreachable_store_leaves_a_marker_that_import_and_summary_pick_up(tmp_path, data_cache, store):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.warns(UserWarning, match="NOT in the MLflow store.*manidp tracking import"):
        first = train(_tracked(tmp_path / "run0", data_cache, dead))
    assert (first / "metrics.json").is_file() and (first / "model.pt").is_file()
    assert dead in (first / PENDING_FILE).read_text()
    # A second result left pending the same way: the same files under another seed.
    second = tmp_path / "run1"
    shutil.copytree(first, second)
    cfg = yaml.safe_load((second / "config.yaml").read_text())
    (second / "config.yaml").write_text(yaml.safe_dump({**cfg, "seed": 1, "out": str(second)}))
    import_run(first, store)  # by hand
    assert not (first / PENDING_FILE).exists()
    log_summary("digits-c", [], {}, store, run_dirs=[first, second])  # the workflow's summary imports the other
    assert not (second / PENDING_FILE).exists()
    assert sorted(r.data.tags["seed"] for r in _runs(store) if "seed" in r.data.tags) == ["0", "1"]


def _table(path: Path) -> Path:
    pd.DataFrame({"backbone": ["cifar_resnet20", "cifar_resnet20", "cifar_resnet20"],
                  "method": ["dense", "l1", "l1"], "budget_pct": [None, 40, 40],
                  "source": ["ours", "ours", "reported"], "top1_err": [10.0, 12.5, 11.0],
                  "macs_reduction_pct": [0.0, 40.2, 40.0], "notes": ["", "", "paper"]}).to_csv(path, index=False)
    return path


def test_summary_run_logs_the_table_and_fails_on_missing_runs(tmp_path, dense_run, store):
    uri = store
    table = _table(tmp_path / "digits-c_table.csv")
    with pytest.raises(UserError, match=r"1 of 1 runs are not in the MLflow store.*manidp tracking import"):
        log_summary("digits-c", [table], {}, uri, run_dirs=[dense_run])
    run_id = import_run(dense_run, uri)
    summary = log_summary("digits-c", [table], {str(dense_run): {"speedup_cpu-1t": 1.25}}, uri,
                          run_dirs=[dense_run])
    assert log_summary("digits-c", [table], {str(dense_run): {"speedup_cpu-1t": 1.25}}, uri,
                       run_dirs=[dense_run]) == summary
    client = _client(uri)
    metrics = client.get_run(summary).data.metrics
    assert metrics["cifar_resnet20/l1/b40/top1_err"] == 12.5 and metrics["cifar_resnet20/dense/top1_err"] == 10.0
    assert not any("reported" in k or k.endswith("notes") for k in metrics)  # our rows and numbers only
    assert {a.path for a in client.list_artifacts(summary)} == {"digits-c_table.csv", "digits-c_table.json"}
    assert client.get_run(run_id).data.metrics["speedup_cpu-1t"] == 1.25
    assert len(client.get_metric_history(run_id, "speedup_cpu-1t")) == 1  # a re-run summary adds no point
    roles = sorted(r.data.tags.get("role", "result") for r in _runs(uri))
    assert roles == ["result", "summary"]


@pytest.mark.parametrize("user_choice", [None, "false"])
def test_mlflow_telemetry_is_off_unless_the_user_turned_it_on(tmp_path, user_choice):
    """A run sends nothing anywhere by default; MLFLOW_DISABLE_TELEMETRY=false (the user's choice) is kept."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    if user_choice is not None:
        env["MLFLOW_DISABLE_TELEMETRY"] = user_choice
    code = ("import os\nfrom manidp.tracking.store import _client\n"
            f"_client('sqlite:///{tmp_path / 'mlflow.db'}')\n"
            "print(os.environ['MLFLOW_DISABLE_TELEMETRY'])\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == (user_choice or "true")
