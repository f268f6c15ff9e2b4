"""Deployed ManiDP on trained digits-c runs: the training gate against its inference form, side by side.

For each run folder (a finished ``manidp`` run; its dense run is the sibling
``dense/seed{N}`` folder), the optimized dense reference
(:func:`manidp.latency.optimized_dense`) and two deployed forms are built and
timed in one process, interleaved, on the first ``--instances`` test images:

* ``training_gate``: the deployed model running the method's own gate
  (pool, Linear, ReLU, Linear, ReLU, clamp, compare, masked fill);
* ``inference_gate``: the same model with the gate's
  ``inference_form()`` (ReLU, clamp and threshold folded into clamp + one
  ``threshold`` op), the form ``manidp latency`` times.

Both must give the same outputs bit for bit (checked). Output: one JSON
object per run with medians (ms) and the speed against the optimized dense
reference.

    python benchmarks/digits_c_gates.py runs/digits-c/cifar_resnet20/manidp-b0.55/seed0 --threads 2
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from unittest import mock

import torch

from manidp.data import build_dataset
from manidp.engine import load_model
from manidp.errors import UserError
from manidp.latency import measure_latency, optimized_dense, prepare_deployed
from manidp.methods.manidp import SaliencyGate


def _deployed(method, model, inputs, info, inference_gate: bool):
    if inference_gate:
        deployed = method.deploy(model).eval()
    else:
        with mock.patch.object(SaliencyGate, "inference_form", None):
            deployed = method.deploy(model).eval()
    return prepare_deployed(deployed, inputs, info["memory_format"], info["mode"])[0]


def compare(run: Path, instances: int, repeats: int) -> dict:
    dense_dir = run.parent.parent / "dense" / run.name
    if not (run / "model.pt").is_file() or not (dense_dir / "model.pt").is_file():
        raise UserError(f"{run} needs model.pt and a finished dense run at {dense_dir}")
    model, method, cfg, _ = load_model(run, "cpu")
    if cfg["method"] != "manidp":
        raise UserError(f"{run} is a {cfg['method']} run; this benchmark compares ManiDP's gate forms")
    dense = load_model(dense_dir, "cpu")[0].eval()
    splits = build_dataset(cfg["dataset"], cfg["data"], seed=cfg["seed"])
    inputs = [splits.test[i][0][None] for i in range(min(instances, len(splits.test)))]
    reference, info = optimized_dense(dense, inputs)
    forms = {name: _deployed(method, model, inputs, info, name == "inference_gate")
             for name in ("training_gate", "inference_gate")}
    with torch.inference_mode():
        outputs = {name: torch.cat([f(x.clone()) for x in inputs]) for name, f in forms.items()}
    times = measure_latency({"dense": reference, **forms}, inputs, warmup=3, repeats=repeats)
    ms = {name: statistics.median(t) for name, t in times.items()}
    return {"run": str(run), "threads": torch.get_num_threads(), "dense_reference": f"{info['mode']}/"
            f"{info['memory_format']}", "median_ms": ms,
            "speed_vs_dense": {name: ms["dense"] / ms[name] for name in forms},
            "identical_outputs": bool(torch.equal(outputs["training_gate"], outputs["inference_gate"]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished manidp run folders")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--instances", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    try:
        for run in args.runs:
            print(json.dumps(compare(run, args.instances, args.repeats)))
    except UserError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
