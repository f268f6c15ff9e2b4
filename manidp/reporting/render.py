"""The table files: the tidy CSV, the full table as Markdown and LaTeX (pandas ``to_markdown`` and
``Styler.to_latex``) and, beside them, the paper layout (:mod:`manidp.reporting.paper_layout`)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from manidp.reporting.cells import DASH, budget_statement, count, fmt
from manidp.reporting.paper import PAPER_TOLERANCE_PCT
from manidp.reporting.paper_layout import to_paper_html, to_paper_latex, to_paper_markdown
from manidp.reporting.runs import OPTIONAL_VAL, is_number, latency_keys, optional_present
from manidp.reporting.summary import MEASURES

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["to_markdown", "to_latex", "write_table"]

_TEXT_COLUMNS = {"Backbone", "Method", "Type", "Paper method", "Source"}  # left-aligned; the rest are numbers


def _display(table: "pd.DataFrame", profiles: list[str]) -> "pd.DataFrame":
    """The table as the md/tex versions show it: one string per cell, in the paper's layout."""
    import pandas as pd

    optional = optional_present(table)
    latency = {p: latency_keys(table.columns, p) for p in profiles}
    with_paper = "paper_method" in table and table["paper_method"].notna().any()
    rows = []
    for _, r in table.iterrows():
        ours = r["source"] == "ours"
        cells = {"Backbone": r["backbone"], "Method": r["method"], "Type": r["dynamic"],
                 "Budget (%)": count(r["budget_pct"]) if ours else DASH,
                 "Epochs": count(r["epochs"]) if ours else DASH,
                 "Steps": count(r["optimizer_steps"]) if ours else DASH}
        for measure, label in {**MEASURES, **{k: OPTIONAL_VAL[k] for k in optional}}.items():
            cells[label] = fmt(r[measure], r[f"{measure}_std"], 3 if measure == "macs_m" else 2) if ours else DASH
        for p in profiles:
            status = r.get(f"latency_status_{p}")
            cells[f"Speed-up {p}"] = fmt(r[f"speedup_{p}"], r[f"speedup_{p}_std"]) if ours else DASH
            if ours and cells[f"Speed-up {p}"] == DASH and isinstance(status, str):
                cells[f"Speed-up {p}"] = status
            for key in latency[p]:
                label = {"deployed_ms": f"Latency {p} (ms)", "dense_ms": f"Dense {p} (ms)"}.get(
                    key, f"{key.removesuffix('_ms').replace('_', ' ')} {p} (ms)")
                text = fmt(r[f"{key}_{p}"], digits=3) if ours else DASH
                spread = r.get(f"{key}_iqr_{p}")
                cells[label] = text + (f" (IQR {spread:.3f})" if text != DASH and is_number(spread) else "")
        cells["n"] = str(int(r["n_seeds"])) if ours else DASH
        matched = with_paper and isinstance(r["paper_method"], str)
        if with_paper:
            cells.update({
                "Paper method": r["paper_method"] if matched else DASH,
                "Top-1 err. reported (%)": fmt(r["paper_top1_err"]),
                "Top-1 drop reported": fmt(r["paper_top1_drop"]),
                "MACs red. reported (%)": fmt(r["paper_macs_reduction_pct"], digits=1),
                "Top-1 drop, ours - reported": fmt(r["top1_drop_vs_paper"], signed=True),
                "MACs red., ours - reported": fmt(r["macs_reduction_vs_paper"], digits=1, signed=True),
            })
        cells["Source"] = "ours" + (f" + reported ({r['paper_reference']})" if matched else "") \
            if ours else f"reported ({r['paper_reference']})"
        rows.append(cells)
    return pd.DataFrame(rows)


def _has_paper(table: "pd.DataFrame") -> bool:
    return (table["source"] == "reported").any() or ("paper_method" in table and table["paper_method"].notna().any())


def _footer(table: "pd.DataFrame", profiles: list[str], tolerance_pct: float) -> tuple[list[str], list[str]]:
    """(what every row's numbers mean, the notes on single rows)."""
    lines = ["Ours: mean ± standard deviation over n seeds; drops are differences to the dense model of the same "
             "seed (percentage points, positive = worse).", budget_statement(table)]
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
    shown[reported] = shown[reported].apply(lambda column: column.map(lambda c: c if c == DASH else f"*{c}*"))
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
        return cell.replace("±", r"$\pm$").replace(DASH, "--")

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
    (:mod:`manidp.reporting.paper_layout`) and ``{stem}_full.md`` with every column."""
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    full = out_csv.with_name(f"{out_csv.stem}_full.md")
    paths = [out_csv, out_csv.with_suffix(".md"), out_csv.with_suffix(".tex"), full, out_csv.with_suffix(".html")]
    table.to_csv(paths[0], index=False, float_format="%.4f")
    paths[1].write_text(to_paper_markdown(table, profiles, full.name))
    paths[2].write_text(to_paper_latex(table, profiles, dataset, full.name))
    paths[3].write_text(to_markdown(table, profiles, tolerance_pct))
    paths[4].write_text(to_paper_html(table, profiles, dataset, full.name))
    return paths
