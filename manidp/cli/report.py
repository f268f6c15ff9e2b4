"""Commands that build tables and plots from run folders: ``table``, ``plot``, ``tuning-table``."""
from __future__ import annotations

from pathlib import Path

from manidp.cli._command import Command
from manidp.errors import UserError
from manidp.reporting import (PAPER_TOLERANCE_PCT, build_table, find_profiles, is_number as _is_number, load_runs,
                              plot_macs_vs_difficulty, plot_pareto, plot_speedup, tuning_table, write_per_seed,
                              write_table)

__all__ = ["COMMANDS", "check_dataset"]


def _runs_args(p) -> None:
    p.add_argument("--dataset", required=True)
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR", help="run folders (dense and methods)")


def _table_args(p) -> None:
    _runs_args(p)
    p.add_argument("--profiles", nargs="*", default=[], help="hardware profiles with latency_{profile}.json files")
    p.add_argument("--out", required=True, help="CSV to write; .md and .tex are written beside it")
    p.add_argument("--per-seed", metavar="CSV", help="also write one row per run to this CSV")
    p.add_argument("--paper-tolerance", type=float, default=PAPER_TOLERANCE_PCT, metavar="POINTS",
                   help="a paper row sits on ours when its FLOPs reduction is within this many percentage points "
                        f"of our budget (default {PAPER_TOLERANCE_PCT:g})")


def check_dataset(runs, dataset: str) -> None:
    other = sorted(set(runs["dataset"]) - {dataset})
    if other:
        raise UserError(f"--dataset is {dataset} but some run folders hold {', '.join(other)}")


def _writing(func):
    """A subcommand whose output files cannot be written says so in one message."""
    def run(args) -> int:
        try:
            return func(args)
        except OSError as err:
            raise UserError(f"cannot write {err.filename or 'an output file'}: {err.strerror or err}; "
                            f"choose a place you can write to") from None

    return run


@_writing
def _table(args) -> int:
    if not _is_number(args.paper_tolerance) or args.paper_tolerance < 0:
        raise UserError(f"--paper-tolerance must be a non-negative number of percentage points "
                        f"(got {args.paper_tolerance})")
    runs = load_runs(args.runs, args.profiles)
    check_dataset(runs, args.dataset)
    profiles = list(args.profiles)
    paths = write_table(build_table(runs, profiles, args.paper_tolerance), Path(args.out), profiles, args.dataset,
                        args.paper_tolerance)
    if args.per_seed:
        paths.append(write_per_seed(runs, Path(args.per_seed), profiles))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def _plot_args(p) -> None:
    _runs_args(p)
    p.add_argument("--pareto", required=True, help="PNG: accuracy vs MACs")
    p.add_argument("--difficulty", required=True, help="PNG: per-instance MACs vs difficulty")
    p.add_argument("--speedup", help="PNG: accuracy vs measured speed-up, per profile found in the run folders")


@_writing
def _plot(args) -> int:
    profiles = find_profiles(args.runs) if args.speedup else []
    runs = load_runs(args.runs, profiles)
    check_dataset(runs, args.dataset)
    plot_pareto(runs, Path(args.pareto), args.dataset)
    plot_macs_vs_difficulty(runs, Path(args.difficulty), args.dataset)
    written = [args.pareto, args.difficulty]
    if args.speedup:
        plot_speedup(runs, Path(args.speedup), args.dataset, profiles)
        written.append(args.speedup)
    print("wrote " + ", ".join(written))
    return 0


def _tuning_args(p) -> None:
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR",
                   help="validation-only run folders of the recipe sweep")
    p.add_argument("--out", required=True, help="CSV to write; an .html twin is written beside it")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="how far (fraction of dense MACs) a configuration's mean validation reduction may lie "
                        "from the budget (default 0.02)")


@_writing
def _tuning(args) -> int:
    table = tuning_table(args.runs, args.tolerance)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.4f")
    # Readable in Snakemake's report, where a CSV only downloads: chosen recipes in bold.
    styled = table.style.hide(axis="index").format(precision=3).apply(
        lambda row: ["font-weight: bold" if row["chosen"] else ""] * len(row), axis=1)
    out.with_suffix(".html").write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head>"
                                        f"<body style='font-family: sans-serif'>{styled.to_html()}</body></html>\n")
    chosen = table[table["chosen"]]
    print(f"wrote {out}: {len(table)} configurations, chosen: " + "; ".join(
        f"{r['method']} lr {r['lr']:g} {r['method_options']}" + (" (fallback)" if r["fallback"] else "")
        for _, r in chosen.iterrows()))
    return 0


COMMANDS = (
    Command("table", "per-dataset table (csv, md, tex) from run folders, beside the paper's rows", _table_args,
            _table),
    Command("plot", "accuracy-vs-MACs, MACs-vs-difficulty and accuracy-vs-speed-up plots from run folders",
            _plot_args, _plot),
    Command("tuning-table", "validation-only recipe sweep: mean/std/n per configuration, the chosen recipe",
            _tuning_args, _tuning),
)
