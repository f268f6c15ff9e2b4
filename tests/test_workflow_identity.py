"""One MLflow run per result, through a hard kill of the whole workflow.

The tiny workflow (.test/config/config.yaml) is killed with SIGKILL to its
process group while the method's fine-tune has opened its MLflow run, then run
again to the end, as a user would after a crash. Afterwards every result
identity (dataset, backbone, method, budget, seed, config hash) has exactly one
FINISHED run, nothing is left RUNNING, and the summary found every run. The
config writes the fine-tune's learning rate as ``1e-2`` (YAML 1.2), which the
workflow's schema check and the training command must both read as a number.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "workflow" / "Snakefile"
TINY_CONFIG = ROOT / ".test" / "config" / "config.yaml"
METHOD_RUN = "runs/digits-c/cifar_resnet20/l1-b0.4/seed0"


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MANIDP_IMAGENET", "MLFLOW_TRACKING_URI")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MANIDP_CACHE"] = str(tmp_path / "digits-cache")
    return env


def _snakemake(workdir: Path, *args: str) -> list[str]:
    # Without the default profile, so no HTML report (the tiny workflow test checks it; this one is about
    # runs); --rerun-incomplete is the one profile setting a re-run after a kill needs.
    return [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
            "--cores", "2", "--workflow-profile", "none", "--rerun-incomplete", *args]


@pytest.mark.slow
def test_killed_workflow_leaves_one_finished_run_per_result(tmp_path):
    from mlflow.tracking import MlflowClient

    workdir = tmp_path / "work"
    (workdir / "config").mkdir(parents=True)
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["datasets"]["digits-c"]["finetune"]["train"].update(epochs=3, lr=0.01)
    text = yaml.safe_dump(config)
    assert "lr: 0.01" in text
    (workdir / "config" / "config.yaml").write_text(text.replace("lr: 0.01", "lr: 1e-2"))
    env = _env(tmp_path)

    first = subprocess.Popen(_snakemake(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env, cwd=workdir, start_new_session=True)
    marker = workdir / METHOD_RUN / "tracking.json"  # written once the fine-tune's MLflow run is open
    deadline = time.time() + 400
    while not marker.exists():
        assert first.poll() is None, f"snakemake ended first:\n{first.stdout.read()[-4000:]}"
        assert time.time() < deadline, "the fine-tune never opened its MLflow run"
        time.sleep(0.05)
    killed_run = json.loads(marker.read_text())["run_id"]
    descendants = psutil.Process(first.pid).children(recursive=True)
    os.killpg(first.pid, signal.SIGKILL)  # kill -9 of the process group, as a crash or an impatient user would
    for process in descendants:  # and any job that left the group
        if process.is_running():
            process.kill()
    first.wait(timeout=60)
    resumed = (workdir / METHOD_RUN / "checkpoint.pt").exists()
    assert not (workdir / METHOD_RUN / "metrics.json").exists(), "the fine-tune finished before the kill"

    subprocess.run(_snakemake(workdir, "--unlock"), check=True, capture_output=True, env=env, cwd=workdir)
    again = subprocess.run(_snakemake(workdir), capture_output=True, text=True, env=env, cwd=workdir, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-6000:]

    client = MlflowClient(f"sqlite:///{workdir / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits-c")
    runs = client.search_runs([experiment.experiment_id])
    by_identity = collections.Counter(r.data.tags["manidp.identity"] for r in runs if "manidp.identity" in r.data.tags)
    assert sorted(key.split("/")[2] for key in by_identity) == ["dense", "l1"], by_identity
    assert set(by_identity.values()) == {1}, by_identity
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.data.tags, r.info.status) for r in runs]
    (method,) = [r for r in runs if r.data.tags.get("method") == "l1"]
    assert method.data.params["train.lr"] == "0.01" and "test_top1" in method.data.metrics
    killed = client.get_run(killed_run)
    if resumed:  # killed after its first checkpoint: the same run went on
        assert method.info.run_id == killed_run
    else:  # restarted from scratch: the killed run was closed and replaced
        assert killed.info.status == "KILLED" and killed.info.lifecycle_stage == "deleted"
    assert (workdir / "results/tracking/digits-c/summary_run.txt").read_text().strip()
    assert not list((workdir / "runs").rglob("tracking_pending.json"))
