"""``manidp``: the command line every workflow rule and user drives.

Subcommands: train, evaluate, macs, datasets, backbones, methods, tracking.
Mistakes a user can fix (unknown names, missing paths, malformed config,
corrupt checkpoints) print one message and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from manidp.errors import UserError

_COMMANDS = {}


def command(name: str, help: str):
    def add(func):
        _COMMANDS[name] = (func, help)
        return func

    return add


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file layered over the packaged defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.lr=0.05 (repeatable)")
    p.add_argument("--dataset")
    p.add_argument("--backbone")
    p.add_argument("--method")
    p.add_argument("--budget", type=float, help="requested MACs reduction, e.g. 0.55")
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--out", help="run folder (default runs/{dataset}/{backbone}/{method}/seed{seed})")
    p.add_argument("--init-from", help="dense run folder or checkpoint to start from")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _resolve_train_config(args) -> dict:
    from manidp.config import load_yaml, resolve

    flags = {"dataset": args.dataset, "backbone": args.backbone, "method": args.method, "budget": args.budget,
             "seed": args.seed, "train.epochs": args.epochs, "out": args.out, "init_from": args.init_from,
             "runtime.device": args.device, "runtime.threads": args.threads}
    return resolve(load_yaml(args.config) if args.config else None, args.set, flags)


@command("train", "train one run (dense or a pruning method); re-running resumes")
def _train(args) -> int:
    import yaml

    cfg = _resolve_train_config(args)
    if args.print_config:
        print(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    from manidp.engine import train

    train(cfg)
    return 0


@command("evaluate", "evaluate a trained model (run folder or model.pt) on a split")
def _evaluate(args) -> int:
    from manidp.engine import evaluate_run

    summary = evaluate_run(args.model, args.split, Path(args.out) if args.out else None, args.device)
    print(json.dumps(summary, indent=2, default=str))
    return 0


@command("macs", "dense conv+Linear MACs of a backbone at batch 1")
def _macs(args) -> int:
    from manidp.macs import count_macs
    from manidp.models import build_backbone

    if args.input_size < 1:
        raise UserError("--input-size must be a positive number of pixels")
    model = build_backbone(args.backbone, args.num_classes, args.in_chans)
    macs = count_macs(model, (args.in_chans, args.input_size, args.input_size))
    params = sum(p.numel() for p in model.parameters())
    if args.json:
        print(json.dumps({"backbone": args.backbone, "input_size": args.input_size, "macs": macs, "params": params}))
    else:
        print(f"{args.backbone} @ {args.input_size}x{args.input_size}: {macs / 1e6:.3f} M MACs, "
              f"{params / 1e6:.3f} M params")
    return 0


@command("datasets", "list the registered datasets")
def _datasets(args) -> int:
    from manidp.data import DATASETS

    print("\n".join(DATASETS.names()))
    return 0


@command("backbones", "list the benchmark backbones (any timm model name also works)")
def _backbones(args) -> int:
    from manidp.models import BENCHMARK_BACKBONES

    print("\n".join(BENCHMARK_BACKBONES))
    return 0


@command("methods", "list the registered pruning methods")
def _methods(args) -> int:
    from manidp.methods import METHODS, load_all

    load_all()
    for name in METHODS.names():
        cls = METHODS.get(name)
        print(f"{name}\t{'dynamic' if cls.dynamic else 'static'}")
    return 0


@command("tracking", "create the MLflow store once, or import a finished run into it")
def _tracking(args) -> int:
    from manidp import tracking

    if args.action == "init":
        uri = tracking.init_store(args.uri, tuple(args.experiment))
        print(f"MLflow store ready: {uri}")
    else:
        if not args.run_dir:
            raise UserError("tracking import needs a run folder: manidp tracking import RUN_DIR")
        run_id = tracking.import_run(args.run_dir, args.uri)
        print(f"imported {args.run_dir} as MLflow run {run_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from manidp._version import __version__

    parser = argparse.ArgumentParser(prog="manidp", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"manidp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        _ARGUMENTS.get(name, lambda _: None)(p)
    return parser


def _evaluate_args(p):
    p.add_argument("model", help="run folder or model.pt")
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.add_argument("--out", help="per-instance CSV to write (default: beside the model)")
    p.add_argument("--device", default="cpu")


def _macs_args(p):
    p.add_argument("backbone")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print one JSON object with a 'macs' field")


def _tracking_args(p):
    p.add_argument("action", choices=("init", "import"))
    p.add_argument("run_dir", nargs="?")
    p.add_argument("--uri", help="tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///results/mlflow.db)")
    p.add_argument("--experiment", action="append", default=[], help="experiment to create (repeatable)")


_ARGUMENTS = {"train": _train_args, "evaluate": _evaluate_args, "macs": _macs_args, "tracking": _tracking_args}


def register_subcommand(name: str, help_text: str, add_arguments, func) -> None:
    """Let other modules (latency, tables) add subcommands without editing this file's dispatch."""
    _COMMANDS[name] = (func, help_text)
    _ARGUMENTS[name] = add_arguments


def _load_plugins() -> None:
    import importlib

    for module in ("manidp.latency", "manidp.reporting"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    _load_plugins()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"manidp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("manidp: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
