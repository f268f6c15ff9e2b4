"""The deployed form made ready for timing the way the dense reference was.

A dynamic method's deployed model gets its dispatch plan (per block: gathered
or dense-then-mask, picked on planning instances that are never timed), the
memory format it runs fastest in (measured, as the reference's is), a
compiled mode matching the reference's, and a warm slice cache; a static method's model gets the reference's optimizations as they are.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn

from manidp.errors import UserError
from manidp.gating import compile_deployed, fold_batchnorm, fuse_onednn, plan_deployment, slice_cache, trace_and_freeze
from manidp.gating.plan import time_call
from manidp.latency.measure import MEMORY_FORMATS, InMemoryFormat
from manidp.latency.reference import inductor_compile

__all__ = ["prepare_deployed", "optimized_like_dense"]


def prepare_deployed(deployed: nn.Module, inputs: Sequence[torch.Tensor], memory_format: str, mode: str,
                     plan_repeats: int = 5, choose_format: bool = True) -> tuple[nn.Module, dict]:
    """A deployed model made ready for timing: planned, compiled like the dense reference, warm.

    :func:`~manidp.gating.plan_deployment` picks each block's path on
    ``inputs`` (planning instances: never the timed ones), the static parts
    are compiled as the reference was (``torchscript``: frozen,
    :func:`~manidp.gating.compile_deployed`; ``onednn`` and ``inductor``:
    prepacked and fused, :func:`~manidp.gating.fuse_onednn`, which is what
    Inductor emits for them; the gathered blocks' data-dependent shapes and
    the compiled gate ops keep Inductor itself out), and the model runs
    ``inputs`` once more so the slice cache holds what their kept sets need.

    The memory format is chosen like the reference's, by measurement: with
    ``choose_format`` and a block on the gathered path, a copy is prepared in
    the other format too and both are timed on ``inputs`` as served (each
    instance on a slice cache warmed by the others only); the faster is kept.
    A form whose blocks all run dense-then-mask is the dense model plus masks,
    so the reference's format stands. Returns the model to time (taking NCHW
    inputs) and ``{"plan", "cache", "mode", "memory_format", "memory_format_ms"}``
    (``cache`` is the kept model's slice cache, a copy's when the other format won).
    """
    other = copy.deepcopy(deployed) if choose_format and _gathered_capable(inputs) else None
    runnable, info = _prepare(deployed, inputs, memory_format, mode, plan_repeats)
    info.update(memory_format=memory_format, memory_format_ms=None)
    if other is None or not any(p["path"] == "gathered" for p in info["plan"].values()):
        return runnable, info
    alternative = "contiguous" if memory_format == "channels_last" else "channels_last"
    other_runnable, other_info = _prepare(other, inputs, alternative, mode, plan_repeats)
    other_info["memory_format"] = alternative
    timed = {memory_format: _served_ms(runnable, info["cache"], inputs, plan_repeats),
             alternative: _served_ms(other_runnable, other_info["cache"], inputs, plan_repeats)}
    runnable, info = (other_runnable, other_info) if timed[alternative] < timed[memory_format] else (runnable, info)
    info["memory_format_ms"] = timed
    return runnable, info


def _gathered_capable(inputs: Sequence[torch.Tensor]) -> bool:
    """Whether a block may run gathered on these inputs (batch-1 CPU); otherwise every block runs dense."""
    return bool(inputs) and all(x.is_cpu and x.shape[0] == 1 for x in inputs)


def _prepare(deployed: nn.Module, inputs: Sequence[torch.Tensor], memory_format: str, mode: str,
             plan_repeats: int) -> tuple[nn.Module, dict]:
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


@torch.inference_mode()
def _served_ms(runnable: nn.Module, cache, inputs: Sequence[torch.Tensor], repeats: int) -> float:
    """Mean ms per instance of ``runnable`` over ``inputs``, each timed on a slice cache warmed by the other
    instances only (as a timed instance meets the cache the planning instances warmed); the cache is
    left as it was."""
    start = cache.snapshot()
    warmed = []
    for i in range(len(inputs)):
        cache.clear()
        for _ in range(2):  # twice: a slice is packed on its first reuse, so a shared kept set is timed packed
            for j, x in enumerate(inputs):
                if j != i:
                    runnable(x.clone())
        warmed.append(cache.snapshot())
    try:
        return time_call(runnable, inputs, repeats, lambda i: cache.restore(warmed[i]))
    finally:
        cache.restore(start)


def optimized_like_dense(model: nn.Module, inputs: Sequence[torch.Tensor], memory_format: str,
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
