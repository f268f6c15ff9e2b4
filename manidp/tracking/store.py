"""The MLflow store: where it is, opening it safely from parallel jobs, and its experiments.

Default store: ``sqlite:///results/mlflow.db`` (relative to the working
directory). ``MLFLOW_TRACKING_URI`` wins over the config key ``tracking.uri``,
so a cluster can log to an ``mlflow server`` over HTTP. A sqlite store is
created or migrated under a file lock (``mlflow.db.lock`` beside it), so
parallel jobs may open a fresh store; "database is locked" is retried with
backoff. A dead HTTP server is noticed at once, and MLflow's own HTTP retries
are bounded, because a run that cannot log finishes anyway and is imported
later.
"""
from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Optional

from manidp.errors import UserError

__all__ = ["resolve_uri", "init_store", "connect", "experiment_id", "store_error", "short", "EXPERIMENT_TAGS",
           "HTTP_RETRY_DEFAULTS", "RETRY_DELAYS"]

DEFAULT_DB = Path("results") / "mlflow.db"
#: How to read the experiment, shown on its page in the UI (``mlflow.note.content``).
EXPERIMENT_NOTE = """\
**Compare the methods at one budget:** type `tags.budget = '0.55'` in the search box of the runs table,
group by `tags.method` (Group by > Tags > method), and add the columns `test_top1`, `test_top5`,
`macs_reduction`, `macs` and, where measured, `speedup_cpu-2t` (Columns > Metrics). Dense runs carry
`tags.budget = 'None'`.

One run per result (a method at a MACs budget and seed), listed under a parent run per backbone
(`dataset / backbone`): click the + beside the parent to see its runs. The summary run holds the tables
and plots. Each run page lists its model (Logged models) and the dataset splits it used (Datasets). The
numbers are mirrored from the run folders (`metrics.json`), which stay the source of truth."""
#: The model-training kind, and the note above.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development", "mlflow.note.content": EXPERIMENT_NOTE}
#: Seconds between attempts while sqlite reports "database is locked" (about a minute in all).
RETRY_DELAYS = (0.25, 0.5, 1, 2, 4, 8, 16, 30)


def resolve_uri(config_uri: Optional[str] = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config_uri
    if uri:
        return uri
    return f"sqlite:///{DEFAULT_DB.resolve()}"


def _quiet_mlflow() -> None:
    """Keep MLflow's INFO lines (table creation, migrations) out of the tool's stderr, and its usage
    telemetry off unless the user turned it on (``MLFLOW_DISABLE_TELEMETRY=false``): a benchmark's runs
    should send nothing anywhere, and the telemetry client adds CPU time to every training job
    (results/README, where the time goes)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow  # noqa: F401  (configures its loggers on import; the levels below come after)

    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail fast on a dead HTTP server (MLflow's own retries take minutes)."""
    from urllib.parse import urlparse
    import socket

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    with socket.create_connection((parsed.hostname, port), timeout=timeout):
        pass


def _is_locked(err: Exception) -> bool:
    return "database is locked" in str(err) or "database table is locked" in str(err)


def _retry(call, *args, **kwargs):
    """``call`` again, with growing jittered pauses, while sqlite says the database is locked."""
    for delay in RETRY_DELAYS:
        try:
            return call(*args, **kwargs)
        except Exception as err:
            if not _is_locked(err):
                raise
            time.sleep(delay * random.uniform(1.0, 1.5))
    return call(*args, **kwargs)


class _RetryingClient:
    """An ``MlflowClient`` whose every call is retried while the database is locked."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: _retry(attr, *args, **kwargs)


#: MLflow's own HTTP retries (7, with exponential backoff, 120 s timeouts) stall a training run for minutes
#: when its server dies; a run that cannot log finishes anyway and is imported later, so a few seconds of
#: retrying is enough. A user's own setting of these variables wins.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _client(uri: str) -> _RetryingClient:
    """A client of the store at ``uri`` (every call retried while sqlite is locked), the schema created first."""
    _quiet_mlflow()
    if uri.startswith(("http://", "https://")):
        for name, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(name, value)
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///"):
        return _RetryingClient(MlflowClient(tracking_uri=uri))
    from filelock import FileLock

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    # MLflow creates or migrates the schema when a process first opens the store;
    # two processes doing it at once corrupt it ("duplicate column name").
    with FileLock(f"{db}.lock", timeout=600):
        client = MlflowClient(tracking_uri=uri)
        _retry(client.search_experiments, max_results=1)
    return _RetryingClient(client)


def connect(uri: str) -> _RetryingClient:
    """:func:`_client`, after failing fast on a dead HTTP server."""
    _check_reachable(uri)
    return _client(uri)


def store_error(uri: str, err: Exception) -> UserError:
    return UserError(f"cannot use the MLflow store at {uri}: {type(err).__name__}: {short(err)}")


def short(err: Exception, limit: int = 300) -> str:
    return " ".join(str(err).split())[:limit]


def init_store(uri: Optional[str] = None, experiments: tuple[str, ...] = ()) -> str:
    """Create the store (and experiments) once; safe to call again, and from parallel jobs."""
    uri = resolve_uri(uri)
    try:
        client = connect(uri)
        for name in experiments:
            experiment_id(client, name)
    except Exception as err:
        raise store_error(uri, err) from None
    return uri


def experiment_id(client, name: str) -> str:
    """The experiment ``name``, created (or tagged) as a model-training experiment."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags=EXPERIMENT_TAGS)
        except Exception:  # created by a concurrent job in between
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    for key, value in EXPERIMENT_TAGS.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id
