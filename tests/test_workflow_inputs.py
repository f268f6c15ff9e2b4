"""What the workflow reads from files it did not just write: the parent run marker, the data, the Slurm profile.

Each test runs the real ``snakemake`` on the tiny config (.test/config/config.yaml) in a temporary working
directory, and stops before any training: nothing here trains a model or downloads anything.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "workflow" / "Snakefile"
TINY_CONFIG = ROOT / ".test" / "config" / "config.yaml"
PARENT = "results/tracking/digits-c/cifar_resnet20/parent_run.txt"
DENSE = "runs/digits-c/cifar_resnet20/dense/seed0"
RUN_ID = "0123456789abcdef0123456789abcdef"


def _workdir(tmp_path: Path, config: dict | None = None) -> Path:
    (tmp_path / "config").mkdir()
    config = config or yaml.safe_load(TINY_CONFIG.read_text())
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def snakemake(workdir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
               "--cores", "1", *args]
    environ = {k: v for k, v in os.environ.items() if k not in ("MANIDP_IMAGENET", "MLFLOW_TRACKING_URI")}
    environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", "")])
    environ.update(env or {})
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environ, cwd=workdir)


def _with_parent(tmp_path: Path, content: str, config: dict | None = None) -> Path:
    """A working directory whose store and parent marker exist, so a training job is the next to run."""
    workdir = _workdir(tmp_path, config)
    (workdir / "results" / "tracking").mkdir(parents=True)
    (workdir / "results" / "tracking" / "store.txt").write_text("sqlite:///results/mlflow.db\n")
    (workdir / PARENT).parent.mkdir(parents=True)
    (workdir / PARENT).write_text(content)
    return workdir


@pytest.mark.parametrize("log_model", [True, False])
def test_parent_run_id_reaches_training_as_one_flag(tmp_path, log_model):
    """The parent's id, and tracking.log_model: false (the tiny config's) as its own flag; true adds none."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["tracking"]["log_model"] = log_model
    workdir = _with_parent(tmp_path, RUN_ID + "\n", config)
    result = snakemake(workdir, f"{DENSE}/metrics.json", "-n", "-p")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    command = result.stdout.split("Shell command:", 1)[1]
    flags = f"--set tracking.parent_run_id={RUN_ID}" + ("" if log_model else " --set tracking.log_model=false")
    assert f"{flags} >" in command, command
    assert "$(" not in command and "parent_run.txt" not in command


def test_tampered_parent_marker_cannot_add_arguments(tmp_path):
    """The id used to be pasted unquoted into the shell: `ID --help` made the job run `manidp train ... --help`."""
    workdir = _with_parent(tmp_path, RUN_ID + " --help\n")
    result = snakemake(workdir, f"{DENSE}/metrics.json")
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert PARENT in message and "should hold the MLflow run id" in message, message[-3000:]
    log = workdir / "results" / "logs" / "digits-c" / "cifar_resnet20" / "dense" / "seed0" / "train.log"
    assert not log.exists() or "usage:" not in log.read_text()
    assert not (workdir / "runs").exists()


def test_slurm_profile_keeps_every_job_log():
    """The README sends Slurm logs to results/logs/slurm; the plugin deletes successful jobs' logs by default."""
    import dataclasses

    from snakemake_executor_plugin_slurm import ExecutorSettings

    profile = yaml.safe_load((ROOT / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["slurm-logdir"] == "results/logs/slurm"
    assert profile["slurm-keep-successful-logs"] is True
    assert profile["slurm-delete-logfiles-older-than"] <= 0
    # Every slurm-* key is an option of the installed plugin (a misspelt one would be ignored or refused).
    options = {f"slurm-{field.name.replace('_', '-')}" for field in dataclasses.fields(ExecutorSettings)}
    assert {key for key in profile if key.startswith("slurm-")} <= options


def _mlflow_runs(workdir: Path) -> int:
    import sqlite3

    store = workdir / "results" / "mlflow.db"
    if not store.exists():
        return 0
    with sqlite3.connect(store) as db:
        tables = {name for (name,) in db.execute("select name from sqlite_master where type = 'table'")}
        return db.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else 0


def test_cifar_without_data_or_network_stops_before_any_job(tmp_path):
    """It used to create the MLflow parent run and start training jobs that each failed ("cifar10 not found")."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["datasets"]["cifar10"] = {**config["datasets"]["digits-c"],
                                     "data": {"root": "nodata", "download": True, "max_train": 64, "max_eval": 32}}
    workdir = _workdir(tmp_path, config)
    # Downloading is on, but every connection is refused at once: no network, and none is tried.
    offline = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": "",
               "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    result = snakemake(workdir, "results/cifar10_table.csv", env=offline)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert message.count("downloading cifar10 into datasets.cifar10.data.root = 'nodata' failed") == 1, message[-3000:]
    assert "rule check_data" in message and "rule train_dense" not in message, message[-3000:]
    assert not (workdir / "runs").exists() and not (workdir / "results" / "tracking" / "cifar10").exists()
    assert _mlflow_runs(workdir) == 0
