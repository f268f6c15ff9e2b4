"""Batch-1 latency of a trained model's deployed form against its dense backbone.

``manidp latency RUN_DIR`` loads the run, builds ``method.deploy(model)`` (for a
dynamic method: the form that never computes a pruned channel) and the dense
model (``--dense RUN_DIR``'s weights, else the same architecture with fresh
weights: latency does not depend on the values), and times both on the first
N test instances **in one process** (a dynamic model planned and warmed on
validation instances, so no timed kept set was seen before), after warm-up, with interleaved repeats
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

import copy
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from manidp import kernels
from manidp._defaults import DTYPE_NAMES
from manidp.errors import UserError
from manidp.gating import (DEFAULT_SLICE_CACHE_MB, cast_deployed, compile_deployed, deployed_blocks, fold_batchnorm,
                           fuse_onednn, gated_layers, plan_deployment, set_slice_cache_limit, slice_cache,
                           trace_and_freeze)

__all__ = ["measure_latency", "hardware_profile", "device_unavailable", "device_state", "latency_report", "spread",
           "optimized_dense", "inductor_compile", "prepare_deployed", "time_side_by_side", "distinct_kept_sets",
           "InMemoryFormat", "MEMORY_FORMATS"]

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
               "onednn": _onednn_version() if torch.backends.mkldnn.is_available() else None}
    if device == "cuda":
        profile["gpu"] = torch.cuda.get_device_name()
        profile["cuda"] = torch.version.cuda
    return profile


@torch.inference_mode()
def measure_latency(models: Mapping[str, Callable], inputs: Sequence[torch.Tensor], warmup: int = 3,
                    repeats: int = 10, clock: str = "wall",
                    before_pass: Optional[Mapping[str, Callable[[], None]]] = None) -> dict[str, list[float]]:
    """Per-instance time (ms) of each model over ``inputs``, one list entry per repeat.

    Each repeat runs every model once over all inputs, in an order that
    alternates between repeats (A B, B A, ...); ``warmup`` untimed repeats
    come first. Take the median of each list. On CUDA the time comes from
    CUDA events around each pass (one synchronisation per pass, none per
    instance), so queued kernels are counted and host overhead overlaps them.

    ``clock="cpu"`` times CPU work of the calling thread instead of wall time
    (``time.thread_time``): with one torch thread on a machine other jobs
    share, it leaves out the time the process waited for a core. It is not a
    latency at more threads (the other threads' work is not counted).

    ``before_pass``: per model name, a call made (untimed) before each of
    that model's passes, warm-up included; a deployed model's slice cache is
    restored there to its state after warm-up, so that running the same
    instances again never turns their misses into hits.
    """
    if not inputs:
        raise UserError("latency needs at least one input instance")
    if clock not in ("wall", "cpu"):
        raise UserError(f"unknown clock '{clock}'; valid clocks: wall, cpu")
    if clock == "cpu" and (inputs[0].is_cuda or torch.get_num_threads() != 1):
        raise UserError("the cpu clock measures one CPU thread: use it with --threads 1 on the CPU")
    now = time.perf_counter if clock == "wall" else time.thread_time
    names = list(models)
    cuda = inputs[0].is_cuda
    times = {name: [] for name in names}

    def run(name) -> float:
        model = models[name]
        if before_pass and name in before_pass:
            before_pass[name]()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for x in inputs:
                model(x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / len(inputs)
        start = now()
        for x in inputs:
            model(x)
        return (now() - start) * 1000 / len(inputs)

    for _ in range(warmup):
        for name in names:
            run(name)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(run(name))
    return times


def spread(values: Sequence[float]) -> dict:
    """Median and spread of repeated timings: ``{"median", "p25", "p75", "min", "max"}`` (ms)."""
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "p25": q[0], "p75": q[2], "min": ordered[0], "max": ordered[-1]}


MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


class InMemoryFormat(nn.Module):
    """Runs ``model`` on its input converted to ``memory_format`` (inputs arrive NCHW; the copy is timed)."""

    def __init__(self, model: Callable, memory_format: str):
        super().__init__()
        self.model = model
        self.memory_format = memory_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=MEMORY_FORMATS[self.memory_format]))


def inductor_compile(model: nn.Module, example: torch.Tensor) -> tuple[Callable, float]:
    """``model`` compiled by Inductor with freezing on (weights constant-folded, oneDNN convolutions
    prepacked, what ``torch.compile`` offers a deployed CPU model), compiled now on ``example``; returns
    it and the compile time (s). Raises whatever the compiler raises (no C++ compiler, an op it cannot
    lower): callers drop the candidate and record why."""
    import torch._inductor.config as inductor_config

    start = time.perf_counter()
    compiled = torch.compile(model, dynamic=False)
    with inductor_config.patch(freezing=True), torch.inference_mode():
        compiled(example)
    return compiled, time.perf_counter() - start


def _reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def optimized_dense(model: nn.Module, inputs: Sequence[torch.Tensor], repeats: int = 5,
                    inductor: bool = True) -> tuple[nn.Module, dict]:
    """The honest dense reference: every optimization that is not channel skipping.

    BN folded into the convolutions, then the fastest of these candidates,
    measured here side by side on ``inputs``: eager and frozen TorchScript in
    NCHW and channels_last; ``onednn/channels_last``, the deployed form's own
    convolution machinery (:func:`~manidp.gating.fuse_onednn`: weights
    reordered once, ReLU and residual sums fused); and, with ``inductor``,
    ``inductor/channels_last`` (:func:`inductor_compile`). A candidate that
    cannot be built is dropped with its reason. Returns the reference (taking
    NCHW inputs) and ``{"mode", "memory_format", "candidates_ms"`` (each
    candidate's fastest repeat), ``"dropped", "compile_s"}``; the deployed form is then built in the same memory format
    and a matching mode (:func:`prepare_deployed`).
    """
    folded = fold_batchnorm(copy.deepcopy(model).eval().requires_grad_(False))
    candidates, dropped, compile_s = {}, {}, {}
    for name, memory_format in MEMORY_FORMATS.items():
        converted = copy.deepcopy(folded).to(memory_format=memory_format)
        candidates[f"eager/{name}"] = InMemoryFormat(converted, name)
        example = inputs[0].contiguous(memory_format=memory_format)
        candidates[f"torchscript/{name}"] = InMemoryFormat(trace_and_freeze(converted, example), name)
    example = inputs[0].contiguous(memory_format=torch.channels_last)
    try:
        candidates["onednn/channels_last"] = InMemoryFormat(
            fuse_onednn(copy.deepcopy(folded).to(memory_format=torch.channels_last), example), "channels_last")
    except UserError as err:
        dropped["onednn/channels_last"] = str(err)
    if not inductor:  # the JSON says why the candidate is missing, not only that it is
        dropped["inductor/channels_last"] = "left out by the hardware profile (inductor: false / --no-inductor)"
    elif not example.is_cpu:
        dropped["inductor/channels_last"] = "timed on the CPU only"
    else:
        try:
            compiled, compile_s["inductor/channels_last"] = inductor_compile(
                copy.deepcopy(folded).to(memory_format=torch.channels_last), example)
            candidates["inductor/channels_last"] = InMemoryFormat(compiled, "channels_last")
        except Exception as err:  # noqa: BLE001 - the compiler's many failure types all mean "no candidate"
            dropped["inductor/channels_last"] = _reason(err)
    times = measure_latency(candidates, inputs, warmup=1, repeats=repeats)
    # the fastest repeat, not the median: other jobs on a shared machine only ever add time
    fastest = {name: min(t) for name, t in times.items()}
    best = min(fastest, key=fastest.get)
    mode, memory_format = best.split("/")
    return candidates[best], {"mode": mode, "memory_format": memory_format, "candidates_ms": fastest,
                              "dropped": dropped, "compile_s": compile_s}


def prepare_deployed(deployed: nn.Module, inputs: Sequence[torch.Tensor], memory_format: str, mode: str,
                     plan_repeats: int = 5) -> tuple[nn.Module, dict]:
    """A deployed model made ready for timing in the dense reference's memory format and a matching mode.

    :func:`~manidp.gating.plan_deployment` picks each block's path on
    ``inputs`` (planning instances: never the timed ones), the static parts
    are compiled as the reference was (``torchscript``: frozen,
    :func:`~manidp.gating.compile_deployed`; ``onednn`` and ``inductor``:
    prepacked and fused, :func:`~manidp.gating.fuse_onednn`, which is what
    Inductor emits for them; the gathered blocks' data-dependent shapes and
    the compiled gate ops keep Inductor itself out), and the model runs
    ``inputs`` once more so the slice cache holds what their kept sets need.
    Returns the model to time (taking NCHW inputs) and ``{"plan", "cache",
    "mode"}``.
    """
    deployed.to(memory_format=MEMORY_FORMATS[memory_format])
    converted = [x.contiguous(memory_format=MEMORY_FORMATS[memory_format]) for x in inputs]
    plan = plan_deployment(deployed, converted, plan_repeats, freeze_dense=mode == "torchscript")
    cache = slice_cache(deployed)
    mode = "onednn" if mode == "inductor" else mode
    runnable = deployed
    if mode == "torchscript":
        runnable = compile_deployed(deployed, converted[0])
    elif mode == "onednn":
        try:
            runnable = fuse_onednn(deployed, converted[0].clone())
        except UserError:
            mode = "eager"
    with torch.inference_mode():
        for x in converted:
            runnable(x.clone())
    return InMemoryFormat(runnable, memory_format), {"plan": plan, "cache": cache, "mode": mode}


def _optimized_like_dense(model: nn.Module, inputs: Sequence[torch.Tensor], memory_format: str,
                          mode: str) -> tuple[nn.Module, str]:
    """A static method's model (physically pruned, or masked per activation) with the reference's optimizations.

    BN folded, the reference's memory format and mode (frozen TorchScript,
    prepacked oneDNN or Inductor); a model that mode cannot take runs eager
    (the outputs are checked against the masked model's either way). Returns
    the model and the mode it got.
    """
    model = fold_batchnorm(model.eval()).to(memory_format=MEMORY_FORMATS[memory_format])
    example = inputs[0].contiguous(memory_format=MEMORY_FORMATS[memory_format])
    try:
        if mode == "torchscript":
            model = trace_and_freeze(model, example)
        elif mode == "onednn":
            model = fuse_onednn(model, example)
        elif mode == "inductor":
            model = inductor_compile(model, example)[0]
    except Exception:  # noqa: BLE001 - any failure of a compiler means: run it eager
        mode = "eager"
    return InMemoryFormat(model, memory_format), mode


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
    model gets the reference's mode (:func:`_optimized_like_dense`).
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
        fields.update(deployed_mode=info["mode"], dispatch_plan=info["plan"],
                      dispatch_summary=_plan_summary(info["plan"]), gate_kernel=_gate_kernel(batches[0]))
        cache.reset_counts()
    else:
        runnable, fields["deployed_mode"] = _optimized_like_dense(deployed, batches, dense_info["memory_format"],
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
    """Time a run's deployed model against the dense backbone; return the report (see module doc).

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
    key = (str(Path(dense_run).resolve()), device, dtype, batch_size, count, cfg["dataset"],
           json.dumps(cfg["data"], sort_keys=True, default=str)) if dense_run else None
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
