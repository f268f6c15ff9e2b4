"""Commands that talk to the MLflow store: ``tracking`` (users), ``tracking-parent`` and
``tracking-summary`` (the workflow's own steps)."""
from __future__ import annotations

import math
from pathlib import Path

from manidp.cli._command import Command
from manidp.errors import UserError

__all__ = ["COMMANDS"]


def _tracking(args) -> int:
    from manidp import tracking

    if args.action == "import":
        if not args.run_dir:
            raise UserError("tracking import needs a run folder: manidp tracking import RUN_DIR [RUN_DIR ...]")
        for run_dir in args.run_dir:
            run_id = tracking.import_run(run_dir, args.uri)
            print(f"imported {run_dir} as MLflow run {run_id}")
    elif args.run_dir:
        raise UserError("tracking init takes no run folder (did you mean: manidp tracking import RUN_DIR?)")
    else:
        uri = tracking.init_store(args.uri, tuple(args.experiment))
        print(f"MLflow store ready: {uri}")
    return 0


def _tracking_args(p):
    p.add_argument("action", choices=("init", "import"))
    p.add_argument("run_dir", nargs="*", help="finished run folder(s) to import")
    p.add_argument("--uri", help="tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///results/mlflow.db)")
    p.add_argument("--experiment", action="append", default=[], metavar="NAME",
                   help="experiment to create with init (repeatable; default: none, each dataset's is created "
                   "when its first run logs)")



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
    from manidp.reporting import load_runs

    run_id = ""
    if not args.no_tracking:
        runs = load_runs(args.runs, args.profiles)
        per_run = {}
        for _, r in runs[runs["budget"].notna()].iterrows():
            per_run[r["run_dir"]] = {f"speedup_{p}": r[f"speedup_{p}"] for p in args.profiles
                                     if not math.isnan(r[f"speedup_{p}"])}
        run_id = tracking.log_summary(args.dataset, args.artifact, per_run, args.uri, args.experiment,
                                      run_dirs=args.runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(run_id)
    print(f"summary run for {args.dataset}: {run_id or '(tracking off)'}")
    return 0



COMMANDS = (
    Command("tracking", "create the MLflow store once, or import a finished run into it", _tracking_args,
            _tracking),
    Command("tracking-parent", "find or create the MLflow parent run of a (dataset, backbone)", _parent_args,
            _parent, internal=True),
    Command("tracking-summary", "MLflow summary run of a dataset: tables and plots as artifacts", _summary_args,
            _summary, internal=True),
)
