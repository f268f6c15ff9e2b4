"""Run records: a finished run folder read once into typed records.

The engine writes ``metrics.json`` and ``instances_test.csv``, the latency step
``latency_{profile}.json``; every table and plot reads them through
:class:`RunRecord` and :class:`LatencyRecord`, so what a run holds and how a
missing or damaged file is reported is decided in one place. A record knows
nothing of tables: :meth:`RunRecord.row` is the flat row the aggregation reads.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from manidp.errors import UserError
from manidp.runid import RunId

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["RunRecord", "LatencyRecord", "load_runs", "find_profiles", "read_json", "is_number", "number_or_nan",
           "OPTIONAL_VAL", "latency_keys", "optional_present"]

#: Validation top-1 some methods record (soft pruning: masked vs physically pruned model; ManiDP: around its
#: budget calibration), at the top level of metrics.json or in its method description. Shown where present.
OPTIONAL_VAL = {
    "val_top1_masked": "Val top-1 masked (%)",
    "val_top1_pruned": "Val top-1 pruned (%)",
    "val_top1_before_calibration": "Val top-1 before calib. (%)",
    "val_top1_after_calibration": "Val top-1 after calib. (%)",
}
#: What a finished, test-evaluated run's metrics.json must hold.
_REQUIRED = ("dataset", "backbone", "method", "budget", "seed", "dynamic", "test_top1", "test_top5", "macs",
             "macs_dense", "macs_reduction", "params")


def read_json(path: Path) -> dict:
    """A run file's JSON object; a missing or damaged file is one line saying which step re-writes it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: run the workflow step that writes it first") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); delete it and re-run its step") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object; delete it and re-run its step")
    return data


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def number_or_nan(value) -> float:
    return float(value) if is_number(value) else math.nan


def _iqr(values) -> float:
    """Interquartile range of a list of repeat times (NaN without at least two)."""
    import numpy as np

    if not isinstance(values, list) or sum(is_number(v) for v in values) < 2:
        return math.nan
    p25, p75 = np.percentile([v for v in values if is_number(v)], [25, 75])
    return float(p75 - p25)


def _hardware(report: dict) -> Optional[str]:
    """The measuring machine as the latency file describes it (its ``profile`` fields, whatever they are)."""
    profile = report.get("profile")
    if not isinstance(profile, dict):
        return None
    fields = [f"{key} {value}" for key, value in profile.items()
              if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip()]
    return ", ".join(fields) or None


@dataclass(frozen=True)
class LatencyRecord:
    """One ``latency_{profile}.json``: the speed-up and every ``*_ms`` median with its spread over repeats.

    Later versions of the file may add timings (an optimized dense reference,
    spreads); every ``*_ms`` number present is taken, nothing is assumed.
    """

    status: str  #: "ok", "not measured" (no file) or "unavailable: {reason}" (the profile's device was absent)
    path: Optional[Path] = None  #: the file read; None for the dense reference and for a run not measured
    speedup: Optional[float] = None
    timings: dict[str, float] = field(default_factory=dict)  #: ``{key}_ms`` and ``{key}_ms_iqr``, file order
    macs_ratio: Optional[float] = None
    hardware: Optional[str] = None
    gate_kernel: Optional[str] = None  #: which gate form the deployed model ran (manidp.kernels)
    hit_rate: Optional[float] = None  #: slice-cache hits of the timed instances' first pass
    regime: Optional[str] = None  #: the regime the speed-up was measured in

    @classmethod
    def read(cls, path: Path) -> "LatencyRecord":
        if not path.is_file():
            return cls("not measured")
        report = read_json(path)
        if report.get("status") == "unavailable":
            return cls(f"unavailable: {report.get('reason', 'no reason given')}", path, hardware=_hardware(report))
        if not is_number(report.get("speedup")):
            raise UserError(f"{path} has no numeric 'speedup'; delete it and re-run its latency step")
        timings = {}
        for key, value in report.items():
            if key.endswith("_ms") and is_number(value):
                timings[key] = float(value)
                spread = _iqr(report.get(f"{key}_repeats"))
                timings[f"{key}_iqr"] = spread if not math.isnan(spread) else number_or_nan(report.get(f"{key}_iqr"))
        summary = report.get("dispatch_summary")
        return cls(
            "ok", path, speedup=float(report["speedup"]), timings=timings,
            macs_ratio=float(report["macs_ratio"]) if is_number(report.get("macs_ratio")) else None,
            hardware=_hardware(report),
            gate_kernel=report["gate_kernel"] if isinstance(report.get("gate_kernel"), str) else None,
            hit_rate=float(report["first_pass_hit_rate"]) if is_number(report.get("first_pass_hit_rate")) else None,
            regime=("dense-then-mask" if not summary.get("gathered") else "gathered")
            if isinstance(summary, dict) else None)

    def numbers(self) -> dict:
        """The record's values by column stem (``speedup``, ``deployed_ms``, ``hardware``, ...)."""
        out = {} if self.speedup is None else {"speedup": self.speedup}
        if self.path is None:
            return out
        out.update(self.timings)
        if self.macs_ratio is not None:
            out["macs_ratio"] = self.macs_ratio
        out["hardware"] = self.hardware
        extra = {"gate_kernel": self.gate_kernel, "hit_rate": self.hit_rate, "regime": self.regime}
        return {**out, **{k: v for k, v in extra.items() if v is not None}}


def _run_id(metrics: dict, path: Path) -> RunId:
    """The run's identity as the engine recorded it (``run_id``), never read from the folder's name.

    A metrics.json written before ``run_id`` existed is read from its top-level
    fields, with its registered method as its entry: back then the entry
    reached a run only through the folder it was written to, and the shipped
    configs name every entry after the method it runs. A table of such runs
    shows an entry that runs another method (``method:`` in the config) under
    that method's name until the run is trained again.
    """
    if "run_id" not in metrics:
        return RunId(dataset=metrics["dataset"], backbone=metrics["backbone"], entry=metrics["method"],
                     method=metrics["method"], budget=metrics["budget"], seed=metrics["seed"])
    try:
        return RunId.from_dict(metrics["run_id"])
    except UserError as err:
        raise UserError(f"{path}: {err}; delete the run and train it again") from None


def _recorded(metrics: dict, key: str) -> float:
    """A number a method may record, at the top level of metrics.json or in its method description."""
    info = metrics.get("method_info") if isinstance(metrics.get("method_info"), dict) else {}
    for place in (metrics, info, *(v for v in info.values() if isinstance(v, dict))):
        if is_number(place.get(key)):
            return float(place[key])
    return math.nan


def _training_budget(metrics: dict) -> tuple[float, float]:
    """(epochs, optimizer steps) the run was given; steps NaN where neither recorded nor computable."""
    config = metrics.get("config") if isinstance(metrics.get("config"), dict) else {}
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    epochs = number_or_nan(train.get("epochs", metrics.get("epochs_trained")))
    steps = number_or_nan(metrics.get("optimizer_steps"))
    n_train, batch = metrics.get("train_instances"), train.get("batch_size")
    if math.isnan(steps) and is_number(n_train) and is_number(batch) and n_train > 0 and not math.isnan(epochs):
        steps = epochs * (n_train // min(batch, n_train))  # the engine drops the last partial batch
    return epochs, steps


@dataclass(frozen=True)
class RunRecord:
    """A finished, test-evaluated run folder: identity, accuracy, MACs, training budget, latency per profile."""

    run_dir: Path
    dataset: str
    backbone: str
    method: str  #: the config entry (:class:`~manidp.runid.RunId`), which may differ from the registered method
    registered_method: str
    dynamic: bool
    budget: Optional[float]
    seed: int
    test_top1: float
    test_top5: float
    macs: float
    macs_dense: float
    macs_reduction: float
    params: float
    macs_theoretical: bool
    variant: Optional[str]
    title: Optional[str]
    epochs: float
    optimizer_steps: float
    validation: dict[str, float]  #: the :data:`OPTIONAL_VAL` numbers, NaN where not recorded
    spearman_macs_severity: Optional[float]
    spearman_macs_dense_loss: Optional[float]
    wall_time_s: Optional[float]
    latency: dict[str, LatencyRecord]  #: per hardware profile asked for

    @classmethod
    def read(cls, run_dir: Path, profiles: Iterable[str] = ()) -> "RunRecord":
        m = read_json(run_dir / "metrics.json")
        missing = [k for k in _REQUIRED if k not in m]
        if missing:
            raise UserError(f"{run_dir / 'metrics.json'} lacks {', '.join(missing)}: it is not a finished "
                            f"test-evaluated run (validation-only runs go to manidp tuning-table)")
        rid = _run_id(m, run_dir / "metrics.json")
        info = m.get("method_info") if isinstance(m.get("method_info"), dict) else {}
        epochs, steps = _training_budget(m)
        # The dense model is the reference every speed-up is measured against: it reads no latency file.
        latency = {p: LatencyRecord("ok", speedup=1.0) if rid.budget is None
                   else LatencyRecord.read(run_dir / f"latency_{p}.json") for p in profiles}
        return cls(
            run_dir=run_dir, dataset=rid.dataset, backbone=rid.backbone, method=rid.entry,
            registered_method=rid.method, dynamic=bool(m["dynamic"]), budget=rid.budget, seed=rid.seed,
            test_top1=m["test_top1"], test_top5=m["test_top5"], macs=m["macs"], macs_dense=m["macs_dense"],
            macs_reduction=m["macs_reduction"], params=m["params"],
            macs_theoretical=bool(info.get("macs_theoretical", False)),
            variant=info.get("variant") if isinstance(info.get("variant"), str) else None,
            title=info.get("title") if isinstance(info.get("title"), str) else None,
            epochs=epochs, optimizer_steps=steps, validation={key: _recorded(m, key) for key in OPTIONAL_VAL},
            spearman_macs_severity=m.get("spearman_macs_severity"),
            spearman_macs_dense_loss=m.get("spearman_macs_dense_loss"), wall_time_s=m.get("wall_time_s"),
            latency=latency)

    def row(self) -> dict:
        """The flat row the tables read: errors and MACs in the tables' units, latency as ``{stem}_{profile}``."""
        row = {
            "dataset": self.dataset, "backbone": self.backbone, "method": self.method,
            "registered_method": self.registered_method, "dynamic": self.dynamic, "budget": self.budget,
            "seed": self.seed, "test_top1": self.test_top1, "test_top5": self.test_top5,
            "top1_err": 100.0 - self.test_top1, "top5_err": 100.0 - self.test_top5,
            "macs_m": self.macs / 1e6, "macs_dense_m": self.macs_dense / 1e6,
            "macs_reduction_pct": 100.0 * self.macs_reduction, "macs_theoretical": self.macs_theoretical,
            "variant": self.variant, "title": self.title, "epochs": self.epochs,
            "optimizer_steps": self.optimizer_steps,
            **self.validation,
            "spearman_macs_severity": self.spearman_macs_severity,
            "spearman_macs_dense_loss": self.spearman_macs_dense_loss,
            "params_m": self.params / 1e6, "wall_time_s": self.wall_time_s, "run_dir": str(self.run_dir),
        }
        for profile, record in self.latency.items():
            numbers = record.numbers()
            row.update({f"{name}_{profile}": value for name, value in numbers.items()})
            row[f"speedup_{profile}"] = numbers.get("speedup", math.nan)
            row[f"note_{profile}"] = None if record.status == "ok" else record.status
        return row


def find_profiles(run_dirs: Iterable[str | Path]) -> list[str]:
    """Hardware profiles with a ``latency_{profile}.json`` in any of the run folders."""
    return sorted({p.name[len("latency_"):-len(".json")] for d in run_dirs for p in Path(d).glob("latency_*.json")})


def load_runs(run_dirs: Iterable[str | Path], profiles: Iterable[str] = ()) -> "pd.DataFrame":
    """One row per run folder (:meth:`RunRecord.row`), with each run's drops to the dense run of its seed."""
    import pandas as pd

    profiles = list(profiles)
    rows = [RunRecord.read(run_dir, profiles).row() for run_dir in map(Path, run_dirs)]
    if not rows:
        raise UserError("no run folders given: pass --runs DIR ...")
    runs = pd.DataFrame(rows)
    dense = runs[runs["budget"].isna()].set_index(["backbone", "seed"])
    for metric in ("top1", "top5"):
        reference = runs.set_index(["backbone", "seed"]).index.map(dense[f"{metric}_err"].to_dict())
        runs[f"{metric}_gap"] = runs[f"{metric}_err"] - reference.to_numpy(dtype=float)
    return runs


def latency_keys(columns: Iterable[str], profile: str) -> list[str]:
    """The ``*_ms`` latency keys present for a profile, deployed first, then dense, then the rest."""
    suffix = f"_{profile}"
    keys = [c[:-len(suffix)] for c in columns if c.endswith(suffix) and c[:-len(suffix)].endswith("_ms")]
    return sorted(keys, key=lambda k: ({"deployed_ms": 0, "dense_ms": 1}.get(k, 2), keys.index(k)))


def optional_present(table: "pd.DataFrame") -> list[str]:
    """The :data:`OPTIONAL_VAL` columns some row of ``table`` holds."""
    return [k for k in OPTIONAL_VAL if k in table and table[k].notna().any()]
