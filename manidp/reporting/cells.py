"""How a table cell shows a number: mean ± std, a dash where there is none; the training budget sentence.

Shared by the full table (:mod:`manidp.reporting.render`) and the paper layout
(:mod:`manidp.reporting.paper_layout`), so both read alike.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from manidp.reporting.runs import is_number, number_or_nan

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DASH", "fmt", "count", "budget_statement"]

#: An empty cell.
DASH = "–"


def fmt(mean, std=math.nan, digits: int = 2, signed: bool = False) -> str:
    if mean is None or not is_number(mean):
        return DASH
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if std is None or not is_number(std) else f"{text} ± {std:.{digits}f}"


def count(value) -> str:
    return f"{value:g}" if is_number(value) else DASH


def budget_statement(table: "pd.DataFrame") -> str:
    """The training budget the rows were given, in one sentence."""
    ours = table[table["source"] == "ours"]
    parts, finetune = [], set()
    for label, rows in (("dense training", ours[ours["budget_pct"].isna()]),
                        ("fine-tuning", ours[ours["budget_pct"].notna()])):
        order = {(count(e), count(s)): (number_or_nan(e), number_or_nan(s)) for e, s in zip(rows["epochs"],
                                                                                rows["optimizer_steps"])}
        budgets = sorted(order, key=lambda b: [math.inf if math.isnan(v) else v for v in order[b]])
        if label == "fine-tuning":
            finetune = budgets
        if budgets:
            parts.append(f"{label} " + ", ".join(
                ("epochs not recorded" if e == DASH else f"{e} epoch{'' if e == '1' else 's'}") +
                (" (optimizer steps not recorded)" if s == DASH else f" ({s} optimizer steps)") for e, s in budgets))
    text = "Training budget: " + "; ".join(parts) + "."
    if len(finetune) > 1:
        text += " Fine-tuning budgets differ between rows: see the Epochs and Steps columns."
    return text
