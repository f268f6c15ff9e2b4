"""Tables and plots, built from run folders alone.

Results are files first: every number here comes from a run's
``metrics.json``, ``instances_test.csv`` and ``latency_{profile}.json``; a
table never reads a tracking server. The package reads in the order the data
flows:

- :mod:`~manidp.reporting.runs`: run folders read into typed ``RunRecord`` /
  ``LatencyRecord``, one row per run;
- :mod:`~manidp.reporting.summary`: mean and standard deviation over seeds per
  (backbone, method, budget), and the per-seed CSV;
- :mod:`~manidp.reporting.paper`: the paper's reported rows, matched to ours at
  the same method and operating point;
- :mod:`~manidp.reporting.render` (the CSV, the full Markdown/LaTeX) and
  :mod:`~manidp.reporting.paper_layout` (the paper's columns: ``.md``, ``.tex``,
  ``.html``), sharing the cell format of :mod:`~manidp.reporting.cells`;
- :mod:`~manidp.reporting.plots` and :mod:`~manidp.reporting.tuning` (the recipe
  sweep on validation-only runs, which refuses any run that holds test numbers).

The commands that call it (``table``, ``plot``, ``tuning-table``) live in
``manidp/cli/report.py``.
"""
from manidp.errors import UserError
from manidp.reporting.paper import PAPER_TOLERANCE_PCT, attach_reported, build_table, reported_rows
from manidp.reporting.plots import plot_macs_vs_difficulty, plot_pareto, plot_speedup
from manidp.reporting.render import to_latex, to_markdown, write_table
from manidp.reporting.runs import OPTIONAL_VAL, LatencyRecord, RunRecord, find_profiles, is_number, load_runs
from manidp.reporting.summary import MEASURES, summarize_runs, write_per_seed
from manidp.reporting.tuning import tuning_table

__all__ = ["RunRecord", "LatencyRecord", "load_runs", "find_profiles", "summarize_runs", "reported_rows",
           "attach_reported", "build_table", "to_markdown", "to_latex", "write_table", "write_per_seed",
           "tuning_table", "plot_pareto", "plot_macs_vs_difficulty", "plot_speedup", "is_number", "MEASURES",
           "OPTIONAL_VAL", "PAPER_TOLERANCE_PCT", "UserError"]
