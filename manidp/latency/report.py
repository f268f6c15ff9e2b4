"""The latency report: what ``manidp latency`` writes for a run, and where it was measured.

:func:`latency_report` loads a run and times its deployed form against the
dense backbone; :func:`time_side_by_side` holds the fields every report shares
(the benchmarks call it too). The JSON says where and how it was measured
(:func:`hardware_profile`) and, for a requested device this machine lacks,
``{"status": "unavailable", "reason": ...}`` rather than anything invented.
"""
from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from manidp import kernels
from manidp._defaults import DTYPE_NAMES
from manidp.errors import UserError
from manidp.gating import (DEFAULT_SLICE_CACHE_MB, cast_deployed, deployed_blocks, gated_layers, onednn_bf16,
                           set_slice_cache_limit)
from manidp.latency.measure import measure_latency, paired_ratio, spread
from manidp.latency.plan import optimized_like_dense, prepare_deployed
from manidp.latency.reference import optimized_dense

__all__ = ["latency_report", "time_side_by_side", "hardware_profile", "device_unavailable", "device_state",
           "distinct_kept_sets", "DTYPES"]

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16)))


def device_unavailable(device: str) -> Optional[str]:
    """Why ``device`` cannot be used here (None when it can)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available on this machine"
    if device not in ("cpu", "cuda"):
        return f"unknown device '{device}'"
    return None


def device_state(device: str, result: str | Path) -> str:
    """'present' when ``device`` can be measured here or ``result`` already holds a measurement, else 'absent'.

    The workflow passes it as a parameter of each latency job, so a result
    that says "unavailable" is not final: when the device appears, the value
    changes and the job re-runs. A result measured elsewhere (a GPU machine)
    counts as 'present' wherever the workflow runs next, so moving results to
    a machine without the device never discards a measurement.
    """
    if device_unavailable(device) is None:
        return "present"
    try:
        measured = json.loads(Path(result).read_text()).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        measured = False
    return "present" if measured else "absent"


def _cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``; ``platform.processor()`` is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _onednn_version() -> Optional[str]:
    """oneDNN (MKL-DNN) version torch was built with, from ``torch.__config__.show()``."""
    match = re.search(r"MKL-DNN v([\w.]+)", torch.__config__.show())
    return match.group(1) if match else None


def hardware_profile(device: str, threads: int, dtype: str, batch_size: int = 1) -> dict:
    """The fields that say where and how a latency was measured: the settings and the hardware."""
    profile = {"device": device, "threads": threads, "dtype": dtype, "batch_size": batch_size,
               "torch": torch.__version__, "machine": platform.machine(), "cpu_model": _cpu_model(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
               "onednn": _onednn_version() if torch.backends.mkldnn.is_available() else None,
               # Idle OpenMP threads spin or sleep between operators: a batch-1 CPU latency depends on it
               # (benchmarks/README). None: the runtime's own default.
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "").lower() or None}
    if device == "cpu" and dtype == "bf16":
        # Without bf16 instructions (an AVX2 CPU) oneDNN refuses bf16 and both sides run ATen's emulated
        # bf16 convolutions: a ratio that says little about a deployment on a CPU that has them.
        profile["onednn_bf16"] = onednn_bf16()
    if device == "cuda":
        profile["gpu"] = torch.cuda.get_device_name()
        profile["cuda"] = torch.version.cuda
    return profile


def distinct_kept_sets(model: nn.Module) -> Optional[list[int]]:
    """Per gate of a gated (masked) model, the number of distinct kept sets in its last forward's batch
    (None for a model without gates): how often the deployed form's slice cache can hit at best."""
    gates = gated_layers(model)
    if not gates or any(site.mask is None for site in gates):
        return None
    return [int(torch.unique(site.mask != 0, dim=0).shape[0]) for site in gates]


def _gate_kernel(x: torch.Tensor) -> str:
    """Which gate form a deployed model timed on ``x`` ran: the compiled ops serve CPU tensors only."""
    return kernels.status() if x.is_cpu else f"ATen ({x.device.type}: the compiled ops run on the CPU only)"


def _plan_summary(plan: dict) -> dict:
    paths = [entry["path"] for entry in plan.values()]
    return {"gathered": paths.count("gathered"), "dense": paths.count("dense")}


def time_side_by_side(dense_eager: nn.Module, deployed: nn.Module, batches: Sequence[torch.Tensor],
                      reference: torch.Tensor, warmup: int, repeats: int, clock: str = "wall",
                      dense_reference: Optional[tuple[nn.Module, dict]] = None,
                      plan_batches: Optional[Sequence[torch.Tensor]] = None, inductor: bool = True) -> dict:
    """Time the eager dense model, the optimized dense reference and the deployed form side by side.

    A deployed form with gated blocks is planned, compiled and warmed on
    ``plan_batches`` (:func:`prepare_deployed`; instances disjoint from the
    timed ``batches``, or the plan and the cache would have seen the timed
    kept sets); the first pass over ``batches`` then gives the slice cache's
    first-pass hit rate, and the cache is restored to its post-warm-up state
    before every timed pass, so each pass is a first pass. A static method's
    model gets the reference's mode (:func:`optimized_like_dense`).
    ``reference``: the outputs the deployed form must reproduce (the masked
    model's, fp32). Returns the latency fields every report shares: times (ms,
    medians and spreads), ratios against the optimized dense reference and
    against eager dense, the dispatch plan and slice-cache counters (dynamic
    methods), and the deployed outputs' relative error. ``dense_reference``:
    the result of :func:`optimized_dense` for ``dense_eager`` on ``batches``,
    when the caller already built it (several runs timed against one dense
    model).
    """
    if deployed_blocks(deployed) and not plan_batches:
        raise UserError("a dynamic model is planned and warmed on instances other than the timed ones: "
                        "give plan_batches")
    dense, dense_info = dense_reference or optimized_dense(dense_eager, batches, inductor=inductor)
    fields: dict = {"dense_reference": dense_info}
    cache, before_pass = None, None
    if deployed_blocks(deployed):
        runnable, info = prepare_deployed(deployed, plan_batches, dense_info["memory_format"], dense_info["mode"])
        cache = info["cache"]
        warm = cache.snapshot()
        before_pass = {"deployed": lambda: cache.restore(warm)}
        fields.update(deployed_mode=info["mode"], deployed_memory_format=info["memory_format"],
                      memory_format_ms=info["memory_format_ms"], dispatch_plan=info["plan"],
                      dispatch_summary=_plan_summary(info["plan"]), gate_kernel=_gate_kernel(batches[0]))
        cache.reset_counts()
    else:
        runnable, fields["deployed_mode"] = optimized_like_dense(deployed, batches, dense_info["memory_format"],
                                                                 dense_info["mode"])
    with torch.inference_mode():
        out = torch.cat([runnable(x.clone()) for x in batches]).float()
    fields["deployed_max_rel_error"] = float((out - reference).abs().max() / reference.abs().max().clamp(min=1e-12))
    if cache is not None:
        fields["first_pass_hit_rate"] = cache.stats()["hit_rate"]
        cache.reset_counts()
    times = measure_latency({"dense_eager": dense_eager, "dense": dense, "deployed": runnable}, batches, warmup,
                            repeats, clock, before_pass)
    fields["clock"] = clock
    if cache is not None:
        fields["slice_cache"] = cache.stats()
    stats = {name: spread(t) for name, t in times.items()}
    dense_ms, eager_ms, deployed_ms = (stats[n]["median"] for n in ("dense", "dense_eager", "deployed"))
    return {
        "dense_ms": dense_ms, "dense_eager_ms": eager_ms, "deployed_ms": deployed_ms,
        "latency_ratio": deployed_ms / dense_ms, "speedup": dense_ms / deployed_ms,
        # Repeat by repeat, with a distribution-free interval: how far a figure can be read (measure.py).
        "latency_ratio_paired": paired_ratio(times["deployed"], times["dense"]),
        "latency_ratio_vs_eager": deployed_ms / eager_ms, "speedup_vs_eager": eager_ms / deployed_ms,
        "dense_ms_spread": stats["dense"], "dense_eager_ms_spread": stats["dense_eager"],
        "deployed_ms_spread": stats["deployed"], **fields,
        "dense_ms_repeats": times["dense"], "dense_eager_ms_repeats": times["dense_eager"],
        "deployed_ms_repeats": times["deployed"],
    }


def latency_report(run_dir: str | Path, device: str = "cpu", threads: Optional[int] = None, batch_size: int = 1,
                   dtype: str = "fp32", instances: int = 32, repeats: int = 10, warmup: int = 3,
                   dense_run: Optional[str | Path] = None,
                   slice_cache_mb: float = DEFAULT_SLICE_CACHE_MB, dense_cache: Optional[dict] = None,
                   plan_instances: int = 8, inductor: bool = True) -> dict:
    """Time a run's deployed model against the dense backbone; return the report (see :mod:`manidp.latency`).

    The deployed form is planned and warmed on the first ``plan_instances``
    VALIDATION instances and timed on TEST instances, so neither the plan nor
    the slice cache has seen a timed kept set; the report records the first
    pass's slice-cache hit rate and the distinct kept sets per gate of the
    timed instances: the regime the speed-up was measured in.

    ``dense_cache``: a dict shared by the calls of one process that time
    several runs against the same ``dense_run`` on the same images; the dense
    model and its optimized reference are then loaded, traced and chosen once
    (and every run is compared with the same reference).
    """
    reason = device_unavailable(device)
    if reason:
        return {"status": "unavailable", "reason": reason, "device": device}
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; valid dtypes: {', '.join(DTYPES)}")
    if batch_size < 1 or instances < 1 or repeats < 1 or warmup < 0 or plan_instances < 1:
        raise UserError("--batch-size, --instances, --plan-instances and --repeats must be >= 1, --warmup >= 0")
    if slice_cache_mb < 0:
        raise UserError(f"--slice-cache-mb must be >= 0, got {slice_cache_mb}")
    if threads:
        torch.set_num_threads(threads)
    from manidp.data import build_dataset
    from manidp.engine import load_model
    from manidp.macs import InstanceMacs
    from manidp.models import build_backbone

    model, method, cfg, saved = load_model(run_dir, device)
    splits = build_dataset(cfg["dataset"], cfg["data"], seed=cfg["seed"])
    count = min(instances, len(splits.test))
    images = torch.stack([splits.test[i][0] for i in range(count)]).to(device)
    planning = torch.stack([splits.val[i][0] for i in range(min(plan_instances, len(splits.val)))]).to(device)

    with torch.no_grad():
        model(images)
        counter = InstanceMacs(model, splits.input_size, device)
        macs = method.instance_macs(model, counter, count)
        reference = model(images).float()
        kept_sets = distinct_kept_sets(model)
    batches = [images[i:i + batch_size].to(DTYPES[dtype]) for i in range(0, count, batch_size)]
    plan_batches = [planning[i:i + batch_size].to(DTYPES[dtype]) for i in range(0, len(planning), batch_size)]
    # The thread count too: oneDNN lays out a prepacked weight for the threads it is packed at (AVX2's
    # brgemm convolutions do), and a weight packed for another count is reordered again on every call.
    key = (str(Path(dense_run).resolve()), device, dtype, batch_size, count, cfg["dataset"],
           json.dumps(cfg["data"], sort_keys=True, default=str), torch.get_num_threads()) if dense_run else None
    cached = dense_cache.get(key) if dense_cache is not None and key else None
    if cached:
        dense, dense_reference = cached
    else:
        if dense_run:
            dense = load_model(dense_run, device)[0]
        else:
            dense = build_backbone(cfg["backbone"], saved["num_classes"], saved["input_size"][0])
        dense = dense.to(device=device, dtype=DTYPES[dtype]).eval()
        dense_reference = optimized_dense(dense, batches, inductor=inductor)
        if dense_cache is not None and key:
            dense_cache[key] = (dense, dense_reference)
    dense_source = str(dense_run) if dense_run else "same architecture, fresh weights"
    report = {"status": "ok", "run": str(run_dir), "method": cfg["method"], "backbone": cfg["backbone"],
              "dataset": cfg["dataset"], "dense_source": dense_source, "instances": count,
              "plan_instances": len(planning), "distinct_kept_sets": kept_sets}
    deployed = method.deploy(model).eval()
    if deployed_blocks(deployed):
        set_slice_cache_limit(deployed, slice_cache_mb)
        cast_deployed(deployed, device, DTYPES[dtype])
    else:
        deployed.to(device=device, dtype=DTYPES[dtype])
    report.update(time_side_by_side(dense, deployed, batches, reference, warmup, repeats,
                                    dense_reference=dense_reference, plan_batches=plan_batches))
    if dtype != "fp32":
        report["deployed_max_rel_error"] = None
    report.update({
        "macs_ratio": float(macs.mean()) / saved["dense_macs"],
        "macs_mean": float(macs.mean()), "macs_dense": saved["dense_macs"],
        "repeats": repeats, "warmup": warmup,
        "profile": hardware_profile(device, torch.get_num_threads(), dtype, batch_size),
    })
    return report
