"""Tables and plots, built from run folders alone.

Results are files first: every number here comes from a run's
``metrics.json``, ``instances_test.csv`` and ``latency_{profile}.json``; a
table never reads a tracking server. The commands that call this module live
in ``manidp/cli/report.py``:

``manidp table``
    ``results/{dataset}_table.csv`` (tidy, one row per method x budget: error,
    drops to dense, MACs and their reduction as mean and standard deviation
    over seeds with the number of seeds, the training budget, validation
    accuracies a method records, speed-up and latency per hardware profile,
    each of the paper's reported rows on our row of the same method and
    operating point); beside it ``.md`` / ``.tex`` in the paper's layout
    (:mod:`manidp.paper_layout`), ``.html`` (the same, for Snakemake's
    report) and ``_full.md`` with every column.
    ``--per-seed`` writes one row per run.
``manidp plot``
    accuracy vs MACs (error bars over seeds, paper points hollow), for
    dynamic methods per-instance MACs against difficulty (severity where the
    dataset has it, else quintiles of the dense model's per-instance loss),
    and with ``--speedup`` accuracy vs measured speed-up per profile.
``manidp tuning-table``
    the recipe sweep on validation-only runs: mean/std/n per configuration
    and the chosen recipe per method. It refuses any run that holds test
    numbers.
Drops to dense are taken per seed (a method's error minus the error of the
dense model it was fine-tuned from), then averaged.
"""
from __future__ import annotations

import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional

from manidp.errors import UserError

__all__ = ["load_runs", "summarize_runs", "reported_rows", "attach_reported", "build_table", "to_markdown",
           "to_latex", "write_table", "write_per_seed", "tuning_table", "find_profiles", "plot_pareto",
           "plot_macs_vs_difficulty", "plot_speedup"]

#: Per-run quantities averaged over seeds, and how each is labelled in the md/tex tables.
MEASURES = {
    "top1_err": "Top-1 err. (%)",
    "top5_err": "Top-5 err. (%)",
    "top1_gap": "Top-1 drop",
    "top5_gap": "Top-5 drop",
    "macs_m": "MACs (M)",
    "macs_reduction_pct": "MACs red. (%)",
}
#: Validation top-1 some methods record (soft pruning: masked vs physically pruned model; ManiDP: around its
#: budget calibration), at the top level of metrics.json or in its method description. Shown where present.
OPTIONAL_VAL = {
    "val_top1_masked": "Val top-1 masked (%)",
    "val_top1_pruned": "Val top-1 pruned (%)",
    "val_top1_before_calibration": "Val top-1 before calib. (%)",
    "val_top1_after_calibration": "Val top-1 after calib. (%)",
}
#: Our configured method name -> the paper's names for the same method (Tables 1 and 4).
PAPER_NAMES = {"dense": ("Baseline",), "manidp": ("ManiDP", "ManiDP-A", "ManiDP-B"), "fpgm": ("FPGM",),
               "sfp": ("SFP",), "channel_gating": ("CGNet",), "fbs": ("FBS",)}
#: A paper row sits on our row when its FLOPs reduction is within this many points of our budget.
PAPER_TOLERANCE_PCT = 5.0
_RUN_FOLDER = re.compile(r"^(?P<label>.+)-b(?P<budget>[0-9.]+)$")
_PAPER_TABLES = "reference/paper_tables.csv"
_DASH = "–"
_TEXT_COLUMNS = {"Backbone", "Method", "Type", "Paper method", "Source"}  # left-aligned; the rest are numbers


# ----------------------------------------------------------------- loading run folders
def _read_json(path: Path) -> dict:
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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value) -> float:
    return float(value) if _is_number(value) else math.nan


def _label(run_dir: Path, metrics: dict) -> str:
    """The method's name as configured: the run folder's name without its budget suffix.

    It differs from the registered method when a config entry runs a method
    with other options (an ablation named by the user).
    """
    match = _RUN_FOLDER.match(run_dir.parent.name)
    return match["label"] if match and metrics["budget"] is not None else run_dir.parent.name


def _recorded(metrics: dict, key: str) -> float:
    """A number a method may record, at the top level of metrics.json or in its method description."""
    info = metrics.get("method_info") if isinstance(metrics.get("method_info"), dict) else {}
    for place in (metrics, info, *(v for v in info.values() if isinstance(v, dict))):
        if _is_number(place.get(key)):
            return float(place[key])
    return math.nan


def _training_budget(metrics: dict) -> tuple[float, float]:
    """(epochs, optimizer steps) the run was given; steps NaN where neither recorded nor computable."""
    config = metrics.get("config") if isinstance(metrics.get("config"), dict) else {}
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    epochs = _number(train.get("epochs", metrics.get("epochs_trained")))
    steps = _number(metrics.get("optimizer_steps"))
    n_train, batch = metrics.get("train_instances"), train.get("batch_size")
    if math.isnan(steps) and _is_number(n_train) and _is_number(batch) and n_train > 0 and not math.isnan(epochs):
        steps = epochs * (n_train // min(batch, n_train))  # the engine drops the last partial batch
    return epochs, steps


def _iqr(values) -> float:
    """Interquartile range of a list of repeat times (NaN without at least two)."""
    import numpy as np

    if not isinstance(values, list) or sum(_is_number(v) for v in values) < 2:
        return math.nan
    p25, p75 = np.percentile([v for v in values if _is_number(v)], [25, 75])
    return float(p75 - p25)


def _hardware(report: dict) -> Optional[str]:
    """The measuring machine as the latency file describes it (its ``profile`` fields, whatever they are)."""
    profile = report.get("profile")
    if not isinstance(profile, dict):
        return None
    fields = [f"{key} {value}" for key, value in profile.items()
              if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip()]
    return ", ".join(fields) or None


def _latency(path: Path) -> tuple[dict, str]:
    """(numbers, status) of one latency file: the speed-up and every ``*_ms`` median with its IQR over repeats.

    Later versions of the file may add timings (an optimized dense reference,
    spreads); every ``*_ms`` number present is taken, nothing is assumed.
    ``numbers["hardware"]`` describes the machine where the file says.
    """
    if not path.is_file():
        return {}, "not measured"
    report = _read_json(path)
    if report.get("status") == "unavailable":
        return {"hardware": _hardware(report)}, f"unavailable: {report.get('reason', 'no reason given')}"
    if not _is_number(report.get("speedup")):
        raise UserError(f"{path} has no numeric 'speedup'; delete it and re-run its latency step")
    numbers = {"speedup": float(report["speedup"])}
    for key, value in report.items():
        if key.endswith("_ms") and _is_number(value):
            numbers[key] = float(value)
            spread = _iqr(report.get(f"{key}_repeats"))
            numbers[f"{key}_iqr"] = spread if not math.isnan(spread) else _number(report.get(f"{key}_iqr"))
    if _is_number(report.get("macs_ratio")):
        numbers["macs_ratio"] = float(report["macs_ratio"])
    numbers["hardware"] = _hardware(report)
    if isinstance(report.get("gate_kernel"), str):  # which gate form the deployed model ran (manidp.kernels)
        numbers["gate_kernel"] = report["gate_kernel"]
    if _is_number(report.get("first_pass_hit_rate")):  # slice-cache hits of the timed instances' first pass
        numbers["hit_rate"] = float(report["first_pass_hit_rate"])
    summary = report.get("dispatch_summary")
    if isinstance(summary, dict):  # the regime the speed-up was measured in
        numbers["regime"] = "dense-then-mask" if not summary.get("gathered") else "gathered"
    return numbers, "ok"


def find_profiles(run_dirs: Iterable[str | Path]) -> list[str]:
    """Hardware profiles with a ``latency_{profile}.json`` in any of the run folders."""
    return sorted({p.name[len("latency_"):-len(".json")] for d in run_dirs for p in Path(d).glob("latency_*.json")})


def load_runs(run_dirs: Iterable[str | Path], profiles: Iterable[str] = ()) -> "pd.DataFrame":
    """One row per run folder: identity, accuracy, MACs, training budget, latency per profile."""
    import pandas as pd

    profiles = list(profiles)
    rows = []
    for run_dir in map(Path, run_dirs):
        m = _read_json(run_dir / "metrics.json")
        missing = [k for k in ("dataset", "backbone", "method", "budget", "seed", "dynamic", "test_top1",
                               "test_top5", "macs", "macs_dense", "macs_reduction", "params") if k not in m]
        if missing:
            raise UserError(f"{run_dir / 'metrics.json'} lacks {', '.join(missing)}: it is not a finished "
                            f"test-evaluated run (validation-only runs go to manidp tuning-table)")
        info = m.get("method_info") if isinstance(m.get("method_info"), dict) else {}
        epochs, steps = _training_budget(m)
        row = {
            "dataset": m["dataset"], "backbone": m["backbone"], "method": _label(run_dir, m),
            "registered_method": m["method"], "dynamic": bool(m["dynamic"]), "budget": m["budget"],
            "seed": m["seed"], "test_top1": m["test_top1"], "test_top5": m["test_top5"],
            "top1_err": 100.0 - m["test_top1"], "top5_err": 100.0 - m["test_top5"],
            "macs_m": m["macs"] / 1e6, "macs_dense_m": m["macs_dense"] / 1e6,
            "macs_reduction_pct": 100.0 * m["macs_reduction"],
            "macs_theoretical": bool(info.get("macs_theoretical", False)),
            "variant": info.get("variant") if isinstance(info.get("variant"), str) else None,
            "title": info.get("title") if isinstance(info.get("title"), str) else None,
            "epochs": epochs, "optimizer_steps": steps,
            **{key: _recorded(m, key) for key in OPTIONAL_VAL},
            "spearman_macs_severity": m.get("spearman_macs_severity"),
            "spearman_macs_dense_loss": m.get("spearman_macs_dense_loss"),
            "params_m": m["params"] / 1e6, "wall_time_s": m.get("wall_time_s"), "run_dir": str(run_dir),
        }
        for profile in profiles:
            # The dense model is the reference every speed-up is measured against.
            numbers, status = ({"speedup": 1.0}, "ok") if m["budget"] is None else \
                _latency(run_dir / f"latency_{profile}.json")
            row.update({f"{name}_{profile}": value for name, value in numbers.items()})
            row[f"speedup_{profile}"] = numbers.get("speedup", math.nan)
            row[f"note_{profile}"] = None if status == "ok" else status
        rows.append(row)
    if not rows:
        raise UserError("no run folders given: pass --runs DIR ...")
    runs = pd.DataFrame(rows)
    dense = runs[runs["budget"].isna()].set_index(["backbone", "seed"])
    for metric in ("top1", "top5"):
        reference = runs.set_index(["backbone", "seed"]).index.map(dense[f"{metric}_err"].to_dict())
        runs[f"{metric}_gap"] = runs[f"{metric}_err"] - reference.to_numpy(dtype=float)
    return runs


def _latency_columns(columns: Iterable[str], profile: str) -> list[str]:
    """The ``*_ms`` latency keys present for a profile, deployed first, then dense, then the rest."""
    suffix = f"_{profile}"
    keys = [c[:-len(suffix)] for c in columns if c.endswith(suffix) and c[:-len(suffix)].endswith("_ms")]
    return sorted(keys, key=lambda k: ({"deployed_ms": 0, "dense_ms": 1}.get(k, 2), keys.index(k)))


def _optional_present(table: "pd.DataFrame") -> list[str]:
    return [k for k in OPTIONAL_VAL if k in table and table[k].notna().any()]


def summarize_runs(runs: "pd.DataFrame", profiles: Iterable[str] = ()) -> "pd.DataFrame":
    """Mean and standard deviation over seeds per (backbone, method, budget)."""
    import pandas as pd

    profiles = list(profiles)
    latency = {p: _latency_columns(runs.columns, p) for p in profiles}
    measures = list(MEASURES) + _optional_present(runs) + [f"speedup_{p}" for p in profiles] + [
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


# ----------------------------------------------------------------- the paper's rows
def _canonical_backbone(name: str) -> str:
    """The paper names CIFAR ResNets plainly (resnet56); ours are registered as cifar_resnet56."""
    return name.removeprefix("cifar_")


def reported_rows(dataset: str, backbones: Iterable[str]) -> "pd.DataFrame":
    """The paper's reported rows for ``dataset`` on ``backbones``, in ``paper_*`` columns.

    A row's drop is its reported top-1 (top-5) error minus the reported error
    of the same table's baseline on that backbone, the definition our drops
    use (the paper's printed gaps disagree with its errors in two rows; the
    notes say which).
    """
    import pandas as pd

    paper = pd.read_csv(resources.files("manidp").joinpath(_PAPER_TABLES).open())
    ours = {_canonical_backbone(b): b for b in backbones}
    paper = paper[(paper["dataset"] == dataset) & paper["backbone"].isin(ours)].reset_index(drop=True)
    baseline = paper[paper["method"].isin(PAPER_NAMES["dense"])].set_index(["table", "backbone"])
    where = pd.MultiIndex.from_frame(paper[["table", "backbone"]])
    return pd.DataFrame({
        "dataset": dataset,
        "backbone": paper["backbone"].map(ours),
        "paper_method": paper["method"],
        "paper_dynamic": paper["dynamic"].map({"yes": "dynamic", "no": "static"}).fillna("dense"),
        "paper_top1_err": paper["top1_err"], "paper_top5_err": paper["top5_err"],
        "paper_top1_drop": paper["top1_err"] - baseline["top1_err"].reindex(where).to_numpy(),
        "paper_top5_drop": paper["top5_err"] - baseline["top5_err"].reindex(where).to_numpy(),
        "paper_macs_reduction_pct": paper["flops_reduction_pct"],
        "paper_note": paper["note"].fillna(""),
        "paper_reference": "paper Table " + paper["table"].astype(str),
    })


def attach_reported(ours: "pd.DataFrame", reported: "pd.DataFrame",
                    tolerance_pct: float = PAPER_TOLERANCE_PCT) -> "pd.DataFrame":
    """Our rows with the paper's row of the same method and operating point beside each; then the rest.

    A paper row matches one of ours when it is the same method (``PAPER_NAMES``)
    on the same backbone and its FLOPs reduction lies within ``tolerance_pct``
    points of our budget (0 for dense); the closest pairs are taken first, each
    row used once. Unmatched paper rows follow our rows of their backbone,
    labelled reported, with our columns empty.
    """
    import pandas as pd

    pairs = []
    for i, row in ours.iterrows():
        point = 0.0 if pd.isna(row["budget_pct"]) else row["budget_pct"]
        for j, paper in reported.iterrows():
            if paper["backbone"] == row["backbone"] and paper["paper_method"] in PAPER_NAMES.get(row["method"], ()):
                distance = abs(paper["paper_macs_reduction_pct"] - point)
                if distance <= tolerance_pct + 1e-9:
                    pairs.append((distance, i, j))
    matched = {}
    for _, i, j in sorted(pairs):
        if i not in matched and j not in matched.values():
            matched[i] = j
    paper_columns = [c for c in reported.columns if c.startswith("paper_")]
    ours = ours.copy()
    for column in paper_columns:
        ours[column] = [reported.at[matched[i], column] if i in matched else None for i in ours.index]
    ours["top1_drop_vs_paper"] = ours["top1_gap"] - pd.to_numeric(ours["paper_top1_drop"], errors="coerce")
    ours["macs_reduction_vs_paper"] = ours["macs_reduction_pct"] - pd.to_numeric(
        ours["paper_macs_reduction_pct"], errors="coerce")
    rest = reported.drop(index=list(matched.values())).assign(
        source="reported", method=lambda r: r["paper_method"], dynamic=lambda r: r["paper_dynamic"])
    blocks = []
    for backbone in ours["backbone"].unique():
        blocks += [ours[ours["backbone"] == backbone], rest[rest["backbone"] == backbone]]
    return pd.concat([b for b in blocks if len(b)], ignore_index=True)[list(ours.columns)]


def build_table(runs: "pd.DataFrame", profiles: Iterable[str] = (),
                tolerance_pct: float = PAPER_TOLERANCE_PCT) -> "pd.DataFrame":
    """Our rows per backbone with matched paper rows beside them; each backbone's other reported rows after."""
    ours = summarize_runs(runs, profiles)
    reported = reported_rows(ours["dataset"].iloc[0], ours["backbone"].unique())
    return attach_reported(ours, reported, tolerance_pct)


# ----------------------------------------------------------------- writing tables
def _fmt(mean, std=math.nan, digits: int = 2, signed: bool = False) -> str:
    if mean is None or not _is_number(mean):
        return _DASH
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if std is None or not _is_number(std) else f"{text} ± {std:.{digits}f}"


def _count(value) -> str:
    return f"{value:g}" if _is_number(value) else _DASH


def _display(table: "pd.DataFrame", profiles: list[str]) -> "pd.DataFrame":
    """The table as the md/tex versions show it: one string per cell, in the paper's layout."""
    import pandas as pd

    optional = _optional_present(table)
    latency = {p: _latency_columns(table.columns, p) for p in profiles}
    with_paper = "paper_method" in table and table["paper_method"].notna().any()
    rows = []
    for _, r in table.iterrows():
        ours = r["source"] == "ours"
        cells = {"Backbone": r["backbone"], "Method": r["method"], "Type": r["dynamic"],
                 "Budget (%)": _count(r["budget_pct"]) if ours else _DASH,
                 "Epochs": _count(r["epochs"]) if ours else _DASH,
                 "Steps": _count(r["optimizer_steps"]) if ours else _DASH}
        for measure, label in {**MEASURES, **{k: OPTIONAL_VAL[k] for k in optional}}.items():
            cells[label] = _fmt(r[measure], r[f"{measure}_std"], 3 if measure == "macs_m" else 2) if ours else _DASH
        for p in profiles:
            status = r.get(f"latency_status_{p}")
            cells[f"Speed-up {p}"] = _fmt(r[f"speedup_{p}"], r[f"speedup_{p}_std"]) if ours else _DASH
            if ours and cells[f"Speed-up {p}"] == _DASH and isinstance(status, str):
                cells[f"Speed-up {p}"] = status
            for key in latency[p]:
                label = {"deployed_ms": f"Latency {p} (ms)", "dense_ms": f"Dense {p} (ms)"}.get(
                    key, f"{key.removesuffix('_ms').replace('_', ' ')} {p} (ms)")
                text = _fmt(r[f"{key}_{p}"], digits=3) if ours else _DASH
                spread = r.get(f"{key}_iqr_{p}")
                cells[label] = text + (f" (IQR {spread:.3f})" if text != _DASH and _is_number(spread) else "")
        cells["n"] = str(int(r["n_seeds"])) if ours else _DASH
        matched = with_paper and isinstance(r["paper_method"], str)
        if with_paper:
            cells.update({
                "Paper method": r["paper_method"] if matched else _DASH,
                "Top-1 err. reported (%)": _fmt(r["paper_top1_err"]),
                "Top-1 drop reported": _fmt(r["paper_top1_drop"]),
                "MACs red. reported (%)": _fmt(r["paper_macs_reduction_pct"], digits=1),
                "Top-1 drop, ours - reported": _fmt(r["top1_drop_vs_paper"], signed=True),
                "MACs red., ours - reported": _fmt(r["macs_reduction_vs_paper"], digits=1, signed=True),
            })
        cells["Source"] = "ours" + (f" + reported ({r['paper_reference']})" if matched else "") \
            if ours else f"reported ({r['paper_reference']})"
        rows.append(cells)
    return pd.DataFrame(rows)


def _budget_statement(table: "pd.DataFrame") -> str:
    """The training budget the rows were given, in one sentence."""
    ours = table[table["source"] == "ours"]
    parts, finetune = [], set()
    for label, rows in (("dense training", ours[ours["budget_pct"].isna()]),
                        ("fine-tuning", ours[ours["budget_pct"].notna()])):
        order = {(_count(e), _count(s)): (_number(e), _number(s)) for e, s in zip(rows["epochs"],
                                                                                rows["optimizer_steps"])}
        budgets = sorted(order, key=lambda b: [math.inf if math.isnan(v) else v for v in order[b]])
        if label == "fine-tuning":
            finetune = budgets
        if budgets:
            parts.append(f"{label} " + ", ".join(
                ("epochs not recorded" if e == _DASH else f"{e} epoch{'' if e == '1' else 's'}") +
                (" (optimizer steps not recorded)" if s == _DASH else f" ({s} optimizer steps)") for e, s in budgets))
    text = "Training budget: " + "; ".join(parts) + "."
    if len(finetune) > 1:
        text += " Fine-tuning budgets differ between rows: see the Epochs and Steps columns."
    return text


def _has_paper(table: "pd.DataFrame") -> bool:
    return (table["source"] == "reported").any() or ("paper_method" in table and table["paper_method"].notna().any())


def _footer(table: "pd.DataFrame", profiles: list[str], tolerance_pct: float) -> tuple[list[str], list[str]]:
    """(what every row's numbers mean, the notes on single rows)."""
    lines = ["Ours: mean ± standard deviation over n seeds; drops are differences to the dense model of the same "
             "seed (percentage points, positive = worse).", _budget_statement(table)]
    if profiles:
        lines.append("Speed-up: dense time / deployed time, both timed side by side (interleaved) in one process "
                     "(a dynamic method's "
                     "deployed form skips pruned channels). Latency: per-instance ms, median over repeats with the "
                     "interquartile range over repeats in brackets, averaged over seeds. 'unavailable': the "
                     "profile's device was absent where it was measured.")
        for p in profiles:
            machines = sorted({m for cell in table.get(f"hardware_{p}", ()) if isinstance(cell, str) and cell
                               for m in cell.split("; ")})
            lines += [f"Profile {p} measured on: {m}." for m in machines]
    if _has_paper(table):
        lines.append(f"Columns and rows marked reported are the paper's printed numbers, not ours (its FLOPs "
                     f"reduction in the MACs column). A paper row sits on our row of the same method when its "
                     f"reduction is within {tolerance_pct:g} points of our budget; its drop is its top-1 error "
                     f"minus its baseline's. Rows in italics are the paper's other rows.")
    else:
        lines.append("The paper reports no results on this dataset.")
    notes = [f"{r['backbone']} {r['method']}: {r['notes']}" for _, r in table.iterrows()
             if isinstance(r.get("notes"), str) and r["notes"]]
    notes += [f"{r['backbone']} {r['paper_method']} (reported): {r['paper_note']}" for _, r in table.iterrows()
              if isinstance(r.get("paper_note"), str) and r["paper_note"]]
    return lines, sorted(set(notes), key=notes.index)


def to_markdown(table: "pd.DataFrame", profiles: list[str], tolerance_pct: float = PAPER_TOLERANCE_PCT) -> str:
    """The table as Markdown (pandas ``to_markdown``): reported rows in italics, what it all means below."""
    shown = _display(table, profiles)
    reported = (table["source"] == "reported").to_numpy()
    shown[reported] = shown[reported].apply(lambda column: column.map(lambda c: c if c == _DASH else f"*{c}*"))
    text = shown.to_markdown(index=False, disable_numparse=True, colalign=[
        "left" if c in _TEXT_COLUMNS else "right" for c in shown.columns])
    lines, notes = _footer(table, profiles, tolerance_pct)
    return "\n\n".join([text, *lines, "\n".join(f"- {n}" for n in notes)]).rstrip() + "\n"


def to_latex(table: "pd.DataFrame", profiles: list[str], dataset: str,
             tolerance_pct: float = PAPER_TOLERANCE_PCT) -> str:
    """The table as a LaTeX ``table*`` (pandas ``Styler.to_latex``, booktabs rules, cells escaped by pandas)."""
    import pandas as pd

    shown = _display(table, profiles)
    reported = (table["source"] == "reported").to_numpy()
    with_paper = _has_paper(table)

    def math_symbols(cell: str) -> str:  # cells arrive escaped by pandas
        return cell.replace("±", r"$\pm$").replace(_DASH, "--")

    styler = (shown.style.hide(axis="index").format(math_symbols, escape="latex")
              .format_index(escape="latex", axis=1)
              .apply(lambda row: ["textit:--rwrap;" if reported[row.name] else ""] * len(row), axis=1))
    tabular = styler.to_latex(hrules=True, column_format="".join(
        "l" if c in _TEXT_COLUMNS else "r" for c in shown.columns))
    notes = pd.DataFrame({"Notes": [line for part in _footer(table, profiles, tolerance_pct) for line in part]})
    notes_tabular = (notes.style.hide(axis="index").hide(axis="columns").format(math_symbols, escape="latex")
                     .to_latex(column_format="p{0.95\\textwidth}"))
    return "\n".join([r"% Needs \usepackage{booktabs}. Written by manidp table from the run folders.",
                      r"\begin{table*}[t]", r"\centering", r"\small", tabular.rstrip(), r"\par\footnotesize",
                      notes_tabular.rstrip(),
                      rf"\caption{{\detokenize{{{dataset}}}: ours, mean $\pm$ std over seeds"
                      + (r"; the paper's reported numbers marked as such.}" if with_paper else ".}"),
                      rf"\label{{tab:{re.sub('[^A-Za-z0-9]', '', dataset)}}}", r"\end{table*}"]) + "\n"


def write_table(table: "pd.DataFrame", out_csv: Path, profiles: list[str], dataset: str,
                tolerance_pct: float = PAPER_TOLERANCE_PCT) -> list[Path]:
    """The tidy CSV; beside it (same stem) the paper-layout Markdown and LaTeX
    (:mod:`manidp.paper_layout`) and ``{stem}_full.md`` with every column."""
    from manidp.paper_layout import to_paper_html, to_paper_latex, to_paper_markdown

    out_csv.parent.mkdir(parents=True, exist_ok=True)
    full = out_csv.with_name(f"{out_csv.stem}_full.md")
    paths = [out_csv, out_csv.with_suffix(".md"), out_csv.with_suffix(".tex"), full, out_csv.with_suffix(".html")]
    table.to_csv(paths[0], index=False, float_format="%.4f")
    paths[1].write_text(to_paper_markdown(table, profiles, full.name))
    paths[2].write_text(to_paper_latex(table, profiles, dataset, full.name))
    paths[3].write_text(to_markdown(table, profiles, tolerance_pct))
    paths[4].write_text(to_paper_html(table, profiles, dataset, full.name))
    return paths


def write_per_seed(runs: "pd.DataFrame", out_csv: Path, profiles: list[str]) -> Path:
    """One row per run: identity, accuracy, MACs, training budget, latency per profile (tidy CSV)."""
    columns = ["dataset", "backbone", "method", "registered_method", "budget", "seed", "test_top1", "test_top5",
               "top1_err", "top5_err", "top1_gap", "top5_gap", "macs_m", "macs_reduction_pct", "epochs",
               "optimizer_steps", *_optional_present(runs)]
    for p in profiles:
        columns.append(f"speedup_{p}")
        for key in _latency_columns(runs.columns, p):
            columns += [f"{key}_{p}", f"{key}_iqr_{p}"]
        columns += [f"macs_ratio_{p}", f"hit_rate_{p}", f"note_{p}", f"gate_kernel_{p}", f"hardware_{p}"]
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    runs.reindex(columns=columns + ["run_dir"]).sort_values(
        ["backbone", "budget", "method", "seed"], na_position="first", kind="stable").to_csv(
        out_csv, index=False, float_format="%.4f")
    return out_csv


# ----------------------------------------------------------------- the recipe sweep (validation only)
def _validation_run(run_dir: Path) -> dict:
    """One sweep run's configuration and validation numbers; refuses anything that saw the test split."""
    path = run_dir / "metrics.json"
    m = _read_json(path)
    test_keys = sorted(k for k in m if k.startswith("test_"))
    if test_keys or (run_dir / "instances_test.csv").exists():
        held = ", ".join(test_keys) if test_keys else "instances_test.csv"
        raise UserError(f"{run_dir} holds test-split results ({held}): recipes are chosen on validation only; "
                        f"sweep with validation-only runs (--set eval_splits=[val])")
    if not (_is_number(m.get("val_top1")) and _is_number(m.get("val_macs_reduction"))):
        raise UserError(f"{path} lacks val_top1 or val_macs_reduction: the tuning table needs each run's "
                        f"validation numbers; re-run it to the end")
    config = m.get("config")
    train = config.get("train") if isinstance(config, dict) else None
    if not isinstance(train, dict) or not _is_number(train.get("lr")) or not all(
            k in config for k in ("method", "budget", "method_options", "seed")):
        raise UserError(f"{path} lacks the resolved config (method, budget, method_options, seed, train.lr): "
                        f"re-run it with this version of manidp train")
    return {"method": config["method"], "budget": config["budget"], "lr": float(train["lr"]),
            "method_options": json.dumps(config["method_options"] or {}, sort_keys=True),
            "seed": config["seed"], "val_top1": float(m["val_top1"]),
            "val_macs_reduction": float(m["val_macs_reduction"]), "run_dir": str(run_dir)}


def tuning_table(run_dirs: Iterable[str | Path], tolerance: float = 0.02) -> "pd.DataFrame":
    """Mean/std/n of validation top-1 and reduction per (method, budget, lr, method_options); the choice per method.

    The chosen recipe of a method (at a budget) is the configuration with the
    highest mean validation top-1 among those whose mean validation MACs
    reduction lies within ``tolerance`` of the budget; where none does, the
    one closest to the budget, flagged as a fallback.
    """
    import pandas as pd

    if not _is_number(tolerance) or tolerance < 0:
        raise UserError(f"--tolerance must be a non-negative fraction of the dense MACs (got {tolerance})")
    runs = pd.DataFrame([_validation_run(Path(d)) for d in run_dirs])
    if runs.empty:
        raise UserError("no run folders given: pass --runs DIR ...")
    keys = ["method", "budget", "lr", "method_options"]
    twice = runs[runs.duplicated(keys + ["seed"], keep=False)]
    if len(twice):
        raise UserError("two run folders hold the same configuration and seed (" + ", ".join(twice["run_dir"]) +
                        "): pass each run once")
    rows = []
    for (method, budget, lr, options), group in runs.groupby(keys, dropna=False, sort=True):
        target = 0.0 if pd.isna(budget) else float(budget)
        reduction = group["val_macs_reduction"].mean()
        rows.append({"method": method, "budget": None if pd.isna(budget) else budget, "lr": lr,
                     "method_options": options, "n_seeds": len(group),
                     "seeds": " ".join(str(s) for s in sorted(group["seed"])),
                     "val_top1_mean": group["val_top1"].mean(), "val_top1_std": group["val_top1"].std(ddof=1),
                     "val_macs_reduction_mean": reduction,
                     "val_macs_reduction_std": group["val_macs_reduction"].std(ddof=1),
                     "budget_gap": abs(reduction - target),
                     "within_tolerance": abs(reduction - target) <= tolerance + 1e-9,  # 0.4 - 0.3 > 0.1 in floats
                     "chosen": False, "fallback": False, "choice": "", "runs": " ".join(group["run_dir"])})
    table = pd.DataFrame(rows)
    for _, group in table.groupby(["method", "budget"], dropna=False, sort=False):
        within = group[group["within_tolerance"]]
        if len(within):
            best = within.sort_values("val_top1_mean", ascending=False, kind="stable").index[0]
            table.loc[best, "choice"] = f"highest validation top-1 within {tolerance:g} of the budget"
        else:
            best = group.sort_values(["budget_gap", "val_top1_mean"], ascending=[True, False], kind="stable").index[0]
            table.loc[best, "choice"] = (f"FALLBACK: no configuration within {tolerance:g} of the budget; "
                                         f"closest validation reduction")
            table.loc[best, "fallback"] = True
        table.loc[best, "chosen"] = True
    return table.drop(columns="budget_gap")


# ----------------------------------------------------------------- plots
def _figure(n_panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(7 * n_panels, 4.5), squeeze=False)
    return plt, fig, axes[0]


def _styles(methods: list[str]) -> dict:
    """(color, marker) per method; the dense reference is always a black star."""
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors + matplotlib.colormaps["Dark2"].colors
    markers = "osD^v<>pXh"
    others = [m for m in methods if m != "dense"]
    styles = {m: (colors[i % len(colors)], markers[i % len(markers)]) for i, m in enumerate(others)}
    return {**styles, "dense": ("black", "*")}


def plot_pareto(runs: "pd.DataFrame", out: Path, dataset: str) -> None:
    """Top-1 accuracy against MACs (% of dense), one panel per backbone."""
    table = summarize_runs(runs)
    reported = reported_rows(dataset, table["backbone"].unique())
    backbones = list(table["backbone"].unique())
    plt, fig, axes = _figure(len(backbones))
    style = _styles(sorted(table["method"].unique()))
    for ax, backbone in zip(axes, backbones):
        ours = table[table["backbone"] == backbone]
        for method, group in ours.groupby("method", sort=True):
            color, marker = style[method]
            ax.errorbar(100 - group["macs_reduction_pct"], 100 - group["top1_err"],
                        xerr=group["macs_reduction_pct_std"].fillna(0), yerr=group["top1_err_std"].fillna(0),
                        fmt=marker, color=color, capsize=3, label=method, markersize=11 if method == "dense" else 7,
                        linestyle="-" if len(group) > 1 else "none")
        paper = reported[reported["backbone"] == backbone]
        if len(paper):
            ax.scatter(100 - paper["paper_macs_reduction_pct"], 100 - paper["paper_top1_err"], facecolors="none",
                       edgecolors="0.35", marker="s", s=50, label="paper, reported (hollow)")
            for _, r in paper.iterrows():
                ax.annotate(r["paper_method"], (100 - r["paper_macs_reduction_pct"], 100 - r["paper_top1_err"]),
                            fontsize=7, color="0.35", xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("MACs (% of the dense model)")
        ax.set_ylabel("test top-1 accuracy (%)")
        _finish_axes(ax, f"{dataset} / {backbone}")
    _save_figure(fig, "Accuracy vs MACs, mean ± std over seeds", out)


def _difficulty(instances: "pd.DataFrame", dense: Optional["pd.DataFrame"]) -> tuple["pd.Series", str]:
    """Severity where the dataset has it; otherwise quintiles of the dense model's loss."""
    import pandas as pd

    if "severity" in instances:
        return instances["severity"], "corruption severity"
    if dense is None or len(dense) != len(instances):
        raise UserError("per-instance difficulty needs a severity column or the dense run's instances_test.csv")
    return pd.qcut(dense["loss"].rank(method="first"), 5, labels=False), "dense-model loss quintile (0 = easiest)"


def plot_macs_vs_difficulty(runs: "pd.DataFrame", out: Path, dataset: str) -> None:
    """Mean per-instance MACs (% of dense) at each difficulty level, dynamic methods only."""
    import pandas as pd

    dynamic = runs[runs["dynamic"] & runs["budget"].notna()]
    backbones = list(dynamic["backbone"].unique()) or [None]
    plt, fig, axes = _figure(len(backbones))
    if dynamic.empty:
        axes[0].text(0.5, 0.5, "no dynamic method in this run set:\nevery instance uses the same MACs",
                     ha="center", va="center")
        axes[0].set_axis_off()
    style = _styles(sorted(runs["method"].unique()))  # the same colors as the pareto plot
    dense_instances = {(r["backbone"], r["seed"]): Path(r["run_dir"]) / "instances_test.csv"
                       for _, r in runs[runs["budget"].isna()].iterrows()}
    xlabel = "difficulty"
    for ax, backbone in zip(axes, backbones):
        if backbone is None:
            break
        ours = dynamic[dynamic["backbone"] == backbone]
        for (method, budget), group in ours.groupby(["method", "budget"]):
            curves = []
            for _, run in group.iterrows():
                instances = pd.read_csv(Path(run["run_dir"]) / "instances_test.csv")
                dense_file = dense_instances.get((backbone, run["seed"]))
                dense = pd.read_csv(dense_file) if dense_file and dense_file.is_file() else None
                level, xlabel = _difficulty(instances, dense)
                curves.append(100 * instances["macs"].groupby(level).mean() / (run["macs_dense_m"] * 1e6))
            curve = pd.concat(curves, axis=1)
            color, marker = style[method]
            ax.errorbar(curve.index, curve.mean(axis=1), yerr=curve.std(axis=1, ddof=1).fillna(0), color=color,
                        marker=marker, capsize=3, linestyle="-" if budget == ours["budget"].min() else "--",
                        label=f"{method} @ {100 * budget:g} %")
        ax.set_xlabel(xlabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("mean per-instance MACs (% of dense)")
        _finish_axes(ax, f"{dataset} / {backbone}")
    _save_figure(fig, "Per-instance MACs vs difficulty, mean ± std over seeds", out)


def plot_speedup(runs: "pd.DataFrame", out: Path, dataset: str, profiles: list[str]) -> None:
    """Top-1 accuracy against measured speed-up, one panel per backbone and hardware profile.

    Hollow markers: the speed-up the MACs reduction alone would give (dense
    MACs / MACs), the ceiling a deployed form can approach. A profile whose
    device was absent says so in its panel instead of plotting anything.
    """
    if not profiles:
        raise UserError("--speedup needs latency_{profile}.json files in the run folders: run the latency step "
                        "first")
    table = summarize_runs(runs, profiles)
    panels = [(b, p) for b in table["backbone"].unique() for p in profiles]
    plt, fig, axes = _figure(len(panels))
    style = _styles(sorted(table["method"].unique()))
    for ax, (backbone, profile) in zip(axes, panels):
        ours = table[table["backbone"] == backbone]
        measured = ours[ours[f"speedup_{profile}"].notna()]
        missing = ours[ours[f"speedup_{profile}"].isna()]
        for method, group in measured.groupby("method", sort=True):
            color, marker = style[method]
            accuracy = 100 - group["top1_err"]
            ax.errorbar(group[f"speedup_{profile}"], accuracy, xerr=group[f"speedup_{profile}_std"].fillna(0),
                        yerr=group["top1_err_std"].fillna(0), fmt=marker, color=color, capsize=3, label=method,
                        markersize=11 if method == "dense" else 7, linestyle="-" if len(group) > 1 else "none")
            if method != "dense":
                ax.scatter(100 / (100 - group["macs_reduction_pct"]), accuracy, facecolors="none", edgecolors=color,
                           marker=marker, s=45)
        ax.axvline(1.0, color="0.6", linestyle=":", label="dense speed; hollow: MACs-ratio ceiling")
        if len(missing):
            ax.text(0.02, 0.02, "no measurement: " + "; ".join(
                f"{r['method']} @ {r['budget_pct']:g} % ({r[f'latency_status_{profile}']})"
                for _, r in missing.iterrows()), transform=ax.transAxes, fontsize=7, va="bottom", wrap=True)
        ax.set_xlabel(f"measured speed-up over dense ({profile}, batch 1)")
        ax.set_ylabel("test top-1 accuracy (%)")
        _finish_axes(ax, f"{dataset} / {backbone} / {profile}")
    _save_figure(fig, "Accuracy vs measured speed-up, mean ± std over seeds", out)


def _finish_axes(ax, title: str) -> None:
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))


def _save_figure(fig, title: str, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------- command line
