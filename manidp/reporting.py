"""Tables, plots and the MLflow summary, built from run folders alone.

Results are files first: every number here comes from a run's
``metrics.json``, ``instances_test.csv`` and ``latency_{profile}.json``; a
table never reads a tracking server. The workflow calls these subcommands:

``manidp table``
    ``results/{dataset}_table.csv`` (tidy, one row per method x budget, plus the
    paper's reported rows for the same dataset and backbone) and ``.md`` /
    ``.tex`` (booktabs) beside it, in the paper's layout: top-1/top-5 error,
    gaps to dense, MACs, MACs reduction, speed-up per hardware profile, each
    as mean and standard deviation over seeds, with the number of seeds.
``manidp plot``
    accuracy vs MACs (error bars over seeds, paper points hollow) and, for
    dynamic methods, per-instance MACs against difficulty (severity where the
    dataset has it, else quintiles of the dense model's per-instance loss).
``manidp tracking-parent`` / ``manidp tracking-summary``
    the MLflow parent run per (dataset, backbone) and the summary run holding
    the tables and plots as artifacts.

Gaps to dense are taken per seed (a method's error minus the error of the dense
model it was fine-tuned from), then averaged.
"""
from __future__ import annotations

import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional

from manidp.cli import register_subcommand
from manidp.errors import UserError

__all__ = ["load_runs", "summarize_runs", "reported_rows", "build_table", "to_markdown", "to_latex", "write_table",
           "plot_pareto", "plot_macs_vs_difficulty"]

#: Per-run quantities averaged over seeds, and how each is labelled in the md/tex tables.
MEASURES = {
    "top1_err": "Top-1 err. (%)",
    "top5_err": "Top-5 err. (%)",
    "top1_gap": "Top-1 gap",
    "top5_gap": "Top-5 gap",
    "macs_m": "MACs (M)",
    "macs_reduction_pct": "MACs red. (%)",
}
_RUN_FOLDER = re.compile(r"^(?P<label>.+)-b(?P<budget>[0-9.]+)$")
_PAPER_TABLES = "reference/paper_tables.csv"


# ----------------------------------------------------------------- loading run folders
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: run the workflow step that writes it first") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); delete it and re-run its step") from None


def _label(run_dir: Path, metrics: dict) -> str:
    """The method's name as configured: the run folder's name without its budget suffix.

    It differs from the registered method when a config entry runs a method
    with other options (an ablation named by the user).
    """
    match = _RUN_FOLDER.match(run_dir.parent.name)
    return match["label"] if match and metrics["budget"] is not None else run_dir.parent.name


def _speedup(path: Path) -> tuple[float, Optional[str]]:
    """(speed-up, note) from a latency file; NaN and the reason when it could not be measured."""
    if not path.is_file():
        return math.nan, "not measured"
    latency = _read_json(path)
    if latency.get("status") == "unavailable":
        return math.nan, f"unavailable: {latency.get('reason', 'no reason given')}"
    return float(latency["speedup"]), None


def load_runs(run_dirs: Iterable[str | Path], profiles: Iterable[str] = ()) -> "pd.DataFrame":
    """One row per run folder: identity, accuracy, MACs, speed-up per profile."""
    import pandas as pd

    profiles = list(profiles)
    rows = []
    for run_dir in map(Path, run_dirs):
        m = _read_json(run_dir / "metrics.json")
        info = m.get("method_info") or {}
        row = {
            "dataset": m["dataset"], "backbone": m["backbone"], "method": _label(run_dir, m),
            "registered_method": m["method"], "dynamic": bool(m["dynamic"]), "budget": m["budget"],
            "seed": m["seed"], "top1_err": 100.0 - m["test_top1"], "top5_err": 100.0 - m["test_top5"],
            "macs_m": m["macs"] / 1e6, "macs_dense_m": m["macs_dense"] / 1e6,
            "macs_reduction_pct": 100.0 * m["macs_reduction"],
            "macs_theoretical": bool(info.get("macs_theoretical", False)),
            "spearman_macs_severity": m.get("spearman_macs_severity"),
            "spearman_macs_dense_loss": m.get("spearman_macs_dense_loss"),
            "params_m": m["params"] / 1e6, "wall_time_s": m.get("wall_time_s"), "run_dir": str(run_dir),
        }
        for profile in profiles:
            # The dense model is the reference every speed-up is measured against.
            speedup, note = (1.0, None) if m["budget"] is None else _speedup(run_dir / f"latency_{profile}.json")
            row[f"speedup_{profile}"] = speedup
            row[f"note_{profile}"] = note
        rows.append(row)
    if not rows:
        raise UserError("no run folders given: pass --runs DIR ...")
    runs = pd.DataFrame(rows)
    dense = runs[runs["budget"].isna()].set_index(["backbone", "seed"])
    for metric in ("top1", "top5"):
        reference = runs.set_index(["backbone", "seed"]).index.map(dense[f"{metric}_err"].to_dict())
        runs[f"{metric}_gap"] = runs[f"{metric}_err"] - reference.to_numpy(dtype=float)
    return runs


def summarize_runs(runs: "pd.DataFrame", profiles: Iterable[str] = ()) -> "pd.DataFrame":
    """Mean and standard deviation over seeds per (backbone, method, budget)."""
    import pandas as pd

    profiles = list(profiles)
    measures = list(MEASURES) + [f"speedup_{p}" for p in profiles] + ["spearman_macs_severity",
                                                                        "spearman_macs_dense_loss"]
    keys = ["dataset", "backbone", "method", "budget"]
    out = []
    for (dataset, backbone, method, budget), group in runs.groupby(keys, dropna=False, sort=False):
        row = {"dataset": dataset, "backbone": backbone, "method": method, "source": "ours",
               "dynamic": "dynamic" if group["dynamic"].iloc[0] else "static",
               "budget_pct": None if pd.isna(budget) else round(100 * budget, 1), "n_seeds": len(group)}
        for measure in measures:
            values = pd.to_numeric(group[measure], errors="coerce")
            row[measure] = values.mean()
            row[f"{measure}_std"] = values.std(ddof=1) if values.notna().sum() > 1 else math.nan
        notes = ["MACs theoretical (per-activation gating; dense kernels skip nothing)"
                 if group["macs_theoretical"].any() else None]
        notes += [f"{p}: {n}" for p in profiles for n in sorted(set(group[f"note_{p}"].dropna()))]
        row["notes"] = "; ".join(n for n in notes if n)
        row["reference"] = ""
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
    """The paper's reported rows for ``dataset`` on ``backbones``, in the table's columns."""
    import pandas as pd

    paper = pd.read_csv(resources.files("manidp").joinpath(_PAPER_TABLES).open())
    ours = {_canonical_backbone(b): b for b in backbones}
    paper = paper[(paper["dataset"] == dataset) & paper["backbone"].isin(ours)]
    dynamic = {"yes": "dynamic", "no": "static"}
    return pd.DataFrame({
        "dataset": dataset,
        "backbone": paper["backbone"].map(ours),
        "method": paper["method"],
        "source": "reported",
        "dynamic": paper["dynamic"].map(dynamic).fillna("dense"),
        "budget_pct": None,
        "n_seeds": None,
        "top1_err": paper["top1_err"], "top5_err": paper["top5_err"],
        "top1_gap": paper["top1_gap"], "top5_gap": paper["top5_gap"],
        "macs_reduction_pct": paper["flops_reduction_pct"],
        "notes": paper["note"].fillna(""),
        "reference": "paper Table " + paper["table"].astype(str),
    })


def build_table(runs: "pd.DataFrame", profiles: Iterable[str] = ()) -> "pd.DataFrame":
    """Our rows per backbone, each backbone's reported rows right after them."""
    import pandas as pd

    ours = summarize_runs(runs, profiles)
    ours.loc[ours["budget_pct"].isna(), "dynamic"] = "dense"
    reported = reported_rows(ours["dataset"].iloc[0], ours["backbone"].unique())
    blocks = []
    for backbone in ours["backbone"].unique():
        blocks += [ours[ours["backbone"] == backbone], reported[reported["backbone"] == backbone]]
    table = pd.concat([b for b in blocks if len(b)], ignore_index=True)
    return table[list(ours.columns)]


# ----------------------------------------------------------------- writing tables
def _fmt(mean, std, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{mean:.{digits}f}"
    return text if std is None or math.isnan(std) else f"{text} ± {std:.{digits}f}"


def _display_rows(table: "pd.DataFrame", profiles: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["Backbone", "Method", "Type", "Budget (%)", *MEASURES.values(),
              *[f"Speed-up {p}" for p in profiles], "Seeds", "Source"]
    rows = []
    for _, r in table.iterrows():
        reported = r["source"] == "reported"
        cells = [r["backbone"], r["method"], r["dynamic"],
                 "–" if r["budget_pct"] is None or math.isnan(r["budget_pct"]) else f"{r['budget_pct']:g}"]
        for measure in MEASURES:
            digits = 3 if measure == "macs_m" else 2
            cells.append(_fmt(r[measure], None if reported else r[f"{measure}_std"], digits))
        cells += [_fmt(r[f"speedup_{p}"], r[f"speedup_{p}_std"]) for p in profiles]
        cells.append("–" if reported else str(int(r["n_seeds"])))
        cells.append(f"reported ({r['reference']})" if reported else "ours")
        rows.append(cells)
    return header, rows


def _notes(table: "pd.DataFrame") -> list[str]:
    notes = [f"{r['backbone']} {r['method']}: {r['notes']}" for _, r in table.iterrows() if r["notes"]]
    return sorted(set(notes), key=notes.index)


def to_markdown(table: "pd.DataFrame", profiles: list[str]) -> str:
    header, rows = _display_rows(table, profiles)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cells, (_, r) in zip(rows, table.iterrows()):
        if r["source"] == "reported":
            cells = [f"*{c}*" if c not in ("–", "") else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± standard deviation over seeds; gaps are differences to the dense model of the same "
              "seed (percentage points, positive = worse). Rows in italics are the paper's reported numbers "
              "(its FLOPs reduction in the MACs column), not ours."]
    if not (table["source"] == "reported").any():
        lines.append("The paper reports no results on this dataset.")
    lines += [f"- {n}" for n in _notes(table)]
    return "\n".join(lines) + "\n"


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    text = "".join(_LATEX_SPECIALS.get(ch, ch) for ch in str(text))
    return text.replace("±", r"$\pm$").replace("–", "--")


def to_latex(table: "pd.DataFrame", profiles: list[str], dataset: str) -> str:
    header, rows = _display_rows(table, profiles)
    lines = [r"% Needs \usepackage{booktabs}. Written by manidp table from the run folders.",
             r"\begin{table*}[t]", r"\centering", r"\small",
             r"\begin{tabular}{lll" + "r" * (len(header) - 4) + "l}", r"\toprule",
             " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
    previous = None
    for cells, (_, r) in zip(rows, table.iterrows()):
        if previous is not None and r["backbone"] != previous:
            lines.append(r"\midrule")
        previous = r["backbone"]
        cells = [_tex(c) for c in cells]
        if r["source"] == "reported":
            cells = [rf"\textit{{{c}}}" for c in cells]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}",
              rf"\caption{{{_tex(dataset)}: mean $\pm$ std over seeds; gaps to the dense model of the same seed. "
              r"Rows in italics are the paper's reported numbers.}}",
              rf"\label{{tab:{re.sub('[^A-Za-z0-9]', '', dataset)}}}", r"\end{table*}"]
    return "\n".join(lines) + "\n"


def write_table(table: "pd.DataFrame", out_csv: Path, profiles: list[str], dataset: str) -> list[Path]:
    """The tidy CSV, and the markdown and LaTeX versions beside it (same stem)."""
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_csv, out_csv.with_suffix(".md"), out_csv.with_suffix(".tex")]
    table.to_csv(paths[0], index=False, float_format="%.4f")
    paths[1].write_text(to_markdown(table, profiles))
    paths[2].write_text(to_latex(table, profiles, dataset))
    return paths


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
            ax.scatter(100 - paper["macs_reduction_pct"], 100 - paper["top1_err"], facecolors="none",
                       edgecolors="0.35", marker="s", s=50, label="paper, reported (hollow)")
            for _, r in paper.iterrows():
                ax.annotate(r["method"], (100 - r["macs_reduction_pct"], 100 - r["top1_err"]), fontsize=7,
                            color="0.35", xytext=(3, 3), textcoords="offset points")
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
def _runs_args(p) -> None:
    p.add_argument("--dataset", required=True)
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR", help="run folders (dense and methods)")


def _table_args(p) -> None:
    _runs_args(p)
    p.add_argument("--profiles", nargs="*", default=[], help="hardware profiles with latency_{profile}.json files")
    p.add_argument("--out", required=True, help="CSV to write; .md and .tex are written beside it")


def _check_dataset(runs, dataset: str) -> None:
    other = sorted(set(runs["dataset"]) - {dataset})
    if other:
        raise UserError(f"--dataset is {dataset} but some run folders hold {', '.join(other)}")


def _table(args) -> int:
    runs = load_runs(args.runs, args.profiles)
    _check_dataset(runs, args.dataset)
    paths = write_table(build_table(runs, args.profiles), Path(args.out), list(args.profiles), args.dataset)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def _plot_args(p) -> None:
    _runs_args(p)
    p.add_argument("--pareto", required=True, help="PNG: accuracy vs MACs")
    p.add_argument("--difficulty", required=True, help="PNG: per-instance MACs vs difficulty")


def _plot(args) -> int:
    runs = load_runs(args.runs)
    _check_dataset(runs, args.dataset)
    plot_pareto(runs, Path(args.pareto), args.dataset)
    plot_macs_vs_difficulty(runs, Path(args.difficulty), args.dataset)
    print(f"wrote {args.pareto}, {args.difficulty}")
    return 0


def _tracking_common(p) -> None:
    p.add_argument("--dataset", required=True)
    p.add_argument("--uri", help="tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///results/mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default: the dataset name, as training runs use)")
    p.add_argument("--out", required=True, help="file to write the run id to (empty with --no-tracking)")
    p.add_argument("--no-tracking", action="store_true", help="tracking is off: write an empty id, touch no store")


def _parent_args(p) -> None:
    _tracking_common(p)
    p.add_argument("--backbone", required=True)


def _parent(args) -> int:
    from manidp import tracking

    run_id = "" if args.no_tracking else tracking.parent_run(args.dataset, args.backbone, args.uri, args.experiment)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(run_id)
    print(f"parent run for {args.dataset}/{args.backbone}: {run_id or '(tracking off)'}")
    return 0


def _summary_args(p) -> None:
    _tracking_common(p)
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR")
    p.add_argument("--profiles", nargs="*", default=[])
    p.add_argument("--artifact", nargs="*", default=[], help="files to attach to the summary run")


def _summary(args) -> int:
    from manidp import tracking

    run_id = ""
    if not args.no_tracking:
        runs = load_runs(args.runs, args.profiles)
        per_run = {}
        for _, r in runs[runs["budget"].notna()].iterrows():
            per_run[r["run_dir"]] = {f"speedup_{p}": r[f"speedup_{p}"] for p in args.profiles
                                     if not math.isnan(r[f"speedup_{p}"])}
        run_id = tracking.log_summary(args.dataset, args.artifact, per_run, args.uri, args.experiment)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(run_id)
    print(f"summary run for {args.dataset}: {run_id or '(tracking off)'}")
    return 0


register_subcommand("table", "per-dataset table (csv, md, tex) from run folders, beside the paper's rows",
                    _table_args, _table)
register_subcommand("plot", "accuracy-vs-MACs and MACs-vs-difficulty plots from run folders", _plot_args, _plot)
register_subcommand("tracking-parent", "find or create the MLflow parent run of a (dataset, backbone)",
                    _parent_args, _parent)
register_subcommand("tracking-summary", "MLflow summary run of a dataset: tables and plots as artifacts",
                    _summary_args, _summary)
