"""One MLflow run per result, mirroring the run folder's files (which stay the source of truth).

- a resumed run (from its checkpoint) continues the identity's run;
- a run that starts from scratch replaces any run of the same identity or the
  same folder (stale ones, still RUNNING after a kill, are closed as KILLED),
  so its metric history starts clean;
- a run that dies is closed as FAILED (an error) or KILLED (interrupted).

Per-epoch metrics are logged at step = epoch, the final ones at the step after
the last epoch, so every history reads forward. If a run still cannot be
logged it finishes anyway, says so at its end and leaves
``tracking_pending.json`` in its folder: ``manidp tracking import RUN_DIR``
(and the workflow's summary step) imports it later.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Iterable, Optional

from manidp._files import result_id
from manidp.errors import UserError
from manidp.tracking.identity import (IDENTITY_TAG, RUN_DIR_TAG, find_result_runs, flatten, identity_tags,
                                      metric_rows, provenance, run_name)
from manidp.tracking.store import connect, experiment_id, resolve_uri, short

__all__ = ["RunTracker", "MlflowObserver", "abort_open_runs", "import_run", "pending", "CONSTANTS", "PENDING_FILE",
           "STATE_FILE"]

#: The run folder's record of the MLflow run that mirrors it (for people; runs are found by identity).
STATE_FILE = "tracking.json"
#: Left in a run folder whose run could not be logged; removed once it is.
PENDING_FILE = "tracking_pending.json"
#: Final values that describe a run rather than measure it: logged once as params, not as one-point charts.
CONSTANTS = ("seed", "budget", "epochs_trained", "optimizer_steps", "macs_dense", "params_dense", "test_instances",
             "val_instances")


def _replace(client, run) -> None:
    """Retire a run another takes the place of: close it as KILLED if it never ended, then delete it."""
    if run.info.status == "RUNNING":
        client.set_terminated(run.info.run_id, status="KILLED")
    client.delete_run(run.info.run_id)


def _params(cfg: dict):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()]


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
        self.problem = f"{what}: {type(err).__name__}: {short(err, 200)}"
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
            self.client = connect(self.uri)
            exp_id = experiment_id(self.client, self.cfg["tracking"]["experiment"] or self.cfg["dataset"])
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
                tags.update({RUN_DIR_TAG: str(run_dir), **provenance(),
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
                    self.client.log_batch(self.run_id, metrics=metric_rows(_epoch_metrics(row), row["epoch"]))
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
            self.client.log_batch(self.run_id, metrics=metric_rows(metrics, step))
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
            self.client.log_batch(self.run_id, metrics=metric_rows(measured, step),
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
                    with warnings.catch_warnings():
                        # Gates keep each call's masks and saliencies on the module for the MAC counter and
                        # the losses; the exported graph computes them from its input and never reads them
                        # back, so torch.export's advice to make them buffers is no news in every job's log.
                        warnings.filterwarnings("ignore", message=r"The tensor attributes? .* assigned during export")
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
                self.client.set_tag(self.run_id, "manidp.model_not_logged", f"{type(err).__name__}: {short(err)}")
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
