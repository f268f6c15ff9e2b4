"""MLflow tracking: the default sqlite store, a real `mlflow server`, an unreachable store."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from conftest import small_run_config
from manidp.engine import train
from manidp.tracking import import_run, init_store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_sqlite_store_receives_params_metrics_and_tags(tmp_path, data_cache):
    uri = init_store(f"sqlite:///{tmp_path / 'mlflow.db'}", ("digits-c",))
    cfg = small_run_config(tmp_path / "run", data_cache, **{"train.epochs": 1, "tracking.enabled": True,
                                                             "tracking.uri": uri})
    train(cfg)
    (run,) = _runs(uri, "digits-c")
    assert run.data.params["train.epochs"] == "1" and run.data.params["method"] == "dense"
    assert {"test_top1", "macs", "train_loss", "val_top1"} <= set(run.data.metrics)
    assert run.data.tags["backbone"] == "cifar_resnet20" and run.data.tags["seed"] == "0"


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start within 90 s")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def test_real_mlflow_server_receives_a_run(tmp_path, data_cache, mlflow_server):
    cfg = small_run_config(tmp_path / "run", data_cache, **{"train.epochs": 1, "tracking.enabled": True,
                                                             "tracking.uri": mlflow_server})
    train(cfg)
    (run,) = _runs(mlflow_server, "digits-c")
    assert run.data.params["dataset"] == "digits-c"
    assert run.data.metrics["test_top1"] == pytest.approx(
        json.loads((tmp_path / "run" / "metrics.json").read_text())["test_top1"])


def test_unreachable_store_still_finishes_and_can_be_reimported(tmp_path, data_cache):
    dead = f"http://127.0.0.1:{_free_port()}"
    cfg = small_run_config(tmp_path / "run", data_cache, **{"train.epochs": 1, "tracking.enabled": True,
                                                             "tracking.uri": dead})
    with pytest.warns(UserWarning, match="manidp tracking import"):
        out = train(cfg)
    assert (out / "metrics.json").is_file() and (out / "model.pt").is_file()
    uri = f"sqlite:///{tmp_path / 'later.db'}"
    init_store(uri)
    import_run(out, uri)
    (run,) = _runs(uri, "digits-c")
    assert "test_top1" in run.data.metrics
