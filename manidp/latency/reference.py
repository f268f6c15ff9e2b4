"""The honest dense reference: the dense model with every optimization that is not channel skipping.

A speed-up is only worth quoting against the fastest dense model this machine
can run, so the reference is chosen by measurement among several compiled
forms, and a form that cannot be built here is dropped with its reason (the
report records it).
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn

from manidp.errors import UserError
from manidp.gating import fold_batchnorm, fuse_onednn, trace_and_freeze
from manidp.latency.measure import MEMORY_FORMATS, InMemoryFormat, measure_latency

__all__ = ["optimized_dense", "inductor_compile"]


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
    and a matching mode (:func:`~manidp.latency.plan.prepare_deployed`).
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
