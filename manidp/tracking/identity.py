"""A result's identity in MLflow, and what every run carries.

A result's identity is its :class:`~manidp.runid.RunId` (dataset, backbone,
method, budget, seed, a hash of its resolved config) and its folder's result
id (the tag ``manidp.identity``), so re-running, restarting or importing a
result finds its run instead of adding a second one. Runs also carry the
package versions and, in a git checkout, the commit.
"""
from __future__ import annotations

import math
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from manidp.config import run_id

__all__ = ["identity_tags", "run_name", "find_result_runs", "provenance", "flatten", "metric_rows", "IDENTITY_TAG",
           "CONFIG_HASH_TAG", "RESULT_TAG", "RUN_DIR_TAG"]

IDENTITY_TAG = "manidp.identity"
CONFIG_HASH_TAG = "manidp.config_hash"
RESULT_TAG = "manidp.result_id"
RUN_DIR_TAG = "run_dir"
_VERSIONED = ("manidp", "torch", "torchvision", "timm", "torch-pruning", "mlflow", "numpy")


def identity_tags(cfg: dict, result: str) -> dict[str, str]:
    """The tags that name a result: its :class:`~manidp.runid.RunId` but the entry (dataset, backbone, method,
    budget, seed, config hash) and the run folder's result id (``manidp._files.result_id``), so two folders
    trained alike stay two runs."""
    rid = run_id(cfg)
    budget = "none" if rid.budget is None else f"{rid.budget:g}"
    return {
        "dataset": rid.dataset, "backbone": rid.backbone, "method": rid.method, "budget": str(rid.budget),
        "seed": str(rid.seed), CONFIG_HASH_TAG: rid.config_hash, RESULT_TAG: result,
        IDENTITY_TAG: f"{rid.dataset}/{rid.backbone}/{rid.method}/b{budget}/seed{rid.seed}/{rid.config_hash}/{result}",
    }


def run_name(cfg: dict) -> str:
    """Method first, so the UI's narrow name column tells runs apart: ``manidp b0.55 s0``, ``dense s0``."""
    rid = run_id(cfg)
    budget = "" if rid.budget is None else f" b{rid.budget:g}"
    return f"{rid.method}{budget} s{rid.seed}"


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


def provenance() -> dict[str, str]:
    """Package versions and, in a git checkout, the commit this code came from."""
    from importlib.metadata import PackageNotFoundError, version

    tags = {"version.python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            tags[f"version.{dist}"] = version(dist)
        except PackageNotFoundError:
            pass
    root = Path(__file__).resolve().parents[2]
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


def metric_rows(metrics: dict, step: int):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
