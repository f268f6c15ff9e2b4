"""The training engine: outputs, resume after a kill, determinism, DDP, NaN stop."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import manidp_cli, small_run_config
from manidp.engine import TrainingDiverged, load_model, train

METRIC_FIELDS = {"test_top1", "test_top5", "val_top1", "macs", "macs_dense", "macs_reduction", "params",
                 "wall_time_s", "config", "seed", "versions", "method_info", "epochs_trained"}


def test_dense_run_writes_every_output(dense_run):
    metrics = json.loads((dense_run / "metrics.json").read_text())
    assert METRIC_FIELDS <= set(metrics)
    assert metrics["macs_reduction"] == 0 and metrics["macs"] == metrics["macs_dense"]
    assert metrics["test_top1"] > 30  # well above chance (10 %) after two short epochs
    history = [json.loads(line) for line in (dense_run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]
    instances = pd.read_csv(dense_run / "instances_test.csv")
    assert {"index", "label", "prediction", "loss", "macs", "severity"} <= set(instances.columns)
    assert len(instances) == metrics["test_instances"]
    assert yaml.safe_load((dense_run / "config.yaml").read_text())["method"] == "dense"


def test_rerunning_a_finished_run_does_nothing(dense_run, data_cache, capsys):
    before = (dense_run / "metrics.json").stat().st_mtime_ns
    train(small_run_config(dense_run, data_cache))
    assert "already finished" in capsys.readouterr().out
    assert (dense_run / "metrics.json").stat().st_mtime_ns == before


def test_saved_model_reloads_and_matches_metrics(dense_run):
    from manidp.engine import evaluate_run

    model, method, cfg, _ = load_model(dense_run)
    assert method.name == "dense" and not model.training
    summary = evaluate_run(dense_run, "test", out_file=dense_run.parent / "re-eval.csv")
    metrics = json.loads((dense_run / "metrics.json").read_text())
    assert summary["test_top1"] == pytest.approx(metrics["test_top1"])


def _train_command(out: Path, cache: Path, epochs: int) -> list[str]:
    return manidp_cli("train", "--out", str(out), "--epochs", str(epochs), "--threads", "1",
                      "--set", "train.batch_size=64", "--set", "data.max_train=512", "--set", "data.max_eval=128",
                      "--set", f"data.cache_dir={cache}", "--set", "runtime.progress=log",
                      "--set", f"tracking.uri=sqlite:///{out.parent / 'mlflow.db'}")


def test_killed_run_resumes_from_checkpoint_and_continues_its_mlflow_run(tmp_path, data_cache):
    from manidp.tracking import init_store

    init_store(f"sqlite:///{tmp_path / 'mlflow.db'}", ("digits-c",))  # what `manidp tracking init` does
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # The uninterrupted reference trains beside the run that gets killed (one thread each).
    beside = subprocess.Popen(_train_command(reference, data_cache, 3), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(_train_command(killed, data_cache, 3), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "killed before the end"
    assert beside.wait(timeout=300) == 0, beside.stderr.read()[-3000:]
    run_id = json.loads((killed / "tracking.json").read_text())["run_id"]

    result = subprocess.run(_train_command(killed, data_cache, 3), capture_output=True, text=True, check=True)
    assert "resuming after epoch" in result.stdout
    assert json.loads((killed / "tracking.json").read_text())["run_id"] == run_id
    history = [json.loads(line) for line in (killed / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    # CPU training is deterministic for a fixed seed, so resuming changes nothing.
    got = json.loads((killed / "metrics.json").read_text())
    want = json.loads((reference / "metrics.json").read_text())
    assert got["test_top1"] == pytest.approx(want["test_top1"])
    assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-5)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits-c").experiment_id])
    # One per result: the reference folder is another result (its own result id) and keeps its run;
    # resuming the killed folder continued its run instead of adding one.
    assert len(runs) == 2 and run_id in {r.info.run_id for r in runs}
    assert {r.info.status for r in runs} == {"FINISHED"}
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED" and "test_top1" in resumed.data.metrics


def test_corrupt_checkpoint_is_reported_not_traceback(tmp_path, data_cache, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"\x00garbage")
    import torch

    from manidp.cli import main

    threads = torch.get_num_threads()
    try:
        assert main(_train_command(out, data_cache, 1)[3:]) == 2  # the command's arguments, in this process
    finally:
        torch.set_num_threads(threads)
    stderr = capsys.readouterr().err
    assert "corrupt" in stderr and "Traceback" not in stderr


def test_nan_loss_stops_with_epoch_and_step(tmp_path, data_cache):
    cfg = small_run_config(tmp_path / "nan", data_cache, **{"train.lr": 1e30, "train.epochs": 2})
    with pytest.raises(TrainingDiverged, match=r"non-finite loss .* at epoch 1, step \d+"):
        train(cfg)


def test_a_sweep_records_a_divergence_instead_of_failing(tmp_path, data_cache):
    out = tmp_path / "nan"
    cfg = small_run_config(out, data_cache, **{"train.lr": 1e30, "train.epochs": 2})
    assert train(cfg, record_divergence=True) == out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["diverged_at"]["epoch"] == 1
    assert metrics["config"]["train"]["lr"] == 1e30 and "method_options" in metrics["config"]
    assert not (out / "model.pt").exists() and not (out / "checkpoint.pt").exists()
    # The CLI's flag reaches the engine: exit 0 and the same record.
    args = ["train", "--out", str(tmp_path / "cli"), "--epochs", "1", "--set", "train.lr=1e30",
            "--set", "train.batch_size=32", "--set", "data.max_train=128", "--set", "data.max_eval=64",
            "--set", f"data.cache_dir={data_cache}", "--set", "tracking.enabled=false",
            "--set", "runtime.progress=log"]
    run = lambda *a: subprocess.run(manidp_cli(*a), capture_output=True, text=True, timeout=300)  # noqa: E731
    assert run(*args, "--record-divergence").returncode == 0
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["status"] == "diverged"


def test_two_process_ddp_on_cpu_gives_the_same_metrics_shape(tmp_path, data_cache, dense_run):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "manidp", "train", "--out", str(out), "--epochs", "1", "--set", "train.batch_size=32",
           "--set", "data.max_train=256", "--set", "data.max_eval=128", "--set", f"data.cache_dir={data_cache}",
           "--set", "tracking.enabled=false", "--set", "runtime.progress=log"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ddp = json.loads((out / "metrics.json").read_text())
    single = json.loads((dense_run / "metrics.json").read_text())
    assert set(ddp) == set(single)
    # two processes split each epoch: 256 images / (2 x 32) = 4 steps each
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1


@pytest.mark.slow
def test_default_digits_c_recipe_meets_acceptance(tmp_path, data_cache):
    """Dense ResNet-20 with the default recipe: 80-95 % test accuracy, falling with severity."""
    from manidp.config import resolve

    cfg = resolve(flags={"out": str(tmp_path / "full"), "runtime.threads": 2, "data.cache_dir": str(data_cache),
                         "tracking.enabled": False, "runtime.progress": "log"})
    metrics = json.loads((train(cfg) / "metrics.json").read_text())
    assert 80 <= metrics["test_top1"] <= 95
    by_severity = [metrics["test_top1_by_severity"][str(s)] for s in range(5)]
    assert by_severity[0] > by_severity[2] > by_severity[4]


def test_validation_only_run_never_touches_the_test_split(tmp_path, data_cache, monkeypatch):
    """eval_splits: [val] (the recipe sweeps) must not build, read or report the test split."""
    import manidp.engine as engine

    real_build = engine.build_dataset

    class TestSplitRead(AssertionError):
        pass

    def build_without_test(*args, **kwargs):
        splits = real_build(*args, **kwargs)

        class Forbidden(torch.utils.data.Dataset):
            def __len__(self):
                raise TestSplitRead("the test split was touched")

            def __getitem__(self, index):
                raise TestSplitRead("the test split was read")

        splits.test = Forbidden()
        return splits

    import torch

    monkeypatch.setattr(engine, "build_dataset", build_without_test)
    out = train(small_run_config(tmp_path / "val-only", data_cache, eval_splits=["val"]))
    metrics = json.loads((out / "metrics.json").read_text())
    assert not [key for key in metrics if key.startswith("test")]
    assert metrics["val_top1"] > 20 and "val_macs_reduction" in metrics
    assert not (out / "instances_test.csv").exists() and (out / "instances_val.csv").is_file()


def test_spearman_equals_scipys_with_ties_and_is_undefined_on_a_constant_column():
    import numpy as np
    from scipy.stats import spearmanr

    from manidp.evaluation import spearman

    rng = np.random.default_rng(0)
    macs = rng.integers(0, 6, 200).astype(float)  # many ties, as a dynamic model's per-instance MACs have
    severity = macs + rng.normal(0, 2, 200)
    assert spearman(macs, severity) == pytest.approx(spearmanr(macs, severity).statistic, abs=1e-12)
    assert spearman(macs, -severity) == pytest.approx(spearmanr(macs, -severity).statistic, abs=1e-12)
    assert spearman(np.full(200, 3.0), severity) is None  # a static model's MACs
    assert spearman(macs[:2], severity[:2]) is None
