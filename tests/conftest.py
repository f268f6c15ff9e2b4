"""Shared fixtures: a small digits-c config and a trained dense run reused across tests."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


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
