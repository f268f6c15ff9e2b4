"""manidp: train, evaluate, time and tabulate pruned networks (the benchmark's command line).

Subcommands: train, evaluate, macs, datasets, backbones, methods, tracking.
Mistakes a user can fix (unknown names, missing paths, malformed config, a
flag or config value of the wrong type or out of range, corrupt checkpoints)
print one line and exit with status 2, before any work starts and before
anything is written.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
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

        train(cfg)
    return 0


# What a training run (and the workflow's latency step) writes into its folder; --force removes it.
_RUN_FILES = ("checkpoint.pt", "metrics.json", "model.pt", "history.jsonl", "config.yaml", "tracking.json",
              "tracking_pending.json", "instances_*.csv", "latency_*.json")


def _clear_run_folder(out: Path) -> None:
    for pattern in _RUN_FILES:
        for path in out.glob(pattern):
            path.unlink()


@command("evaluate", "evaluate a trained model (run folder or model.pt) on a split")
def _evaluate(args) -> int:
    if not Path(args.model).exists():
        raise UserError(f"{args.model} not found: give a run folder or a model.pt file")
    if Path(args.model).is_dir() and not (Path(args.model) / "model.pt").is_file():
        raise UserError(f"{args.model} holds no model.pt: train that run to the end first")
    _check_device(args.device)
    from manidp.engine import evaluate_run

    summary = evaluate_run(args.model, args.split, Path(args.out) if args.out else None, args.device)
    print(json.dumps(summary, indent=2, default=str))
    return 0


@command("macs", "dense conv+Linear MACs of a backbone at batch 1")
def _macs(args) -> int:
    from manidp.macs import count_macs
    from manidp.models import build_backbone, native_input_size

    model = build_backbone(args.backbone, args.num_classes, args.in_chans)
    if args.input_size is None:
        args.input_size = native_input_size(model)
        if args.input_size is None:
            raise UserError(f"{args.backbone} declares no native input size; give --input-size N")
        if not args.json:
            print(f"--input-size not given: using {args.backbone}'s native {args.input_size} px", file=sys.stderr)
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


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from manidp._version import __version__

    parser = _Parser(prog="manidp", description=__doc__.splitlines()[0],
                     epilog="Each command has its own --help. README.md has the full guide.")
    parser.add_argument("--version", action="version", version=f"manidp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, help_text) in _COMMANDS.items():
        # The workflow's internal steps stay callable but out of the listing (argparse lists only
        # subcommands given a help text).
        listed = {} if name in INTERNAL_COMMANDS else {"help": help_text}
        p = sub.add_parser(name, description=help_text, **listed)
        p.set_defaults(func=func)
        _ARGUMENTS.get(name, lambda _: None)(p)
    return parser


def _evaluate_args(p):
    p.add_argument("model", help="run folder or model.pt")
    p.add_argument("--split", default="test", choices=("test", "val"), help="split to evaluate (default: test)")
    p.add_argument("--out", metavar="FILE.csv", help="per-instance CSV to write (default: instances_{split}.csv "
                   "beside the model)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default: cpu)")


def _macs_args(p):
    p.add_argument("backbone")
    p.add_argument("--input-size", type=int, default=None, metavar="N",
                   help="input side in pixels (default: the backbone's native size: 32 for the CIFAR ResNets, "
                   "timm's pretrained config for the others)")
    p.add_argument("--in-chans", type=int, default=3, metavar="C", help="input channels (default: 3)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier classes (default: the backbone's own, 10 for CIFAR ResNets, 1000 for ImageNet ones)")
    p.add_argument("--json", action="store_true", help="print one JSON object with a 'macs' field")


def _tracking_args(p):
    p.add_argument("action", choices=("init", "import"))
    p.add_argument("run_dir", nargs="*", help="finished run folder(s) to import")
    p.add_argument("--uri", help="tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///results/mlflow.db)")
    p.add_argument("--experiment", action="append", default=[], metavar="NAME",
                   help="experiment to create with init (repeatable; default: none, each dataset's is created "
                   "when its first run logs)")


#: Steps the workflow runs for itself; a user never needs them.
INTERNAL_COMMANDS = ("tracking-parent", "tracking-summary")

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


# ----------------------------------------------------------------- flags, checked before any work
#: Lowest valid value of each numeric flag, by its argparse name, whichever subcommand defines it.
_FLAG_MINIMUM = {"threads": 1, "batch_size": 1, "instances": 1, "repeats": 1, "warmup": 0, "epochs": 0, "seed": 0,
                 "input_size": 1, "in_chans": 1, "num_classes": 1}
#: Flags naming a file a subcommand writes (train's --out is a folder, checked with the run's config).
_OUTPUT_FILES = ("out", "pareto", "difficulty")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available on this machine; use --device cpu")


def _check_output_file(flag: str, path: Path) -> None:
    from manidp.config import can_write_in

    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give the file to write")
    existing = next(p for p in [*path.parents, Path(".")] if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, so nothing can be written below it")
    if not can_write_in(existing) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path}: cannot write there; choose a place you can write to")


def _check_flags(args) -> None:
    """Type and range of every flag, whichever subcommand defines it."""
    for dest, value in vars(args).items():
        if dest in _FLAG_MINIMUM and value is not None and value < _FLAG_MINIMUM[dest]:
            raise UserError(f"{_flag(dest)} must be >= {_FLAG_MINIMUM[dest]}, got {value}")
        if dest == "budget" and value is not None and not 0 <= value < 1:
            raise UserError(f"--budget is a requested MACs reduction in [0, 1), got {value:g}")
        if dest in _OUTPUT_FILES and value and args.command != "train":
            _check_output_file(_flag(dest), Path(value))


class _Terminated(SystemExit):
    """SIGTERM (Slurm's time limit, ``kill``): unwinds like an error does, so the run is closed as KILLED."""


def _raise_on_sigterm(signum, frame):
    raise _Terminated(128 + signum)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"manidp: warning: {message}", file=sys.stderr)


def _abort_open_runs(error: BaseException) -> None:
    tracking = sys.modules.get("manidp.tracking")
    if tracking is not None:
        tracking.abort_open_runs(error)


def main(argv=None) -> int:
    _load_plugins()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # a usage error (one line already printed), --help or --version
        return stop.code if isinstance(stop.code, int) else 2
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.showwarning = _show_warning
            _check_flags(args)
            return args.func(args)
    except UserError as err:
        _abort_open_runs(err)
        print(f"manidp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Terminated) as err:
        _abort_open_runs(err)
        print("manidp: interrupted; re-run the same command to resume", file=sys.stderr)
        return err.code if isinstance(err, _Terminated) else 130
    except BaseException as err:
        _abort_open_runs(err)
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
