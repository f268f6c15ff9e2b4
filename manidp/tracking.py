"""MLflow tracking, secondary to the files every run writes.

The JSON/CSV files in a run folder are the source of truth. Tracking mirrors
them into MLflow: one experiment per dataset (created as a model-training
experiment), one run per *result*. A result's identity is its dataset,
backbone, method, budget, seed and a hash of its resolved config (the tag
``manidp.identity``), so re-running, restarting or importing a result finds its
run instead of adding a second one:

- a resumed run (from its checkpoint) continues the identity's run;
- a run that starts from scratch replaces any run of the same identity or the
  same folder (stale ones, still RUNNING after a kill, are closed as KILLED),
  so its metric history starts clean;
- a run that dies is closed as FAILED (an error) or KILLED (interrupted).

Per-epoch metrics are logged at step = epoch, the final ones at the step after
the last epoch, so every history reads forward. Runs carry the git commit
(``mlflow.source.git.commit``, when the package is a git checkout) and the
package versions.

Default store: ``sqlite:///results/mlflow.db`` (relative to the working
directory). ``MLFLOW_TRACKING_URI`` wins over the config key ``tracking.uri``,
so a cluster can log to an ``mlflow server`` over HTTP. A sqlite store is
created or migrated under a file lock (``mlflow.db.lock`` beside it), so
parallel jobs may open a fresh store; "database is locked" is retried with
backoff. If a run still cannot be logged it finishes anyway, says so at its
end and leaves ``tracking_pending.json`` in its folder: ``manidp tracking
import RUN_DIR`` (and the workflow's summary step) imports it later.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import platform
import random
import re
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

from manidp._files import result_id
from manidp.errors import UserError

__all__ = ["resolve_uri", "init_store", "RunTracker", "MlflowObserver", "import_run", "pending", "identity_tags", "find_result_runs",
           "abort_open_runs", "flatten", "parent_run", "log_summary", "PENDING_FILE", "IDENTITY_TAG"]

DEFAULT_DB = Path("results") / "mlflow.db"
#: The run folder's record of the MLflow run that mirrors it (for people; runs are found by identity).
STATE_FILE = "tracking.json"
#: Left in a run folder whose run could not be logged; removed once it is.
PENDING_FILE = "tracking_pending.json"
IDENTITY_TAG = "manidp.identity"
CONFIG_HASH_TAG = "manidp.config_hash"
RESULT_TAG = "manidp.result_id"
RUN_DIR_TAG = "run_dir"
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
#: Final values that describe a run rather than measure it: logged once as params, not as one-point charts.
CONSTANTS = ("seed", "budget", "epochs_trained", "optimizer_steps", "macs_dense", "params_dense", "test_instances",
             "val_instances")
#: Seconds between attempts while sqlite reports "database is locked" (about a minute in all).
RETRY_DELAYS = (0.25, 0.5, 1, 2, 4, 8, 16, 30)
_VERSIONED = ("manidp", "torch", "torchvision", "timm", "torch-pruning", "mlflow", "numpy")


def resolve_uri(config_uri: Optional[str] = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config_uri
    if uri:
        return uri
    return f"sqlite:///{DEFAULT_DB.resolve()}"


# ----------------------------------------------------------------- the store
def _quiet_mlflow() -> None:
    """Keep MLflow's INFO lines (table creation, migrations) out of the tool's stderr."""
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
    _quiet_mlflow()
    _check_reachable(uri)
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


def _store_error(uri: str, err: Exception) -> UserError:
    return UserError(f"cannot use the MLflow store at {uri}: {type(err).__name__}: {_short(err)}")


def _short(err: Exception, limit: int = 300) -> str:
    return " ".join(str(err).split())[:limit]


def init_store(uri: Optional[str] = None, experiments: tuple[str, ...] = ()) -> str:
    """Create the store (and experiments) once; safe to call again, and from parallel jobs."""
    uri = resolve_uri(uri)
    try:
        client = _client(uri)
        for name in experiments:
            _experiment_id(client, name)
    except Exception as err:
        raise _store_error(uri, err) from None
    return uri


def _experiment_id(client, name: str) -> str:
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


# ----------------------------------------------------------------- a result's identity
def identity_tags(cfg: dict, result: str) -> dict[str, str]:
    """The tags that name a result: dataset, backbone, method, budget, seed, the config hash and the run
    folder's result id (``manidp._files.result_id``), so two folders trained alike stay two runs."""
    from manidp.config import config_hash

    digest = config_hash(cfg)
    budget = "none" if cfg["budget"] is None else f"{cfg['budget']:g}"
    return {
        "dataset": cfg["dataset"], "backbone": cfg["backbone"], "method": cfg["method"],
        "budget": str(cfg["budget"]), "seed": str(cfg["seed"]), CONFIG_HASH_TAG: digest, RESULT_TAG: result,
        IDENTITY_TAG: (f"{cfg['dataset']}/{cfg['backbone']}/{cfg['method']}/b{budget}/seed{cfg['seed']}/{digest}/"
                       f"{result}"),
    }


def run_name(cfg: dict) -> str:
    """Method first, so the UI's narrow name column tells runs apart: ``manidp b0.55 s0``, ``dense s0``."""
    budget = "" if cfg["budget"] is None else f" b{cfg['budget']:g}"
    return f"{cfg['method']}{budget} s{cfg['seed']}"


def _quoted(value: str) -> Optional[str]:
    return None if "'" in value else f"'{value}'"


def find_result_runs(client, experiment_id: str, identity: str, run_dir: Optional[Path] = None) -> list:
    """Active runs of ``identity`` and, with ``run_dir``, of that folder; newest first."""
    queries = [f"tags.`{IDENTITY_TAG}` = {_quoted(identity)}"]
    if run_dir is not None and _quoted(str(run_dir)):
        queries.append(f"tags.`{RUN_DIR_TAG}` = {_quoted(str(run_dir))}")
    found = {}
    for query in queries:
        for run in client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"]):
            found.setdefault(run.info.run_id, run)
    return sorted(found.values(), key=lambda r: r.info.start_time or 0, reverse=True)


def _replace(client, run) -> None:
    """Retire a run another takes the place of: close it as KILLED if it never ended, then delete it."""
    if run.info.status == "RUNNING":
        client.set_terminated(run.info.run_id, status="KILLED")
    client.delete_run(run.info.run_id)


def _provenance() -> dict[str, str]:
    """Package versions and, in a git checkout, the commit this code came from."""
    from importlib.metadata import PackageNotFoundError, version

    tags = {"version.python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            tags[f"version.{dist}"] = version(dist)
        except PackageNotFoundError:
            pass
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10)
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return tags
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
            tags["manidp.git_dirty"] = str(bool(dirty.stdout.strip())).lower()
    return tags


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _params(cfg: dict):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()]


def _metric_rows(metrics: dict, step: int):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


# ----------------------------------------------------------------- one run per result
_OPEN: list["RunTracker"] = []


def _timed(method):
    """Add the call's duration to the tracker's ``seconds``."""
    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        began = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - began

    return timed


class RunTracker:
    """The MLflow run of one result (see the module docstring for how it is found)."""

    def __init__(self, run_dir: Path, cfg: dict, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.enabled = enabled and cfg["tracking"]["enabled"]
        self.uri = resolve_uri(cfg["tracking"]["uri"])
        self.client = None
        self.run_id: Optional[str] = None
        self.problem: Optional[str] = None
        #: Seconds spent talking to the store, which the engine keeps out of the recorded training times.
        self.seconds = 0.0

    def _fail(self, what: str, err: Exception) -> None:
        """Stop tracking this run and leave the marker that gets it imported later."""
        self.problem = f"{what}: {type(err).__name__}: {_short(err, 200)}"
        self.enabled = False
        try:
            (self.run_dir / PENDING_FILE).write_text(json.dumps({"uri": self.uri, "problem": self.problem}) + "\n")
        except OSError:
            pass

    @_timed
    def start(self, resume_history: Iterable[dict] = ()) -> None:
        """Open the result's run.

        With ``resume_history`` (the epochs a resumed run already trained) the
        identity's run is continued and given any epoch it lacks; without, the
        result starts over and replaces every run of its identity or folder.
        """
        if not self.enabled:
            return
        history = list(resume_history)
        tags = identity_tags(self.cfg, result_id(self.run_dir))
        run_dir = self.run_dir.resolve()
        try:
            self.client = _client(self.uri)
            exp_id = _experiment_id(self.client, self.cfg["tracking"]["experiment"] or self.cfg["dataset"])
            found = find_result_runs(self.client, exp_id, tags[IDENTITY_TAG], run_dir)
            keep = next((r for r in found if r.data.tags.get(IDENTITY_TAG) == tags[IDENTITY_TAG]), None)
            keep = keep if history else None
            for run in found:
                if run is not keep:
                    _replace(self.client, run)
            if keep is not None:
                self.run_id = keep.info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                logged = {m.step for m in self.client.get_metric_history(self.run_id, "train_loss")}
            else:
                tags.update({RUN_DIR_TAG: str(run_dir), **_provenance(),
                             **{k: str(v) for k, v in self.cfg["tracking"]["tags"].items()}})
                parent = self.cfg["tracking"]["parent_run_id"]
                if parent and _exists(self.client, parent):  # an imported folder's parent may be another store's
                    tags["mlflow.parentRunId"] = parent
                tags.update({"mlflow.source.name": "manidp train", "mlflow.source.type": "LOCAL"})
                run = self.client.create_run(exp_id, tags=tags, run_name=run_name(self.cfg))
                self.run_id = run.info.run_id
                self.client.log_batch(self.run_id, params=_params(self.cfg))
                logged = set()
            for row in history:
                if row["epoch"] not in logged:
                    self.client.log_batch(self.run_id, metrics=_metric_rows(_epoch_metrics(row), row["epoch"]))
            (self.run_dir / STATE_FILE).write_text(json.dumps({"uri": self.uri, "run_id": self.run_id}) + "\n")
        except Exception as err:
            self._fail("could not start the run", err)
            return
        _OPEN.append(self)

    @_timed
    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        if not self.enabled:
            return
        try:
            self.client.log_batch(self.run_id, metrics=_metric_rows(metrics, step))
        except Exception as err:
            self._fail("could not log metrics", err)

    @_timed
    def log_final(self, metrics: dict, step: int) -> None:
        """The run's final values: measurements as metrics at ``step``, the constants (:data:`CONSTANTS`)
        as params."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        constants = {k: metrics[k] for k in CONSTANTS if k in metrics}
        measured = {k: v for k, v in metrics.items() if k not in constants}
        try:
            self.client.log_batch(self.run_id, metrics=_metric_rows(measured, step),
                                  params=[Param(f"final.{k}", str(v)) for k, v in constants.items()])
        except Exception as err:
            self._fail("could not log the final metrics", err)

    @_timed
    def log_datasets(self, dataset: str, data_cfg: dict, info: dict) -> None:
        """The splits this run read, as MLflow dataset inputs (Datasets on the run page).

        The digest hashes what defines a split (dataset, data config, sizes), so two runs on the same
        data show the same dataset and a changed holdout or subset shows a new one.
        """
        if not self.enabled:
            return
        import hashlib

        from mlflow.entities import Dataset, DatasetInput, InputTag

        sizes = info.get("sizes", {})
        source = str(info.get("path") or info.get("root") or info.get("cache_path") or dataset)
        inputs = []
        for split, context in (("train", "training"), ("val", "validation"), ("test", "testing")):
            if split not in sizes:
                continue
            definition = json.dumps({"dataset": dataset, "split": split, "data": data_cfg, "size": sizes[split]},
                                    sort_keys=True, default=str)
            digest = hashlib.sha256(definition.encode()).hexdigest()[:16]
            inputs.append(DatasetInput(
                Dataset(name=f"{dataset}/{split}", digest=digest, source_type="local", source=source,
                        profile=json.dumps({"num_rows": sizes[split]})),
                tags=[InputTag("mlflow.data.context", context)]))
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except Exception as err:
            self._fail("could not log the datasets", err)

    @_timed
    def log_model(self, model, input_size: tuple) -> None:
        """The trained model as an MLflow model (Logged models; Models tab) with its signature and an input
        example: exported with torch.export (no pickled code) where it traces, else MLflow's pickle format
        (tag ``manidp.model_format`` says which). ``tracking.log_model: false`` skips it (large ImageNet
        models). A model MLflow cannot save is noted in a tag; the run goes on."""
        if not self.enabled or not self.cfg["tracking"].get("log_model", True):
            return
        import mlflow
        import torch
        from mlflow.models import infer_signature

        from manidp.gating import copy_model

        try:
            example = torch.randn(2, *input_size)  # batch 2: a batch of 1 would pin the exported batch size
            cpu_model = copy_model(model).cpu().eval()
            with torch.no_grad():
                output = cpu_model(example)
            signature = infer_signature(example.numpy(), output.numpy())
            logging.getLogger("torch._export").setLevel(logging.ERROR)
            with _fluent_store(self.uri), mlflow.start_run(run_id=self.run_id):
                kwargs = dict(name="model", signature=signature, input_example=example.numpy(),
                              pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                              validate_serving_input=False)
                try:
                    mlflow.pytorch.log_model(cpu_model, serialization_format="pt2", **kwargs)
                    how = "pt2 (torch.export)"
                except Exception as err:  # data-dependent gates (top-k of a per-instance count) do not export
                    kwargs.pop("validate_serving_input")  # the pickle writer passes it on to torch.save
                    mlflow.pytorch.log_model(cpu_model, serialization_format="pickle", **kwargs)
                    how = f"pickle (torch.export failed: {type(err).__name__})"
            self.client.set_tag(self.run_id, "manidp.model_format", how)
            self.client.update_run(self.run_id, status="RUNNING")  # the fluent run's exit ended it
        except Exception as err:  # a model MLflow cannot save is noted; the run's files are complete
            try:
                self.client.set_tag(self.run_id, "manidp.model_not_logged", f"{type(err).__name__}: {_short(err)}")
            except Exception as store_err:
                self._fail("could not log the model", store_err)

    @_timed
    def finish(self, artifacts=(), status: str = "FINISHED") -> None:
        """Close the run; if it could not be logged, say so (the run's files are complete)."""
        if self in _OPEN:
            _OPEN.remove(self)
        if self.enabled:
            try:
                for path in artifacts:
                    if Path(path).exists():
                        self.client.log_artifact(self.run_id, str(path))
                self.client.set_terminated(self.run_id, status=status)
                if status == "FINISHED":
                    (self.run_dir / PENDING_FILE).unlink(missing_ok=True)
            except Exception as err:
                self._fail("could not finish the run", err)
        if self.problem:
            warnings.warn(
                f"this run is NOT in the MLflow store at {self.uri} ({self.problem}); its files are complete: "
                f"import it with: manidp tracking import {self.run_dir}",
                stacklevel=2,
            )

    def abort(self, error: BaseException) -> None:
        """Close the run of a process that is dying: KILLED when interrupted, FAILED on an error."""
        interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
        self.finish(status="KILLED" if interrupted else "FAILED")


def _exists(client, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return True
    except Exception:
        return False


@contextlib.contextmanager
def _fluent_store(uri: str):
    """MLflow's module-level store for one call: ``mlflow.set_tracking_uri`` also sets
    ``MLFLOW_TRACKING_URI``, which would otherwise outrank every later run's own ``tracking.uri``."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


class MlflowObserver:
    """The engine's run observer (``manidp.engine.RunObserver``'s hooks) that mirrors a run into MLflow:
    its run, per-epoch metrics, dataset inputs, final metrics, model and files."""

    def __init__(self):
        self.tracker: Optional[RunTracker] = None

    @property
    def seconds(self) -> float:
        return self.tracker.seconds if self.tracker else 0.0

    def started(self, out: Path, cfg: dict, history: list, splits) -> None:
        self.tracker = RunTracker(out, cfg)
        self.tracker.start(resume_history=history)
        if not history:
            self.tracker.log_datasets(cfg["dataset"], cfg["data"], splits.info)

    def epoch_ended(self, row: dict, epoch: int) -> None:
        self.tracker.log_metrics(_epoch_metrics(row), step=epoch)

    def finished(self, out: Path, model, metrics: dict, splits, step: int) -> None:
        self.tracker.log_final(metrics, step=step)
        self.tracker.log_model(model, splits.input_size)
        self.tracker.finish([out / "metrics.json", out / "config.yaml", out / "history.jsonl"])

    def failed(self, error: BaseException) -> None:
        if self.tracker is not None:
            self.tracker.abort(error)


def abort_open_runs(error: BaseException) -> None:
    """Close every run this process still holds open (the command line calls it when a command dies)."""
    for tracker in list(_OPEN):
        tracker.abort(error)


def _epoch_metrics(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "epoch"}


# ----------------------------------------------------------------- import
def _saved(run_dir: Path) -> tuple[dict, dict]:
    """(config, metrics) of a finished run folder."""
    from manidp.config import finished_run, yaml_load

    if not finished_run(run_dir):
        raise UserError(f"{run_dir} holds no finished run (model.pt and a complete metrics.json); "
                        "train it to the end first")
    try:
        cfg = yaml_load((run_dir / "config.yaml").read_text())
    except Exception as err:
        raise UserError(f"{run_dir}/config.yaml is missing or unreadable ({type(err).__name__})") from None
    return cfg, json.loads((run_dir / "metrics.json").read_text())


def import_run(run_dir: str | Path, uri: Optional[str] = None) -> str:
    """Mirror a finished run folder into MLflow, replacing any run of its identity; returns the run id.

    The store is this process's (``uri``, else ``MLFLOW_TRACKING_URI``, else
    the default), never the one named in the folder's own config: a folder
    someone sent you must not decide where files are written or data is sent.
    Importing the same folder twice leaves one run.
    """
    run_dir = Path(run_dir)
    cfg, metrics = _saved(run_dir)
    cfg["tracking"]["uri"] = resolve_uri(uri)
    cfg["tracking"]["enabled"] = True
    history = []
    if (run_dir / "history.jsonl").is_file():
        try:
            history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line]
        except ValueError:
            raise UserError(f"{run_dir}/history.jsonl is corrupt: a line is not JSON") from None
    tracker = RunTracker(run_dir, cfg)
    tracker.start()
    for row in history:
        tracker.log_metrics(_epoch_metrics(row), step=row["epoch"])
    tracker.log_final(metrics, step=len(history))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the problem is raised below, as the command's one message
        tracker.finish([run_dir / "metrics.json", run_dir / "config.yaml", run_dir / "history.jsonl"])
    if tracker.problem:
        raise UserError(f"cannot import {run_dir} into the MLflow store at {tracker.uri}: {tracker.problem}")
    return tracker.run_id


def pending(run_dirs: Iterable[str | Path]) -> list[Path]:
    """The run folders among ``run_dirs`` whose run could not be logged (they hold the marker)."""
    return [Path(d) for d in run_dirs if (Path(d) / PENDING_FILE).is_file()]


# ----------------------------------------------------------------- workflow grouping
def _find_or_create_run(client, exp_id: str, tags: dict[str, str], name: str) -> str:
    """The run carrying ``tags``; created once, found again on re-runs (duplicates are removed)."""
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    found = client.search_runs([exp_id], filter_string=query, order_by=["attributes.start_time ASC"])
    if found:
        for twin in found[1:]:
            client.delete_run(twin.info.run_id)
        return found[0].info.run_id
    run = client.create_run(exp_id, tags={**tags, **_provenance()}, run_name=name)
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def parent_run(dataset: str, backbone: str, uri: Optional[str] = None, experiment: Optional[str] = None) -> str:
    """The run that groups one (dataset, backbone)'s training runs (their ``tracking.parent_run_id``).

    Looked up by tags first, so re-creating it (a deleted marker file, a second
    workflow run) reuses the same parent instead of adding a twin.
    """
    uri = resolve_uri(uri)
    try:
        client = _client(uri)
        exp_id = _experiment_id(client, experiment or dataset)
        return _find_or_create_run(client, exp_id, {"role": "parent", "dataset": dataset, "backbone": backbone},
                                   f"{dataset} / {backbone}")
    except Exception as err:
        raise _store_error(uri, err) from None


def _with_init_runs(run_dirs: Iterable[str | Path]) -> list[Path]:
    """``run_dirs`` and the finished runs they started from (``init_from``: the dense runs)."""
    from manidp.config import finished_run, yaml_load

    out = []
    for run_dir in map(Path, run_dirs):
        try:
            source = yaml_load((run_dir / "config.yaml").read_text()).get("init_from")
        except Exception:
            source = None
        for folder in (Path(source) if source else None, run_dir):
            if folder is not None and folder not in out and (folder == run_dir or finished_run(folder)):
                out.append(folder)
    return out


def _result_run(client, exp_id: str, run_dir: Path):
    """The one FINISHED run of the result in ``run_dir`` (twins removed), or None."""
    from manidp.config import yaml_load

    try:
        cfg = yaml_load((run_dir / "config.yaml").read_text())
    except Exception:
        return None
    runs = [r for r in find_result_runs(client, exp_id, identity_tags(cfg, result_id(run_dir))[IDENTITY_TAG])
            if r.info.status == "FINISHED"]
    for twin in runs[1:]:
        client.delete_run(twin.info.run_id)
    return runs[0] if runs else None


_METRIC_NAME = re.compile(r"[^0-9A-Za-z_\-. /]")


#: Columns that tell a table's rows apart, and how each appears in a metric name.
_ROW_KEYS = {"backbone": str, "method": str, "budget_pct": lambda v: f"b{v:g}", "budget": lambda v: f"b{v * 100:g}",
             "seed": lambda v: f"s{int(v)}"}


def _table_metrics(table) -> dict[str, float]:
    """The table's numbers as metrics named ``backbone/method/b{budget}[/s{seed}]/column`` (our rows only).

    A table whose rows those columns cannot tell apart gives no metrics (it stays an artifact and an
    MLflow table): one name for several rows would keep only the last row's value.
    """
    import pandas as pd

    if "source" in table.columns:
        table = table[table["source"] == "ours"]
    keys = [c for c in _ROW_KEYS if c in table.columns and not (c == "budget" and "budget_pct" in table.columns)]
    if not keys or table.duplicated(subset=keys).any():
        return {}
    out = {}
    for _, row in table.iterrows():
        parts = [_ROW_KEYS[k](row[k]) for k in keys if not pd.isna(row[k])]
        for column, value in row.items():
            if column in keys or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                out[_METRIC_NAME.sub("_", "/".join([*parts, str(column)]))] = float(value)
    return out


def _log_new_metrics(client, run, metrics: dict) -> None:
    """Log the metrics whose latest value differs (a re-run summary adds no repeated points)."""
    changed = {k: v for k, v in metrics.items() if run.data.metrics.get(k) != float(v)}
    if changed:
        client.log_batch(run.info.run_id, metrics=_metric_rows(changed, 0))


def log_summary(dataset: str, artifacts: list, run_metrics: dict, uri: Optional[str] = None,
                experiment: Optional[str] = None, run_dirs: Optional[Iterable] = None) -> str:
    """The dataset's summary run; returns its id.

    Every result in ``run_dirs`` (default: the folders of ``run_metrics`` and
    the dense runs they started from) must have its one FINISHED run in the
    store: runs left pending by a store failure are imported first, and a result
    still missing is an error naming it. The summary run gets ``artifacts``
    (tables, plots), each ``*.csv`` table as an MLflow table and its numbers as
    metrics; ``run_metrics`` (run folder -> metrics measured after training,
    such as latency) go to that folder's own run.
    """
    uri = resolve_uri(uri)
    folders = [Path(d) for d in run_dirs] if run_dirs is not None else _with_init_runs(run_metrics)
    for folder in pending(folders):
        import_run(folder, uri)
    try:
        client = _client(uri)
        exp_id = _experiment_id(client, experiment or dataset)
        results = {folder: _result_run(client, exp_id, folder) for folder in folders}
    except Exception as err:
        raise _store_error(uri, err) from None
    missing = [str(folder) for folder, run in results.items() if run is None]
    if missing:
        raise UserError(f"{len(missing)} of {len(folders)} runs are not in the MLflow store at {uri}: "
                        f"{', '.join(missing)}; import them with: manidp tracking import {' '.join(missing)}")
    import pandas as pd

    try:
        run_id = _find_or_create_run(client, exp_id, {"role": "summary", "dataset": dataset}, f"{dataset} / summary")
        summary = client.get_run(run_id)
        for path in map(Path, artifacts):
            client.log_artifact(run_id, str(path))
            if path.suffix == ".csv":
                table = pd.read_csv(path)
                client.log_table(run_id, table, f"{path.stem}.json")
                _log_new_metrics(client, summary, _table_metrics(table))
        for folder, metrics in run_metrics.items():
            run = results.get(Path(folder)) or _result_run(client, exp_id, Path(folder))
            if metrics and run is not None:
                _log_new_metrics(client, run, metrics)
    except Exception as err:
        raise UserError(f"cannot log the {dataset} summary to MLflow at {uri}: {type(err).__name__}: "
                        f"{_short(err)}") from None
    return run_id
