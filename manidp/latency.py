"""Batch-1 latency of a trained model's deployed form against its dense backbone.

``manidp latency RUN_DIR`` loads the run, builds ``method.deploy(model)`` (for a
dynamic method: the form that never computes a pruned channel) and the dense
model (``--dense RUN_DIR``'s weights, else the same architecture with fresh
weights: latency does not depend on the values), and times both on the first
N test instances **in one process**, after warm-up, with interleaved repeats
(the order alternates every repeat so drift hits both alike), reporting the
median per-instance time of each, their ratio and the MACs ratio of the very
instances it ran. Shared machines are noisy: quote the ratios, never a lone
absolute time.

:func:`measure_latency` is the reusable timer (the resnet34 benchmark and the
workflow's latency rule call it). A requested device this machine lacks gives
``{"status": "unavailable", "reason": ...}`` and exit status 0: nothing is
invented.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from manidp.errors import UserError

__all__ = ["measure_latency", "hardware_profile", "device_unavailable", "latency_report"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def device_unavailable(device: str) -> Optional[str]:
    """Why ``device`` cannot be used here (None when it can)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available on this machine"
    if device not in ("cpu", "cuda"):
        return f"unknown device '{device}'"
    return None


def hardware_profile(device: str, threads: int, dtype: str, batch_size: int = 1) -> dict:
    """The fields that say where and how a latency was measured."""
    profile = {"device": device, "threads": threads, "dtype": dtype, "batch_size": batch_size,
               "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
               "cpu_count": os.cpu_count()}
    if device == "cuda":
        profile["gpu"] = torch.cuda.get_device_name()
    return profile


@torch.inference_mode()
def measure_latency(models: Mapping[str, Callable], inputs: Sequence[torch.Tensor], warmup: int = 3,
                    repeats: int = 10) -> dict[str, list[float]]:
    """Per-instance time (ms) of each model over ``inputs``, one list entry per repeat.

    Each repeat runs every model once over all inputs, in an order that
    alternates between repeats (A B, B A, ...); ``warmup`` untimed repeats
    come first. Take the median of each list.
    """
    if not inputs:
        raise UserError("latency needs at least one input instance")
    names = list(models)
    cuda = inputs[0].is_cuda
    times = {name: [] for name in names}

    def run(model) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for x in inputs:
            model(x)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000 / len(inputs)

    for _ in range(warmup):
        for name in names:
            run(models[name])
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(run(models[name]))
    return times


def _ratio_fields(times: dict[str, list[float]], dense: str = "dense", deployed: str = "deployed") -> dict:
    dense_ms = statistics.median(times[dense])
    deployed_ms = statistics.median(times[deployed])
    return {"dense_ms": dense_ms, "deployed_ms": deployed_ms, "latency_ratio": deployed_ms / dense_ms,
            "speedup": dense_ms / deployed_ms}


def latency_report(run_dir: str | Path, device: str = "cpu", threads: Optional[int] = None, batch_size: int = 1,
                   dtype: str = "fp32", instances: int = 32, repeats: int = 10, warmup: int = 3,
                   dense_run: Optional[str | Path] = None) -> dict:
    """Time a run's deployed model against the dense backbone; return the report (see module doc)."""
    reason = device_unavailable(device)
    if reason:
        return {"status": "unavailable", "reason": reason, "device": device}
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; valid dtypes: {', '.join(DTYPES)}")
    if batch_size < 1 or instances < 1 or repeats < 1 or warmup < 0:
        raise UserError("--batch-size, --instances and --repeats must be >= 1, --warmup >= 0")
    if threads:
        torch.set_num_threads(threads)
    from manidp.data import build_dataset
    from manidp.engine import load_model
    from manidp.macs import InstanceMacs
    from manidp.models import build_backbone

    model, method, cfg, saved = load_model(run_dir, device)
    if method.dynamic and batch_size != 1:
        raise UserError(f"'{method.name}' is dynamic: its deployed form runs batch size 1 (got --batch-size "
                        f"{batch_size})")
    splits = build_dataset(cfg["dataset"], cfg["data"], seed=cfg["seed"])
    count = min(instances, len(splits.test))
    images = torch.stack([splits.test[i][0] for i in range(count)]).to(device)

    with torch.no_grad():
        model(images)
        counter = InstanceMacs(model, splits.input_size, device)
        macs = method.instance_macs(model, counter, count)
        reference = model(images).float()
    deployed = method.deploy(model).to(device=device, dtype=DTYPES[dtype]).eval()
    if dense_run:
        dense = load_model(dense_run, device)[0]
        dense_source = str(dense_run)
    else:
        dense = build_backbone(cfg["backbone"], saved["num_classes"], saved["input_size"][0])
        dense_source = "same architecture, fresh weights"
    dense = dense.to(device=device, dtype=DTYPES[dtype]).eval()

    batches = [images[i:i + batch_size].to(DTYPES[dtype]) for i in range(0, count, batch_size)]
    with torch.inference_mode():
        out = torch.cat([deployed(x) for x in batches]).float()
    max_rel_error = float((out - reference).abs().max() / reference.abs().max().clamp(min=1e-12))
    times = measure_latency({"dense": dense, "deployed": deployed}, batches, warmup, repeats)
    return {
        "status": "ok", "run": str(run_dir), "method": cfg["method"], "backbone": cfg["backbone"],
        "dataset": cfg["dataset"], "dense_source": dense_source, "instances": count,
        **_ratio_fields(times),
        "macs_ratio": float(macs.mean()) / saved["dense_macs"],
        "macs_mean": float(macs.mean()), "macs_dense": saved["dense_macs"],
        "deployed_max_rel_error": max_rel_error if dtype == "fp32" else None,
        "repeats": repeats, "warmup": warmup,
        "dense_ms_repeats": times["dense"], "deployed_ms_repeats": times["deployed"],
        "profile": hardware_profile(device, torch.get_num_threads(), dtype, batch_size),
    }


def _add_arguments(p) -> None:
    p.add_argument("run_dir", help="a finished run folder (holds model.pt)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--instances", type=int, default=32, help="first N test instances (default 32)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dense", help="dense run folder whose weights the dense model uses")
    p.add_argument("--out", help="JSON file to write (default: print only)")


def _run(args) -> int:
    report = latency_report(args.run_dir, args.device, args.threads, args.batch_size, args.dtype, args.instances,
                            args.repeats, args.warmup, args.dense)
    text = json.dumps(report, indent=2)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)
    return 0


def _register() -> None:
    from manidp.cli import register_subcommand

    register_subcommand("latency", "batch-1 latency of a run's deployed model vs its dense backbone",
                        _add_arguments, _run)


_register()
