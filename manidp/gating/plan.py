"""Planning and freezing a deployed model for the hardware it runs on (what latency measurement uses).

:func:`plan_deployment` times both paths of every deployed block on the
running hardware and keeps the faster (the plan is returned, to record); the
gathered path is timed leave-one-out, each instance on a slice cache warmed
by the other instances only, as an instance in use meets it.
:func:`compile_deployed` freezes what is static (the whole model when every
block runs dense, else the dense-path blocks).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from manidp.errors import UserError
from manidp.gating.deployed import _Deployed, deployed_blocks
from manidp.gating.fusion import trace_and_freeze

__all__ = ["plan_deployment", "compile_deployed", "time_call", "block_inputs"]


def _clock() -> Callable[[], float]:
    """The planner's clock: with one CPU thread that thread's CPU time, which leaves out waits for a busy
    core; else wall time (a module function, so tests can give the planner a fake clock)."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def time_call(func: Callable, inputs: Sequence[torch.Tensor], repeats: int,
               before: Optional[Callable[[int], None]] = None) -> float:
    """Fastest over ``repeats`` of the mean time (ms) of ``func`` over ``inputs`` (each cloned: blocks
    may overwrite their input), after one untimed pass. The minimum, not the median: other jobs on a
    shared machine only ever add time, and a plan compares two paths, not absolute latencies.

    ``before(i)``, when given, runs untimed before input ``i`` is timed (the planner restores the slice
    cache there, so each instance is timed with the cache it would meet in use)."""
    now = _clock() if inputs[0].is_cpu else time.perf_counter
    times = []
    for r in range(repeats + 1):
        clones = [x.clone() for x in inputs]
        total = 0.0
        for i, x in enumerate(clones):
            if before is not None:
                before(i)
            start = now()
            func(x)
            total += now() - start
        if r:
            times.append(total * 1000 / len(inputs))
    return min(times)


def block_inputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Each deployed block's inputs, by block name, when ``model`` runs each of ``inputs`` (every input and
    every recorded tensor cloned: a gathered block overwrites its input)."""
    seen: dict[str, list] = {name: [] for name in deployed_blocks(model)}
    handles = [block.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].clone()))
               for name, block in deployed_blocks(model).items()]
    try:
        for x in inputs:
            model(x.clone())
    finally:
        for h in handles:
            h.remove()
    return seen


def _leave_one_out(block: "_Deployed", inputs: Sequence[torch.Tensor]) -> Callable[[int], None]:
    """Before timing instance ``i`` of ``inputs`` on the gathered path: the slice cache as it was when
    planning began plus what the OTHER instances put there, never instance ``i``'s own slices.

    In use the timed instances are not the planning ones, so a kept set recurs only if other instances
    had it: a plan timed on a cache that already holds the instance's own slices counts every miss as a
    hit and puts blocks on the gathered path that lose to dense-then-mask once kept sets vary. One
    instance alone is timed on a cache without its slices (all misses)."""
    cache = block.cache
    start = cache.snapshot()
    warmed = []
    for i in range(len(inputs)):
        cache.restore(start)
        for _ in range(2):  # twice: a slice is packed on its first reuse, so a shared kept set is timed packed
            for j, x in enumerate(inputs):
                if j != i:
                    block.gathered(x.clone())
        warmed.append(cache.snapshot())
    cache.restore(start)

    def before(i: int) -> None:
        cache.restore(warmed[i])

    return before


@torch.no_grad()
def plan_deployment(model: nn.Module, inputs: Sequence[torch.Tensor], repeats: int = 5,
                    freeze_dense: bool = True) -> dict[str, dict]:
    """Choose, per deployed block, the faster of its gathered and dense-then-mask paths, in place.

    Each block is timed on the inputs it receives when ``model`` runs
    ``inputs`` (real instances, so its gates keep what they keep in use),
    both ways, with this process's threads and dtype: the plan belongs to the
    hardware profile it was measured on. The gathered path is timed
    leave-one-out (:func:`_leave_one_out`): each instance meets a slice cache
    warmed on the other instances only, as a timed instance meets one warmed
    on the planning instances, so a kept set that varies per instance is
    timed as the miss it will be. With ``freeze_dense`` the dense path
    is timed as :func:`compile_deployed` will run it (frozen TorchScript).
    Off CPU, or for batches > 1, every block runs dense (no host
    synchronisation). Returns ``{block name: {"path", "gathered_ms",
    "dense_ms", "kept": [mean kept channels per gate]}}``.
    """
    blocks = deployed_blocks(model)
    if not blocks:
        raise UserError("plan_deployment needs a deployed model (deploy_model first)")
    if not inputs:
        raise UserError("plan_deployment needs at least one input")
    for block in blocks.values():
        block.path = "dense"
    seen = block_inputs(model, inputs)
    plan = {}
    for name, block in blocks.items():
        received = seen[name]
        kept = _kept_counts(block, received)
        if not (received[0].is_cpu and received[0].shape[0] == 1):
            block.path = "dense"
            plan[name] = {"path": "dense", "gathered_ms": None, "dense_ms": None, "kept": kept}
            continue
        dense = trace_and_freeze(_DensePath(block), received[0]) if freeze_dense else block.dense
        before = _leave_one_out(block, received)
        gathered_ms = time_call(block.gathered, received, repeats, before)
        dense_ms = time_call(dense, received, repeats)
        block.path = "gathered" if gathered_ms < dense_ms else "dense"
        plan[name] = {"path": block.path, "gathered_ms": gathered_ms, "dense_ms": dense_ms, "kept": kept}
    return plan


def _kept_counts(block: _Deployed, inputs: Sequence[torch.Tensor]) -> list[float]:
    """Mean kept channels per gate of ``block`` over ``inputs`` (recorded with the plan)."""
    per_call = []
    for x in inputs:
        block.recorded = []
        try:
            block.dense(x.clone())
            per_call.append([float((mask != 0).sum(1).float().mean()) for mask in block.recorded])
        finally:
            block.recorded = None
    return [statistics.mean(column) for column in zip(*per_call)]


class _DensePath(nn.Module):
    """A deployed block forced onto its dense path (what gets traced and frozen)."""

    def __init__(self, block: _Deployed):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.dense(x)


@torch.no_grad()
def compile_deployed(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Freeze what is static in a planned deployed model, for inputs shaped like ``example``.

    When every block runs dense (or the input is not batch-1 CPU) the whole
    model is static: it is traced and frozen as one TorchScript graph, like
    the optimized dense reference. Otherwise each dense-path block is frozen
    in place and the gathered blocks stay eager (their shapes depend on the
    data). Returns the model to run.
    """
    blocks = deployed_blocks(model)
    gathered = example.is_cpu and example.shape[0] == 1 and any(b.path == "gathered" for b in blocks.values())
    if not gathered:
        return trace_and_freeze(model, example)
    inputs = block_inputs(model, [example])
    for name, block in blocks.items():
        if block.path == "dense":
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, trace_and_freeze(_DensePath(block), inputs[name][0]))
    return model
