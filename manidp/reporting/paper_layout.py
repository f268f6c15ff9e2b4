"""The results table in the layout of the paper's Tables 1 and 4.

Those tables have one row per pruned model: backbone, method, whether it is
dynamic, top-1 and top-5 error of the baseline, of the pruned model and their
gap, and the FLOPs reduction. Ours follow them column for column (mean ± std
over seeds; the baseline is our dense model of the same backbone), with one
measured speed-up column per hardware profile, then the paper's reported rows
of that backbone in the paper's order, marked as reported. At most 14 columns,
so the LaTeX fits a two-column paper's ``table*``. Everything else (budgets,
steps, validation and calibration columns, latency in ms and its spread,
differences to the paper) stays in the CSV and in ``{stem}_full.md``.
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from manidp.reporting.cells import DASH, budget_statement, fmt
from manidp.reporting.paper import reported_rows

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["paper_layout", "to_paper_markdown", "to_paper_latex", "to_paper_html", "MAX_COLUMNS"]

MAX_COLUMNS = 14
_TEXT = {"Backbone", "Method", "Dynamic", "Source"}


def _dynamic(kind: str) -> str:
    return {"dynamic": "yes", "static": "no"}.get(kind, DASH)


def _mean(rows: "pd.DataFrame", column: str) -> float:
    import pandas as pd

    values = pd.to_numeric(rows[column], errors="coerce").dropna()
    return float(values.mean()) if len(values) else math.nan


def paper_layout(table: "pd.DataFrame", profiles: list[str]) -> tuple["pd.DataFrame", list[bool]]:
    """(one string per cell in the paper's columns, which rows are the paper's reported ones)."""
    import pandas as pd

    shown, reported = [], []
    dataset = table["dataset"].dropna().iloc[0]
    for backbone in table["backbone"].unique():
        ours = table[(table["backbone"] == backbone) & (table["source"] == "ours")]
        dense = ours[ours["budget_pct"].isna()]
        base1, base5 = _mean(dense, "top1_err"), _mean(dense, "top5_err")
        for _, r in ours[ours["budget_pct"].notna()].iterrows():
            cells = {"Backbone": backbone, "Method": r["method"], "Dynamic": _dynamic(r["dynamic"]),
                     "Top-1 base (%)": fmt(base1), "Top-1 pruned (%)": fmt(r["top1_err"], r["top1_err_std"]),
                     "Top-1 gap": fmt(r["top1_gap"], r["top1_gap_std"]),
                     "Top-5 base (%)": fmt(base5), "Top-5 pruned (%)": fmt(r["top5_err"], r["top5_err_std"]),
                     "Top-5 gap": fmt(r["top5_gap"], r["top5_gap_std"]),
                     "MACs red. (%)": fmt(r["macs_reduction_pct"], r["macs_reduction_pct_std"], 1)}
            for p in profiles:
                value = fmt(r.get(f"speedup_{p}"), r.get(f"speedup_{p}_std"))
                status = r.get(f"latency_status_{p}")
                cells[f"Speed-up {p}"] = status if value == DASH and isinstance(status, str) else value
            cells["Source"] = "ours"
            shown.append(cells)
            reported.append(False)
        for _, r in reported_rows(dataset, [backbone]).iterrows():
            if r["paper_dynamic"] == "dense":  # the baseline is a column here, not a row
                continue
            cells = {"Backbone": backbone, "Method": r["paper_method"], "Dynamic": _dynamic(r["paper_dynamic"]),
                     "Top-1 base (%)": fmt(r["paper_top1_err"] - r["paper_top1_drop"]),
                     "Top-1 pruned (%)": fmt(r["paper_top1_err"]), "Top-1 gap": fmt(r["paper_top1_drop"]),
                     "Top-5 base (%)": fmt(r["paper_top5_err"] - r["paper_top5_drop"]),
                     "Top-5 pruned (%)": fmt(r["paper_top5_err"]), "Top-5 gap": fmt(r["paper_top5_drop"]),
                     "MACs red. (%)": fmt(r["paper_macs_reduction_pct"], digits=1),
                     **{f"Speed-up {p}": DASH for p in profiles},
                     "Source": f"reported ({r['paper_reference'].removeprefix('paper ')})"}
            shown.append(cells)
            reported.append(True)
    frame = pd.DataFrame(shown)
    if len(frame.columns) > MAX_COLUMNS:
        raise ValueError(f"the paper-layout table would have {len(frame.columns)} columns (at most {MAX_COLUMNS}): "
                         f"time at most {MAX_COLUMNS - 11} hardware profiles per table")
    return frame, reported


def _notes(table: "pd.DataFrame", profiles: list[str], full_name: str) -> tuple[list[str], list[str]]:
    """(what every row's numbers mean, the notes on single rows)."""
    ours = table[table["source"] == "ours"]
    seeds = sorted({int(n) for n in ours["n_seeds"].dropna()})
    lines = [f"Ours: mean ± standard deviation over {'/'.join(map(str, seeds)) or 'no'} seed(s); the baseline is "
             "our dense model of the same backbone (mean over seeds); a gap is the pruned model's error minus the "
             "dense model's of the same seed (percentage points, positive = worse); MACs reduction per instance, "
             "averaged over the test set (the paper's FLOPs).", budget_statement(table)]
    if profiles:
        lines.append("Speed-up: dense time / deployed time at batch 1, timed side by side in one process against "
                     "an optimized dense reference; the regime of each (static or per-instance kept sets, slice "
                     f"cache hit rate) and the latencies in ms are in {full_name}.")
    if len(reported_rows(table["dataset"].iloc[0], ours["backbone"].unique())):
        lines.append("Rows marked reported (in italics) are the paper's printed numbers, in the paper's order; "
                     "their gaps are differences of the printed errors.")
    else:
        lines.append("The paper reports no results on this dataset.")
    lines.append(f"Budgets, optimizer steps, validation accuracies and differences to the paper: {full_name} and "
                 "the CSV beside it.")
    notes = [f"{r['backbone']} {r['method']}: {r['notes']}" for _, r in ours.iterrows()
             if isinstance(r.get("notes"), str) and r["notes"]]
    return lines, sorted(set(notes), key=notes.index)


def to_paper_markdown(table: "pd.DataFrame", profiles: list[str], full_name: str) -> str:
    shown, reported = paper_layout(table, profiles)
    shown = shown.copy()
    shown[reported] = shown[reported].apply(lambda column: column.map(lambda c: c if c == DASH else f"*{c}*"))
    text = shown.to_markdown(index=False, disable_numparse=True,
                             colalign=["left" if c in _TEXT else "right" for c in shown.columns])
    lines, notes = _notes(table, profiles, full_name)
    return "\n\n".join([text, *lines, "\n".join(f"- {n}" for n in notes)]).rstrip() + "\n"


def _two_rows(column: str) -> tuple[str, str]:
    """A column's two header rows in LaTeX, as the paper prints them: a group over short names."""
    for group in ("Top-1", "Top-5"):
        if column.startswith(group):
            return f"{group} err. (%)", column.removeprefix(group).strip().removesuffix(" (%)")
    if column.startswith("Speed-up "):
        return "Speed-up", column.removeprefix("Speed-up ")
    if column == "MACs red. (%)":
        return "MACs", "red. (%)"
    return "", column


def to_paper_latex(table: "pd.DataFrame", profiles: list[str], dataset: str, full_name: str) -> str:
    """A ``table*`` with booktabs rules (pandas ``Styler.to_latex``) that compiles as it is."""
    import pandas as pd

    shown, reported = paper_layout(table, profiles)

    def math_symbols(cell: str) -> str:  # cells arrive escaped by pandas
        return cell.replace("±", r"$\pm$").replace(DASH, "--")

    align = "".join("l" if c in _TEXT else "r" for c in shown.columns)
    # Short cells where the page is narrow: "T1" for the paper's Table 1 (the caption says so).
    shown["Source"] = shown["Source"].str.replace(r"^reported \(Table (\d+)\)$", r"T\1", regex=True)
    shown = shown.rename(columns={"Dynamic": "Dyn."})
    shown = shown.set_axis(pd.MultiIndex.from_tuples([_two_rows(c) for c in shown.columns]), axis=1)
    styler = (shown.style.hide(axis="index").format(math_symbols, escape="latex")
              .format_index(escape="latex", axis=1)
              .apply(lambda row: ["textit:--rwrap;" if reported[row.name] else ""] * len(row), axis=1))
    tabular = styler.to_latex(hrules=True, column_format=align, multicol_align="c")
    notes = pd.DataFrame({"Notes": [line for part in _notes(table, profiles, full_name) for line in part]})
    notes_tabular = (notes.style.hide(axis="index").hide(axis="columns").format(math_symbols, escape="latex")
                     .to_latex(column_format="p{0.95\\textwidth}"))
    return "\n".join([r"% Needs \usepackage{booktabs}. Written by manidp table from the run folders.",
                      r"\begin{table*}[t]", r"\centering", r"\scriptsize", r"\setlength{\tabcolsep}{2.5pt}",
                      tabular.rstrip(), r"\par", notes_tabular.rstrip(),
                      rf"\caption{{\detokenize{{{dataset}}}: top-1/top-5 error of the baseline and the pruned "
                      r"model, their gap and the MACs reduction, as in the paper's Tables 1 and 4; ours as mean "
                      r"$\pm$ std over seeds; rows in italics are the paper's, as reported in its Table 1 (T1) or 4 (T4).}",
                      rf"\label{{tab:{re.sub('[^A-Za-z0-9]', '', dataset)}}}", r"\end{table*}"]) + "\n"


def to_paper_html(table: "pd.DataFrame", profiles: list[str], dataset: str, full_name: str) -> str:
    """A standalone HTML page of the table (pandas ``Styler.to_html``), readable where Snakemake's report
    shows it inline (a CSV there only downloads)."""
    import html

    shown, reported = paper_layout(table, profiles)
    styler = (shown.style.hide(axis="index")
              .set_caption(f"{html.escape(dataset)}: top-1/top-5 error of the baseline and the pruned model, "
                           "their gap and the MACs reduction, as in the paper's Tables 1 and 4")
              .apply(lambda row: ["font-style: italic; color: #555" if reported[row.name] else ""] * len(row),
                     axis=1)
              .set_properties(subset=[c for c in shown.columns if c in _TEXT], **{"text-align": "left"})
              .set_table_styles([{"selector": "th, td", "props": "padding: 2px 8px"},
                                 {"selector": "td", "props": "text-align: right"},
                                 {"selector": "caption", "props": "caption-side: top; font-weight: bold"}]))
    lines, notes = _notes(table, profiles, full_name)
    body = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
    body += "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>" if notes else ""
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(dataset)} table</title></head>"
            f"<body style='font-family: sans-serif'>{styler.to_html()}{body}</body></html>\n")
