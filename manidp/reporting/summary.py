"""Aggregation: the runs of one (backbone, method, budget) as mean and standard deviation over seeds.

Drops to dense are taken per seed (a method's error minus the error of the
dense model it was fine-tuned from, in :func:`manidp.reporting.runs.load_runs`),
then averaged here.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from manidp.reporting.runs import latency_keys, optional_present

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["MEASURES", "summarize_runs", "write_per_seed"]

#: Per-run quantities averaged over seeds, and how each is labelled in the md/tex tables.
MEASURES = {
    "top1_err": "Top-1 err. (%)",
    "top5_err": "Top-5 err. (%)",
    "top1_gap": "Top-1 drop",
    "top5_gap": "Top-5 drop",
    "macs_m": "MACs (M)",
    "macs_reduction_pct": "MACs red. (%)",
}


def summarize_runs(runs: "pd.DataFrame", profiles: Iterable[str] = ()) -> "pd.DataFrame":
    """Mean and standard deviation over seeds per (backbone, method, budget)."""
    import pandas as pd

    profiles = list(profiles)
    latency = {p: latency_keys(runs.columns, p) for p in profiles}
    measures = list(MEASURES) + optional_present(runs) + [f"speedup_{p}" for p in profiles] + [
        f"{key}_{p}" for p in profiles for key in latency[p]] + ["spearman_macs_severity", "spearman_macs_dense_loss"]
    keys = ["dataset", "backbone", "method", "budget"]
    out = []
    for (dataset, backbone, method, budget), group in runs.groupby(keys, dropna=False, sort=False):
        row = {"dataset": dataset, "backbone": backbone, "method": method, "source": "ours",
               "dynamic": "dense" if pd.isna(budget) else "dynamic" if group["dynamic"].iloc[0] else "static",
               "budget_pct": None if pd.isna(budget) else round(100 * budget, 1), "n_seeds": len(group)}
        notes = ["MACs theoretical (per-activation gating; dense kernels skip nothing)"
                 if group["macs_theoretical"].any() else None]
        notes = sorted(set(group["title"].dropna())) + notes
        notes += sorted(f"variant: {v}" for v in set(group["variant"].dropna()))
        for budget_key in ("epochs", "optimizer_steps"):
            values = group[budget_key].dropna().unique()
            row[budget_key] = values.max() if len(values) else math.nan
            if len(values) > 1:
                listed = ", ".join(f"{v:g}" for v in sorted(values))
                notes.append(f"{budget_key.replace('_', ' ')} differ across seeds ({listed})")
        for measure in measures:
            values = pd.to_numeric(group[measure], errors="coerce")
            row[measure] = values.mean()
            row[f"{measure}_std"] = values.std(ddof=1) if values.notna().sum() > 1 else math.nan
        for p in profiles:
            for key in latency[p]:  # the spread over repeats, averaged over seeds
                row[f"{key}_iqr_{p}"] = pd.to_numeric(group[f"{key}_iqr_{p}"], errors="coerce").mean()
            statuses = {"ok" if n is None or pd.isna(n) else n.split(":")[0] for n in group[f"note_{p}"]}
            row[f"latency_status_{p}"] = "ok" if statuses == {"ok"} else "; ".join(sorted(statuses))
            row[f"hardware_{p}"] = "; ".join(sorted(set(group.get(f"hardware_{p}", pd.Series()).dropna())))
        notes += [f"{p}: {n}" for p in profiles for n in sorted(set(group[f"note_{p}"].dropna()))]
        # a deployed form that ran its gates as ATen ops (no compiler where it was timed) is slower than it
        # needs to be: say so beside its speed-up
        notes += [f"{p}: deployed gates ran as ATen ops, not the compiled ops ({k})" for p in profiles
                  for k in sorted({k for k in group.get(f"gate_kernel_{p}", pd.Series()).dropna()
                                   if not str(k).startswith("compiled")})]
        # the regime of a dynamic method's speed-up: every block dense-then-mask (no slice is ever looked
        # up), or gathered blocks with the slice cache's first-pass hit rate on test instances it had not seen
        for p in profiles:
            regimes = set(group.get(f"regime_{p}", pd.Series()).dropna())
            rates = group.get(f"hit_rate_{p}", pd.Series()).dropna()
            if regimes == {"dense-then-mask"}:
                notes.append(f"{p}: every block ran dense-then-mask (gates and masks on full-width convolutions)")
            elif regimes:
                span = f"{rates.min():.2f}" if len(rates) and rates.min() == rates.max() else \
                    f"{rates.min():.2f}-{rates.max():.2f}" if len(rates) else "n/a"
                notes.append(f"{p}: gathered blocks, first-pass slice-cache hit rate {span} (planned and warmed "
                             f"on validation instances, timed on test instances)")
        row["notes"] = "; ".join(n for n in notes if n)
        out.append(row)
    table = pd.DataFrame(out)
    table["is_dense"] = table["budget_pct"].isna()
    table = table.sort_values(["backbone", "is_dense", "budget_pct", "method"],
                              ascending=[True, False, True, True], kind="stable")
    return table.drop(columns="is_dense").reset_index(drop=True)



def write_per_seed(runs: "pd.DataFrame", out_csv: Path, profiles: list[str]) -> Path:
    """One row per run: identity, accuracy, MACs, training budget, latency per profile (tidy CSV)."""
    columns = ["dataset", "backbone", "method", "registered_method", "budget", "seed", "test_top1", "test_top5",
               "top1_err", "top5_err", "top1_gap", "top5_gap", "macs_m", "macs_reduction_pct", "epochs",
               "optimizer_steps", *optional_present(runs)]
    for p in profiles:
        columns.append(f"speedup_{p}")
        for key in latency_keys(runs.columns, p):
            columns += [f"{key}_{p}", f"{key}_iqr_{p}"]
        columns += [f"macs_ratio_{p}", f"hit_rate_{p}", f"note_{p}", f"gate_kernel_{p}", f"hardware_{p}"]
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    runs.reindex(columns=columns + ["run_dir"]).sort_values(
        ["backbone", "budget", "method", "seed"], na_position="first", kind="stable").to_csv(
        out_csv, index=False, float_format="%.4f")
    return out_csv
