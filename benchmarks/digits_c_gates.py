"""Deployed ManiDP / FBS on trained digits-c runs: the gate forms side by side.

For each run folder (a finished ``manidp`` or ``fbs`` run; its dense run is the
sibling ``dense/seed{N}`` folder, or ``--dense DIR``), the optimized dense reference
(:func:`manidp.latency.optimized_dense`) and the deployed forms are built and
timed in one process, interleaved, on the first ``--instances`` test images:

* ``training_gate`` (ManiDP only): the deployed model running the method's
  own gate as ATen ops (pool, Linear, ReLU, Linear, ReLU, clamp, compare,
  masked fill) and a multiply;
* ``aten_gate``: the gate's leanest ATen form (ManiDP: ``inference_form()``,
  ReLU, clamp and threshold folded into clamp + one ``threshold`` op; FBS: its
  own gate) and a multiply;
* ``compiled_gate``: each gate and its mask multiply as one compiled op
  (``torch.ops.manidp.gate_scale_``, :mod:`manidp.kernels`), the form
  ``manidp latency`` times where the op could be built;
* ``inductor_gate`` (unless ``--no-inductor``): the trained gated model
  (dense convolutions, ATen gates, mask multiplies: what the deployed form
  runs on this dataset) compiled whole by ``torch.compile`` (Inductor,
  freezing on), the field's compiler in place of the hand-written op. Its
  compile time is measured cold (an empty Inductor cache, a folder of this
  process's own) and warm (the same model compiled again after
  ``torch._dynamo.reset()``, what a second latency job on the machine pays).

The ATen forms must agree bit for bit (checked unplanned, on each block path);
the compiled one to fp32 rounding (its relative error is printed). Output: one JSON object per run
with medians (ms) and the speed against the optimized dense reference.

    python benchmarks/digits_c_gates.py runs/digits-c/cifar_resnet20/manidp-b0.55/seed0 --threads 2
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
from pathlib import Path
from unittest import mock

import torch

from manidp import kernels
from manidp.data import build_dataset
from manidp.engine import load_model
from manidp.errors import UserError
from manidp.gating import deployed_blocks
from manidp.latency import (MEMORY_FORMATS, InMemoryFormat, inductor_compile, measure_latency, optimized_dense,
                            prepare_deployed)
from manidp.latency.reference import _reason  # the dense reference's one-line failure reason
from manidp.methods.manidp import SaliencyGate


def _deploy_form(method, model, form: str):
    """The deployed model with ``form``'s gates, not yet planned."""
    if form == "training_gate":
        with mock.patch.object(SaliencyGate, "inference_form", None):
            deployed = method.deploy(model).eval()
    else:
        deployed = method.deploy(model).eval()
    if form != "compiled_gate":
        for block in deployed_blocks(deployed).values():
            block.use_kernels = False  # the ATen gate and a multiply
    return deployed


def _deployed(method, model, planning, info, form: str):
    return prepare_deployed(_deploy_form(method, model, form), planning, info["memory_format"], info["mode"])[0]


def _aten_forms_identical(method, model, inputs) -> bool:
    """Whether ManiDP's two ATen gate forms give the same bits, on each block path in turn.

    Not on the timed forms: each is planned by timing, so under load two forms can
    choose different paths or memory formats for a block, and then differ by
    rounding for that reason alone.
    """
    forms = [_deploy_form(method, model, form) for form in ("training_gate", "aten_gate")]
    for path in ("dense", "gathered"):
        outputs = []
        for deployed in forms:
            for block in deployed_blocks(deployed).values():
                block.path = path
            with torch.inference_mode():
                outputs.append(torch.cat([deployed(x.clone()) for x in inputs]))
        if not torch.equal(*outputs):
            return False
    return True


def _inductor_form(model, planning, info) -> tuple[object, dict]:
    """The trained gated model (dense convolutions, ATen gates, mask multiplies: the dense-then-mask path)
    compiled whole by Inductor with freezing; the callable and its compile times (s).

    Not the deployed form: its blocks share one method across instances that each hold prepacked oneDNN
    weights, so Dynamo recompiles per block, hits its recompile limit and runs the rest eager. The masked
    model is what Inductor can take whole (BN folded by freezing, convolutions prepacked, the gates'
    pointwise ops fused).
    """
    memory_format = MEMORY_FORMATS[info["memory_format"]]
    eager = InMemoryFormat(copy.deepcopy(model).eval().to(memory_format=memory_format), info["memory_format"])
    example = planning[0].clone()
    with tempfile.TemporaryDirectory(prefix="inductor-cold-") as cache, \
            mock.patch.dict(os.environ, {"TORCHINDUCTOR_CACHE_DIR": cache}):
        torch._dynamo.reset()
        compiled, cold = inductor_compile(eager, example)
        torch._dynamo.reset()
        compiled, warm = inductor_compile(eager, example)
    return compiled, {"cold": cold, "warm": warm}


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def compare(run: Path, instances: int, repeats: int, dense_dir: Path | None = None, inductor: bool = True) -> dict:
    dense_dir = dense_dir or run.parent.parent / "dense" / run.name
    if not (run / "model.pt").is_file() or not (dense_dir / "model.pt").is_file():
        raise UserError(f"{run} needs model.pt and a finished dense run at {dense_dir}")
    model, method, cfg, _ = load_model(run, "cpu")
    if cfg["method"] not in ("manidp", "fbs"):
        raise UserError(f"{run} is a {cfg['method']} run; this benchmark compares ManiDP's and FBS's gate forms")
    if not kernels.available():
        raise UserError(f"the compiled gate op is needed here: {kernels.status()}")
    dense = load_model(dense_dir, "cpu")[0].eval()
    splits = build_dataset(cfg["dataset"], cfg["data"], seed=cfg["seed"])
    inputs = [splits.test[i][0][None] for i in range(min(instances, len(splits.test)))]
    planning = [splits.val[i][0][None] for i in range(min(8, len(splits.val)))]  # never the timed instances
    reference, info = optimized_dense(dense, inputs, inductor=inductor)
    names = (("training_gate",) if cfg["method"] == "manidp" else ()) + ("aten_gate", "compiled_gate")
    forms = {name: _deployed(method, model, planning, info, name) for name in names}
    compile_s = {}
    if inductor:
        try:
            forms["inductor_gate"], compile_s = _inductor_form(model, planning, info)
        except Exception as err:  # noqa: BLE001 - any compiler failure: the row is absent, the reason printed
            compile_s = {"failed": _reason(err)}
    with torch.inference_mode():
        outputs = {name: torch.cat([f(x.clone()) for x in inputs]) for name, f in forms.items()}
    times = measure_latency({"dense": reference, **forms}, inputs, warmup=3, repeats=repeats)
    ms = {name: statistics.median(t) for name, t in times.items()}
    result = {"run": str(run), "method": cfg["method"], "threads": torch.get_num_threads(),
              "dense_reference": info, "median_ms": ms, "load_average": os.getloadavg(),
              "speed_vs_dense": {name: ms["dense"] / ms[name] for name in forms},
              "compiled_rel_error": _rel_error(outputs["compiled_gate"], outputs["aten_gate"]),
              "inductor_compile_s": compile_s,
              "gate_kernel": kernels.status()}
    if "inductor_gate" in outputs:
        result["inductor_rel_error"] = _rel_error(outputs["inductor_gate"], outputs["aten_gate"])
    if "training_gate" in outputs:
        result["aten_forms_identical"] = _aten_forms_identical(method, model, inputs)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished manidp / fbs run folders")
    p.add_argument("--dense", type=Path, help="the dense run to compare with (default: the sibling dense/seedN)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--instances", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--no-inductor", dest="inductor", action="store_false",
                   help="leave torch.compile (Inductor) out: of the dense reference's candidates and of the "
                        "gate forms (no inductor_gate row)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        for run in args.runs:
            print(json.dumps(compare(run, args.instances, args.repeats, args.dense, args.inductor)))
    except UserError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
