"""The timer: per-instance times of several models over the same inputs, side by side in one process.

The models run in an order that alternates every repeat, so drift on a shared
machine hits each alike; callers quote medians and ratios, never a lone
absolute time. Inputs arrive NCHW: a model that wants another memory format
converts inside the timed call (:class:`InMemoryFormat`), so the conversion is
paid where a deployment would pay it.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from manidp.errors import UserError

__all__ = ["measure_latency", "spread", "paired_ratio", "InMemoryFormat", "MEMORY_FORMATS"]

MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


class InMemoryFormat(nn.Module):
    """Runs ``model`` on its input converted to ``memory_format`` (inputs arrive NCHW; the copy is timed)."""

    def __init__(self, model: Callable, memory_format: str):
        super().__init__()
        self.model = model
        self.memory_format = memory_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=MEMORY_FORMATS[self.memory_format]))


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


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float], level: float = 0.95) -> dict:
    """The ratio of two models' times repeat by repeat: ``{"median", "low", "high", "level", "n"}``.

    Each repeat ran both models back to back (:func:`measure_latency`), so a
    drift of the machine's speed moves both sides of one repeat alike and
    cancels in their ratio, which a ratio of the two medians does not do.
    ``low``/``high`` bound the median of the per-repeat ratios with at least
    ``level`` confidence by order statistics alone (the sign test's interval:
    no assumption on how the times are distributed); with fewer than 6
    repeats no interval reaches 0.95 and both are None.
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("paired_ratio needs two equally long, non-empty lists of times")
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    n = len(ratios)
    # [ratios[k], ratios[n-1-k]] misses the median when k+1 or more ratios fall on one side of it:
    # probability 2 P(Binomial(n, 1/2) <= k). The narrowest interval (largest k) that misses rarely enough.
    low = high = None
    for k in range((n - 1) // 2, -1, -1):
        if k < n - 1 - k and 1 - 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n >= level:
            low, high = ratios[k], ratios[n - 1 - k]
            break
    return {"median": statistics.median(ratios), "low": low, "high": high, "level": level, "n": n}
