"""Nothing a file holds runs, nothing mixes, faults give one line (issue 17, items 1, 3 and 5).

Each test replays a probe's repro: a crafted pickle through every path that loads a file, two
processes on one run folder, two folders trained alike, an import of someone else's folder, a full
disk, SIGTERM, an MLflow server that dies mid-run.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import manidp_cli, small_run_config
from manidp import _files, tracking
from manidp.cli import main
from manidp import engine


class _RunsCode:
    """Unpickling this calls ``os.system`` (what a hostile ``model.pt`` would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_file(path: Path, marker: Path, **plain) -> Path:
    torch.save({**plain, "payload": _RunsCode(marker)}, path)
    return path


def _flags(cache: Path, out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--epochs", "1", "--threads", "1", "--set", "train.batch_size=32",
            "--set", "data.max_train=64", "--set", "data.max_eval=32", "--set", f"data.cache_dir={cache}",
            "--set", "tracking.enabled=false", "--set", "runtime.progress=log", *extra]


def _refused(capsys, argv: list[str], marker: Path, path: Path) -> None:
    """``manidp argv`` refuses ``path`` with one line and exit 2, and nothing in the file ran."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert not marker.exists(), "the pickle's code ran"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"refused to load {path}" in err and "not a plain state file" in err, err


def test_a_crafted_pickle_runs_through_no_loading_path(tmp_path, dense_run, data_cache, capsys):
    marker = tmp_path / "PWNED"
    evil = _evil_file(tmp_path / "evil.pt", marker, format="manidp-model-1")
    # manidp evaluate DIR and manidp latency DIR: a run folder whose model.pt is the crafted file.
    folder = tmp_path / "shared_run"
    shutil.copytree(dense_run, folder)
    shutil.copy(evil, folder / "model.pt")
    _refused(capsys, ["evaluate", str(folder)], marker, folder / "model.pt")
    _refused(capsys, ["latency", str(folder), "--device", "cpu", "--threads", "1",
                      "--out", str(tmp_path / "latency.json")], marker, folder / "model.pt")
    assert not (tmp_path / "latency.json").exists()
    # manidp train --init-from FILE and --set pretrained=FILE.
    _refused(capsys, ["train", *_flags(data_cache, tmp_path / "a", "--init-from", str(evil))], marker, evil)
    _refused(capsys, ["train", *_flags(data_cache, tmp_path / "b", "--set", f"pretrained={evil}")], marker, evil)
    # Resuming: an unfinished run folder whose checkpoint.pt is the crafted file.
    resumed = tmp_path / "resumed"
    assert main(["train", *_flags(data_cache, resumed)]) == 0
    capsys.readouterr()
    for name in ("model.pt", "metrics.json"):
        (resumed / name).unlink()
    _evil_file(resumed / "checkpoint.pt", marker, format="manidp-checkpoint-1")
    _refused(capsys, ["train", *_flags(data_cache, resumed)], marker, resumed / "checkpoint.pt")


def test_files_the_benchmark_writes_are_plain_data(dense_run):
    """Every file a run writes loads with the weights-only unpickler alone (no allow-listed types)."""
    for name in ("model.pt", "checkpoint.pt"):
        torch.load(dense_run / name, map_location="cpu", weights_only=True)


def test_a_second_process_on_a_busy_folder_is_refused_and_writes_nothing(tmp_path, data_cache):
    out = tmp_path / "mix"
    with _files.run_folder_lock(out):
        before = sorted(p.name for p in out.iterdir())
        done = subprocess.run(manidp_cli("train", *_flags(data_cache, out)), capture_output=True, text=True,
                              timeout=300)
        after = sorted(p.name for p in out.iterdir())
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"manidp train: error: {out} is in use by process {os.getpid()}; wait for it "
                                   "to finish, or choose another --out")
    assert after == before and "config.yaml" not in after


def test_the_folder_lock_is_released_when_its_holder_dies(tmp_path, data_cache):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom manidp._files import run_folder_lock\n"
                               f"with run_folder_lock({str(out)!r}):\n    print('held', flush=True)\n"
                               "    time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait(timeout=30)
    with _files.run_folder_lock(out):  # taken at once, no stale lock to clean up by hand
        pass


def _runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name("digits-c").experiment_id])


def train(cfg: dict):
    """Train as ``manidp train`` does: with the MLflow observer."""
    return engine.train(cfg, tracking.MlflowObserver())


def _tracked(out: Path, cache: Path, uri: str, **overrides) -> dict:
    return small_run_config(out, cache, **{"train.epochs": 1, "train.batch_size": 32, "data.max_train": 64,
                                           "data.max_eval": 32, "tracking.enabled": True, "tracking.uri": uri,
                                           **overrides})


def test_two_folders_trained_alike_are_two_results(tmp_path, data_cache):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name in ("ida", "idb"):
        train(_tracked(tmp_path / name, data_cache, uri))
    runs = _runs(uri)
    assert sorted(Path(r.data.tags["run_dir"]).name for r in runs) == ["ida", "idb"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags[tracking.IDENTITY_TAG] for r in runs}) == 2


def test_a_copied_folder_gets_its_own_result_id_and_a_moved_one_keeps_it(tmp_path):
    first = _files.result_id(tmp_path / "a")
    assert _files.result_id(tmp_path / "a") == first
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert _files.result_id(tmp_path / "copy") != first
    (tmp_path / "a").rename(tmp_path / "moved")
    assert _files.result_id(tmp_path / "moved") == first


def test_import_writes_to_this_process_store_never_the_folders(tmp_path, dense_run, monkeypatch):
    folder = tmp_path / "sent_to_me"
    shutil.copytree(dense_run, folder)
    named = tmp_path / "elsewhere" / "their.db"
    cfg_file = folder / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("enabled: false", "enabled: true")
                        .replace("uri: null", f"uri: sqlite:///{named}"))
    assert f"sqlite:///{named}" in cfg_file.read_text()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["tracking", "import", str(folder)]) == 0
    assert not named.parent.exists()
    assert len(_runs(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")) == 1


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_temp_file(tmp_path, data_cache, capsys,
                                                                          monkeypatch):
    out = tmp_path / "run"
    real_fsync, checkpoints = os.fsync, []

    def disk_full_at_the_second_checkpoint(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(f"checkpoint.pt.{os.getpid()}.tmp"):
            checkpoints.append(fd)
            if len(checkpoints) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(_files.os, "fsync", disk_full_at_the_second_checkpoint)
    assert main(["train", *_flags(data_cache, out, "--epochs", "2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"manidp train: error: no space left writing {out / 'checkpoint.pt'}"), err
    assert len(err.splitlines()) == 1
    assert not list(out.glob(".*.tmp"))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0  # the first epoch's, intact


def test_sigterm_says_how_to_resume(tmp_path, data_cache):
    out = tmp_path / "run"
    proc = subprocess.Popen(manidp_cli("train", *_flags(data_cache, out, "--epochs", "50")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (out / "history.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert err.strip() == "manidp: interrupted; re-run the same command to resume"


def test_a_dying_mlflow_server_costs_seconds_and_stays_out_of_training_time(tmp_path, data_cache,
                                                                         mlflow_server_process):
    uri, server = mlflow_server_process
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}  # our bounds apply
    proc = subprocess.Popen(manidp_cli("train", *_flags(data_cache, out, "--epochs", "8", "--set",
                                                       "tracking.enabled=true", "--set", f"tracking.uri={uri}")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 180
    while not (out / "history.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    os.killpg(server.pid, signal.SIGKILL)  # the server and its workers die at once
    killed = time.time()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert time.time() - killed < 60, "MLflow's retries stalled the run"
    metrics = json.loads((out / "metrics.json").read_text())
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 8 and (out / tracking.PENDING_FILE).is_file() and "NOT in the MLflow store" in err
    assert metrics["wall_time_s"] < sum(h["time_s"] for h in history) + 10


def test_http_stores_get_bounded_retries_unless_the_user_set_them(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    tracking._client("http://127.0.0.1:9")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == tracking.HTTP_RETRY_DEFAULTS[
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
