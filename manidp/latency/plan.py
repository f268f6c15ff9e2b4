"""The deployed form made ready for timing the way the dense reference was.

A dynamic method's deployed model gets its dispatch plan (per block: gathered
or dense-then-mask, picked on planning instances that are never timed), the
reference's memory format and a matching compiled mode, and a warm slice
cache; a static method's model gets the reference's optimizations as they are.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from manidp.errors import UserError
from manidp.gating import compile_deployed, fold_batchnorm, fuse_onednn, plan_deployment, slice_cache, trace_and_freeze
from manidp.latency.measure import MEMORY_FORMATS, InMemoryFormat
from manidp.latency.reference import inductor_compile

__all__ = ["prepare_deployed", "optimized_like_dense"]


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
