"""MLflow tracking, secondary to the files every run writes.

The JSON/CSV files in a run folder are the source of truth. Tracking mirrors
them into MLflow: one experiment per dataset, one run per training job (params =
the resolved config, per-epoch and final metrics, the files as artifacts). If
the store is unreachable the run still finishes, warns once, and can be
re-imported later with ``manidp tracking import RUN_DIR``.

Default store: ``sqlite:///results/mlflow.db`` (relative to the working
directory). ``MLFLOW_TRACKING_URI`` wins over the config key ``tracking.uri``,
so a cluster can log to an ``mlflow server`` over HTTP. A fresh sqlite store
must be created once before parallel jobs open it (its schema migration races):
``manidp tracking init``.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from manidp.errors import UserError

__all__ = ["resolve_uri", "init_store", "RunTracker", "import_run", "flatten", "parent_run", "log_summary"]

DEFAULT_DB = Path("results") / "mlflow.db"
_STATE_FILE = "tracking.json"


def resolve_uri(config_uri: Optional[str] = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config_uri
    if uri:
        return uri
    return f"sqlite:///{DEFAULT_DB.resolve()}"


def _quiet_mlflow():
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


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


def _client(uri: str):
    _quiet_mlflow()
    _check_reachable(uri)
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def init_store(uri: Optional[str] = None, experiments: tuple[str, ...] = ()) -> str:
    """Create the store (and experiments) once; safe to call again."""
    uri = resolve_uri(uri)
    try:
        client = _client(uri)
        client.search_experiments(max_results=1)
        for name in experiments:
            _experiment_id(client, name)
    except Exception as err:
        raise UserError(f"cannot open the MLflow store at {uri}: {type(err).__name__}: {err}") from None
    return uri


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created by a concurrent job in between
        return client.get_experiment_by_name(name).experiment_id


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class RunTracker:
    """One MLflow run per run folder; re-running the folder continues the same run."""

    def __init__(self, run_dir: Path, cfg: dict, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.enabled = enabled and cfg["tracking"]["enabled"]
        self.client = None
        self.run_id: Optional[str] = None

    def _fail(self, what: str, err: Exception) -> None:
        warnings.warn(
            f"MLflow tracking disabled ({what}: {type(err).__name__}: {str(err)[:200]}); the run's files are "
            f"complete, re-import later with: manidp tracking import {self.run_dir}",
            stacklevel=3,
        )
        self.enabled = False

    def start(self) -> None:
        if not self.enabled:
            return
        state_file = self.run_dir / _STATE_FILE
        try:
            uri = resolve_uri(self.cfg["tracking"]["uri"])
            self.client = _client(uri)
            if state_file.exists():
                saved = json.loads(state_file.read_text())
                if saved.get("uri") == uri:
                    self.run_id = saved["run_id"]
                    self.client.update_run(self.run_id, status="RUNNING")
                    return
            exp_id = _experiment_id(self.client, self.cfg["tracking"]["experiment"] or self.cfg["dataset"])
            tags = {
                "dataset": self.cfg["dataset"], "backbone": self.cfg["backbone"], "method": self.cfg["method"],
                "budget": str(self.cfg["budget"]), "seed": str(self.cfg["seed"]),
                "run_dir": str(self.run_dir.resolve()), **{k: str(v) for k, v in self.cfg["tracking"]["tags"].items()},
            }
            if self.cfg["tracking"]["parent_run_id"]:
                tags["mlflow.parentRunId"] = self.cfg["tracking"]["parent_run_id"]
            run = self.client.create_run(exp_id, tags=tags, run_name=self.run_dir.as_posix().replace("/", "_"))
            self.run_id = run.info.run_id
            self.client.log_batch(self.run_id, params=_params(self.cfg))
            state_file.write_text(json.dumps({"uri": uri, "run_id": self.run_id}))
        except Exception as err:
            self._fail("could not start the run", err)

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
        try:
            self.client.log_batch(self.run_id, metrics=rows)
        except Exception as err:
            self._fail("could not log metrics", err)

    def finish(self, artifacts=(), status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        try:
            for path in artifacts:
                if Path(path).exists():
                    self.client.log_artifact(self.run_id, str(path))
            self.client.set_terminated(self.run_id, status=status)
        except Exception as err:
            self._fail("could not finish the run", err)


def _params(cfg: dict):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()]


def import_run(run_dir: str | Path, uri: Optional[str] = None) -> str:
    """Mirror a finished run folder into MLflow (after the store was unreachable)."""
    import yaml

    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        raise UserError(f"{run_dir} holds no metrics.json: not a finished run folder")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    if uri:
        cfg["tracking"]["uri"] = uri
    cfg["tracking"]["enabled"] = True
    (run_dir / _STATE_FILE).unlink(missing_ok=True)
    tracker = RunTracker(run_dir, cfg)
    tracker.start()
    if not tracker.enabled:
        raise UserError(f"cannot reach the MLflow store at {resolve_uri(cfg['tracking']['uri'])}")
    history = run_dir / "history.jsonl"
    if history.exists():
        for line in history.read_text().splitlines():
            row = json.loads(line)
            tracker.log_metrics(row, step=row.get("epoch"))
    tracker.log_metrics(json.loads(metrics_file.read_text()))
    tracker.finish([metrics_file, run_dir / "config.yaml"])
    return tracker.run_id


# ---------------------------------------------------------------- workflow grouping
def _find_or_create_run(uri: Optional[str], experiment: str, tags: dict[str, str], name: str):
    """(client, run id) of the run carrying ``tags``; created once, found again on re-runs."""
    uri = resolve_uri(uri)
    try:
        client = _client(uri)
        exp_id = _experiment_id(client, experiment)
        query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
        found = client.search_runs([exp_id], filter_string=query, max_results=1,
                                   order_by=["attributes.start_time ASC"])
        if found:
            return client, found[0].info.run_id
        run = client.create_run(exp_id, tags=tags, run_name=name)
        client.set_terminated(run.info.run_id, status="FINISHED")
        return client, run.info.run_id
    except Exception as err:
        raise UserError(f"cannot use the MLflow store at {uri}: {type(err).__name__}: {str(err)[:300]}") from None


def parent_run(dataset: str, backbone: str, uri: Optional[str] = None, experiment: Optional[str] = None) -> str:
    """The run that groups one (dataset, backbone)'s training runs (their ``tracking.parent_run_id``).

    Looked up by tags first, so re-creating it (a deleted marker file, a second
    workflow run) reuses the same parent instead of adding a twin.
    """
    tags = {"role": "parent", "dataset": dataset, "backbone": backbone}
    return _find_or_create_run(uri, experiment or dataset, tags, f"{dataset}/{backbone}")[1]


def log_summary(dataset: str, artifacts: list, run_metrics: dict, uri: Optional[str] = None,
                experiment: Optional[str] = None) -> str:
    """The dataset's summary run, holding ``artifacts`` (tables, plots); returns its id.

    ``run_metrics`` maps a run folder to metrics measured after its training
    (latency per hardware profile); they are added to that folder's own run.
    """
    client, run_id = _find_or_create_run(uri, experiment or dataset, {"role": "summary", "dataset": dataset},
                                         f"{dataset}/summary")
    from mlflow.entities import Metric

    try:
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        for run_dir, metrics in run_metrics.items():
            state_file = Path(run_dir) / _STATE_FILE
            if metrics and state_file.is_file():
                now = int(time.time() * 1000)
                client.log_batch(json.loads(state_file.read_text())["run_id"],
                                 metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    except Exception as err:
        raise UserError(f"cannot log the {dataset} summary to MLflow: {type(err).__name__}: {str(err)[:300]}") from None
    return run_id
