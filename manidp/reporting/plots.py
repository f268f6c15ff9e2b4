"""The plots: accuracy vs MACs, per-instance MACs vs difficulty, accuracy vs measured speed-up.

Paper points are hollow; difficulty is the corruption severity where the
dataset has one, else quintiles of the dense model's per-instance loss.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from manidp.errors import UserError
from manidp.reporting.paper import reported_rows
from manidp.reporting.summary import summarize_runs

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["plot_pareto", "plot_macs_vs_difficulty", "plot_speedup"]


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
