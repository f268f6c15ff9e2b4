"""The paper's reported rows (Tables 1 and 4) and their place beside ours."""
from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Iterable

from manidp.reporting.summary import summarize_runs

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["PAPER_TOLERANCE_PCT", "reported_rows", "attach_reported", "build_table"]


def _registered_paper_names() -> dict[str, tuple[str, ...]]:
    """Each registered method's ``paper_names`` (the method carries the fact, so adding one never edits
    reporting). Loaded on use, not on import: the methods import torch, which the CLI's start must not."""
    from manidp.methods import METHODS, load_all

    load_all()
    return {name: METHODS.get(name).paper_names for name in METHODS if METHODS.get(name).paper_names}


#: A paper row sits on our row when its FLOPs reduction is within this many points of our budget.
PAPER_TOLERANCE_PCT = 5.0
_PAPER_TABLES = "reference/paper_tables.csv"


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
    baseline = paper[paper["method"].isin(_registered_paper_names()["dense"])].set_index(["table", "backbone"])
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

    A paper row matches one of ours when it is the same method (its ``paper_names``)
    on the same backbone and its FLOPs reduction lies within ``tolerance_pct``
    points of our budget (0 for dense); the closest pairs are taken first, each
    row used once. Unmatched paper rows follow our rows of their backbone,
    labelled reported, with our columns empty.
    """
    import pandas as pd

    names, pairs = _registered_paper_names(), []
    for i, row in ours.iterrows():
        point = 0.0 if pd.isna(row["budget_pct"]) else row["budget_pct"]
        for j, paper in reported.iterrows():
            if paper["backbone"] == row["backbone"] and paper["paper_method"] in names.get(row["method"], ()):
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
