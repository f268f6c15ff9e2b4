"""ManiDP's budget calibration, block by block against a validation pass up to each gate.

The calibration searches one keep rate; each rate it tries sets every gate's
threshold in forward order from the validation saliencies at that gate. Both
ways of collecting them (``manidp.methods.manidp.calibration``) run here on the
same model and validation split, in alternating order, each repeat a whole
calibration (``ManiDP._calibrate``, as ``finalize`` runs it). The per-gate way
is what a model over ``ManiDP.calibration_cache_bytes`` gets; here it is forced
by a cap of 0 bytes. The script exits non-zero if the two calibrations differ
in any threshold or measured figure: the block-by-block way is only worth its
time if it gives the same calibration bit for bit.

    python benchmarks/calibration.py                       # digits-c's validation split, a freshly gated model
    python benchmarks/calibration.py --run runs/digits-c/cifar_resnet20/manidp-b0.55/seed0   # a trained one

Without ``--run`` the model is the backbone of the digits-c recipe with ManiDP's
gates at their initial weights: the time of a pass does not depend on the
weights, the number of keep rates the search tries does (the JSON says it).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader

from manidp.config import resolve
from manidp.data import build_dataset
from manidp.engine import load_model
from manidp.errors import UserError
from manidp.macs import count_macs
from manidp.methods import METHODS, RunContext, load_all
from manidp.models import build_backbone


def _model(run: str | None, budget: float):
    """(model, method, config, dense MACs) of a finished manidp run, or of the digits-c recipe's backbone
    to be gated (model and MACs None)."""
    if run:
        model, method, cfg, saved = load_model(run)
        if not hasattr(method, "_calibrate"):
            raise UserError(f"{run} is a {cfg['method']} run; this benchmark times ManiDP's calibration")
        return model, method, cfg, saved["dense_macs"]  # the gated model's own count would include its gates
    load_all()
    cfg = resolve(flags={"dataset": "digits-c", "method": "manidp", "budget": budget})
    method = METHODS.get("manidp")(cfg["method_options"], budget)
    return None, method, cfg, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a finished manidp run folder (default: a freshly gated digits-c model)")
    parser.add_argument("--budget", type=float, default=0.55, help="without --run: the MACs budget (default 0.55)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="whole calibrations each way (default 3)")
    parser.add_argument("--max-eval", type=int, default=None, help="only the first N validation images")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or not 0 < args.budget < 1:
        parser.error("--threads and --repeats must be >= 1, --budget in (0, 1)")
    torch.set_num_threads(args.threads)
    try:
        model, method, cfg, dense_macs = _model(args.run, args.budget)
        data = {**cfg["data"], **({"max_eval": args.max_eval} if args.max_eval else {})}
        splits = build_dataset(cfg["dataset"], data, seed=cfg["seed"])
    except UserError as err:
        print(f"calibration.py: {err}", file=sys.stderr)
        return 2
    fresh = model is None
    if fresh:
        torch.manual_seed(cfg["seed"])
        model = build_backbone(cfg["backbone"], splits.num_classes, splits.input_size[0])
        dense_macs = count_macs(model, splits.input_size)
    loader = DataLoader(splits.val, batch_size=cfg["train"]["eval_batch_size"], shuffle=False)
    ctx = RunContext(config=cfg, device=torch.device("cpu"), input_size=splits.input_size,
                     num_classes=splits.num_classes, dense_macs=dense_macs,
                     epochs=cfg["train"]["epochs"], steps_per_epoch=1, val_loader=loader,
                     autocast=contextlib.nullcontext, log=lambda _: None)
    if fresh:
        model = method.prepare(model, ctx)
    model.eval()
    held = method._held_blocks(model, ctx)  # what the default cap holds: the JSON says from which gate on
    trained = [float(site.gate.threshold) for site in method.gates]
    cap = type(method).calibration_cache_bytes
    ways = {"by_block": cap, "per_gate": 0}
    times: dict[str, list[float]] = {way: [] for way in ways}
    results: dict[str, dict] = {}
    settings: dict[str, int] = {}
    for repeat in range(args.repeats):
        for way in (ways if repeat % 2 == 0 else reversed(list(ways))):
            for site, threshold in zip(method.gates, trained):  # every calibration starts where training ended
                site.gate.threshold.fill_(threshold)
            method.calibration_cache_bytes = ways[way]
            calls = [0]
            original = method._set_keep_rate

            def counted(*a, **k):
                calls[0] += 1
                return original(*a, **k)

            method._set_keep_rate = counted
            start = time.perf_counter()
            method._calibrate(model, ctx, record=False)
            times[way].append(time.perf_counter() - start)
            del method._set_keep_rate
            settings[way] = calls[0]
            results.setdefault(way, method.calibration)
            if method.calibration != results[way]:
                print(f"calibration.py: the {way} calibration changed between repeats", file=sys.stderr)
                return 1
    equal = results["by_block"] == results["per_gate"]
    medians = {way: statistics.median(t) for way, t in times.items()}
    print(json.dumps({
        "model": args.run or f"{cfg['backbone']} freshly gated", "budget": method.budget,
        "validation_images": len(splits.val), "gates": len(method.gates), "threads": args.threads,
        "held_from_gate": held and held[0][held[1]].gates[0], "cap_bytes": cap,
        "keep_rates_tried": settings["by_block"], "by_block_s": round(medians["by_block"], 3),
        "per_gate_s": round(medians["per_gate"], 3), "ratio": round(medians["by_block"] / medians["per_gate"], 3),
        "identical_calibration": equal, "keep_rate": results["by_block"]["keep_rate"],
        "cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}))
    if not equal:
        print("calibration.py: the two ways gave different calibrations:\n"
              f"  by_block {results['by_block']}\n  per_gate {results['per_gate']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
