"""Commands that describe what the benchmark knows: ``macs``, ``datasets``, ``backbones``, ``methods``."""
from __future__ import annotations

import json
import sys

from manidp.cli._command import Command
from manidp.errors import UserError

__all__ = ["COMMANDS"]


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


def _datasets(args) -> int:
    from manidp.data import DATASETS, SHARED_OPTIONS

    def show(options) -> None:
        for key, option in options.items():
            print(f"  data.{key} (default: {option.default_text()}): {option.help}")

    for name in DATASETS.names():
        print(name)
        show(DATASETS.get(name).own_options)
    print("every dataset also takes")
    show(SHARED_OPTIONS)
    return 0


def _backbones(args) -> int:
    from manidp.models import BENCHMARK_BACKBONES

    print("\n".join(BENCHMARK_BACKBONES))
    return 0


def _methods(args) -> int:
    from manidp.methods import METHODS, load_all

    load_all()
    for name in METHODS.names():
        cls = METHODS.get(name)
        print(f"{name}\t{'dynamic' if cls.dynamic else 'static'}")
    return 0


def _macs_args(p):
    p.add_argument("backbone")
    p.add_argument("--input-size", type=int, default=None, metavar="N",
                   help="input side in pixels (default: the backbone's native size: 32 for the CIFAR ResNets, "
                   "timm's pretrained config for the others)")
    p.add_argument("--in-chans", type=int, default=3, metavar="C", help="input channels (default: 3)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier classes (default: the backbone's own, 10 for CIFAR ResNets, 1000 for ImageNet ones)")
    p.add_argument("--json", action="store_true", help="print one JSON object with a 'macs' field")



def _no_arguments(p) -> None:
    pass


COMMANDS = (
    Command("macs", "dense conv+Linear MACs of a backbone at batch 1", _macs_args, _macs),
    Command("datasets", "list the registered datasets and the data.* keys each takes", _no_arguments,
            _datasets),
    Command("backbones", "list the benchmark backbones (any timm model name also works)", _no_arguments,
            _backbones),
    Command("methods", "list the registered pruning methods", _no_arguments, _methods),
)
