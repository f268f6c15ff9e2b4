"""The workflow's own runs: one parent per (dataset, backbone) that groups its training runs, and one summary
run per dataset holding the tables and plots, each found again by its tags on a re-run."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable, Optional

from manidp._files import result_id
from manidp.errors import UserError
from manidp.tracking.identity import IDENTITY_TAG, find_result_runs, identity_tags, metric_rows, provenance
from manidp.tracking.runs import import_run, pending
from manidp.tracking.store import connect, experiment_id, resolve_uri, short, store_error

__all__ = ["parent_run", "log_summary"]


def _find_or_create_run(client, exp_id: str, tags: dict[str, str], name: str) -> str:
    """The run carrying ``tags``; created once, found again on re-runs (duplicates are removed)."""
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    found = client.search_runs([exp_id], filter_string=query, order_by=["attributes.start_time ASC"])
    if found:
        for twin in found[1:]:
            client.delete_run(twin.info.run_id)
        return found[0].info.run_id
    run = client.create_run(exp_id, tags={**tags, **provenance()}, run_name=name)
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def parent_run(dataset: str, backbone: str, uri: Optional[str] = None, experiment: Optional[str] = None) -> str:
    """The run that groups one (dataset, backbone)'s training runs (their ``tracking.parent_run_id``).

    Looked up by tags first, so re-creating it (a deleted marker file, a second
    workflow run) reuses the same parent instead of adding a twin.
    """
    uri = resolve_uri(uri)
    try:
        client = connect(uri)
        exp_id = experiment_id(client, experiment or dataset)
        return _find_or_create_run(client, exp_id, {"role": "parent", "dataset": dataset, "backbone": backbone},
                                   f"{dataset} / {backbone}")
    except Exception as err:
        raise store_error(uri, err) from None


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
        client.log_batch(run.info.run_id, metrics=metric_rows(changed, 0))


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
        client = connect(uri)
        exp_id = experiment_id(client, experiment or dataset)
        results = {folder: _result_run(client, exp_id, folder) for folder in folders}
    except Exception as err:
        raise store_error(uri, err) from None
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
                        f"{short(err)}") from None
    return run_id
