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

The package reads in the order a timing is built: :mod:`~manidp.latency.measure`
(the interleaved timer, the clocks, the spread of repeats, the paired ratio),
:mod:`~manidp.latency.reference` (the optimized dense reference),
:mod:`~manidp.latency.plan` (the deployed form planned, compiled and warmed to
match it) and :mod:`~manidp.latency.report` (the side-by-side fields, the
run's JSON, the hardware profile and device availability).
"""
from manidp.latency.measure import MEMORY_FORMATS, InMemoryFormat, measure_latency, paired_ratio, spread
from manidp.latency.plan import prepare_deployed
from manidp.latency.reference import inductor_compile, optimized_dense
from manidp.latency.report import (DTYPES, device_state, device_unavailable, distinct_kept_sets, hardware_profile,
                                   latency_report, time_side_by_side)

__all__ = ["measure_latency", "hardware_profile", "device_unavailable", "device_state", "latency_report", "spread",
           "paired_ratio", "optimized_dense", "inductor_compile", "prepare_deployed", "time_side_by_side",
           "distinct_kept_sets", "InMemoryFormat", "MEMORY_FORMATS", "DTYPES"]
