"""Shared fixtures: a small digits-c config and a trained dense run reused across tests."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _checkout_untouched():
    """The suite writes nothing into the checkout: MLflow puts a sqlite store's artifacts in ``mlruns/``
    under the working directory, so a test that opens a store while the checkout is the working directory
    would leave runs there (``mlruns/`` is the default run's own, and git ignores it: nothing else would
    notice). Every test gets its own working directory (:func:`_own_working_directory`); this checks it."""
    def listing() -> set:
        return {p.relative_to(ROOT) for p in (ROOT / "mlruns").rglob("*")} if (ROOT / "mlruns").is_dir() else set()

    before = listing()
    yield
    added = listing() - before
    assert not added, f"the suite wrote into the checkout's mlruns/: {sorted(map(str, added))[:5]}"


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path, monkeypatch):
    """Each test runs in its own empty folder, as a user runs the workflow in a project folder; paths
    into the checkout are absolute (ROOT)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One digits-c cache for the whole session, never the user's home."""
    path = tmp_path_factory.mktemp("data-cache")
    os.environ["MANIDP_CACHE"] = str(path)
    return path


def small_run_config(out: Path, cache: Path, **overrides) -> dict:
    """A resolved config for a fast digits-c run (a subset, few epochs, no tracking)."""
    from manidp.config import resolve

    flags = {"out": str(out), "train.epochs": 2, "train.batch_size": 64, "runtime.threads": 2,
             "data.max_train": 512, "data.max_eval": 256, "data.cache_dir": str(cache),
             "tracking.enabled": False, "runtime.progress": "log"}
    flags.update(overrides)
    return resolve(flags=flags)


@pytest.fixture(scope="session")
def dense_run(tmp_path_factory, data_cache) -> Path:
    """A short dense digits-c run, trained once per test session."""
    from manidp.engine import train

    out = tmp_path_factory.mktemp("dense") / "run"
    return train(small_run_config(out, data_cache))


def manidp_cli(*args: str) -> list[str]:
    """The ``manidp`` console command, run with this interpreter."""
    return [sys.executable, "-m", "manidp", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server_process(tmp_path):
    """A real ``mlflow server`` on a free local port: (its URI, its process)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # its workers: one group
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
    yield f"http://127.0.0.1:{port}", proc
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
