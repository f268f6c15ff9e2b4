"""Commands that train and evaluate one run: ``train``, ``evaluate``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from manidp.cli._command import Command, check_device
from manidp.errors import UserError

__all__ = ["COMMANDS"]


def _train_args(p: argparse.ArgumentParser) -> None:
    # Defaults are the packaged config's (each flag overrides one key of it), so the help shows those.
    from manidp.config import defaults

    d = defaults()
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file layered over the packaged defaults and the "
                   "dataset's recipe; config/README.md explains every key (default: none)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.lr=0.05 (repeatable; applied last)")
    p.add_argument("--dataset", metavar="NAME", help=f"dataset to train on; 'manidp datasets' lists them "
                   f"(default: {d['dataset']})")
    p.add_argument("--backbone", metavar="NAME", help=f"timm model name; 'manidp backbones' lists the benchmark's "
                   f"(default: {d['backbone']})")
    p.add_argument("--method", metavar="NAME", help=f"pruning method; 'manidp methods' lists them "
                   f"(default: {d['method']})")
    p.add_argument("--budget", type=float, help="requested MACs reduction in [0, 1), e.g. 0.55 (default: none, "
                   "for dense)")
    p.add_argument("--seed", type=int, help=f"training seed; the data splits do not depend on it "
                   f"(default: {d['seed']})")
    p.add_argument("--epochs", type=int, help=f"training epochs (default: the dataset recipe's train.epochs, else "
                   f"{d['train']['epochs']})")
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/{dataset}/{backbone}/{method}[-b{budget}]"
                   "/seed{seed})")
    p.add_argument("--init-from", metavar="RUN", help="dense run folder (its model.pt) or checkpoint file to "
                   "start from (default: none)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help=f"where to train; auto uses a GPU when one "
                   f"is present (default: {d['runtime']['device']})")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--force", action="store_true",
                   help="retrain in --out even if it holds a finished or unfinished run with another config")
    p.add_argument("--record-divergence", action="store_true",
                   help="on a non-finite loss, write a metrics.json with status 'diverged' and exit 0 instead of "
                        "failing (recipe sweeps: a configuration that diverges is a result)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _resolve_train_config(args) -> dict:
    from manidp.config import load_yaml, resolve

    flags = {"dataset": args.dataset, "backbone": args.backbone, "method": args.method, "budget": args.budget,
             "seed": args.seed, "train.epochs": args.epochs, "out": args.out, "init_from": args.init_from,
             "runtime.device": args.device, "runtime.threads": args.threads}
    return resolve(load_yaml(args.config) if args.config else None, args.set, flags)


def _train(args) -> int:
    import yaml

    from manidp._files import run_folder_lock
    from manidp.config import check_out_folder, check_run_folder, check_runnable, default_out_dir

    cfg = _resolve_train_config(args)
    if args.print_config:
        print(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    cfg = check_runnable(cfg)
    out = Path(cfg["out"]) if cfg["out"] else default_out_dir(cfg)
    check_out_folder(out)
    # Held from before the folder is read until the run is written: two processes on one folder would
    # otherwise both train and leave one's metrics beside the other's model.
    with run_folder_lock(out):
        check_run_folder(out, cfg, force=args.force)
        if args.force:
            _clear_run_folder(out)
        from manidp.engine import train
        from manidp.tracking import MlflowObserver

        train(cfg, MlflowObserver(), record_divergence=args.record_divergence)
    return 0


# What a training run (and the workflow's latency step) writes into its folder; --force removes it.
_RUN_FILES = ("checkpoint.pt", "metrics.json", "model.pt", "history.jsonl", "config.yaml", "tracking.json",
              "tracking_pending.json", "instances_*.csv", "latency_*.json")


def _clear_run_folder(out: Path) -> None:
    for pattern in _RUN_FILES:
        for path in out.glob(pattern):
            path.unlink()


def _evaluate(args) -> int:
    if not Path(args.model).exists():
        raise UserError(f"{args.model} not found: give a run folder or a model.pt file")
    if Path(args.model).is_dir() and not (Path(args.model) / "model.pt").is_file():
        raise UserError(f"{args.model} holds no model.pt: train that run to the end first")
    check_device(args.device)
    from manidp.engine import evaluate_run

    summary = evaluate_run(args.model, args.split, Path(args.out) if args.out else None, args.device)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _evaluate_args(p):
    p.add_argument("model", help="run folder or model.pt")
    p.add_argument("--split", default="test", choices=("test", "val"), help="split to evaluate (default: test)")
    p.add_argument("--out", metavar="FILE.csv", help="per-instance CSV to write (default: instances_{split}.csv "
                   "beside the model)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default: cpu)")



COMMANDS = (
    Command("train", "train one run (dense or a pruning method); re-running resumes", _train_args, _train),
    Command("evaluate", "evaluate a trained model (run folder or model.pt) on a split", _evaluate_args, _evaluate),
)
