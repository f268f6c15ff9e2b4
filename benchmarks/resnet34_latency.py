"""Batch-1 CPU latency of a gated resnet34 at a forced MACs reduction (no training needed).

timm resnet34 at 224x224 with random weights gets ManiDP saliency gates whose
keep pattern is forced: the gates still run (pooling, two Linear layers,
threshold), but their last layer is set so that every instance keeps the same
randomly chosen ``round(r * C)`` channels of every gated conv. ``r`` is the
uniform keep rate whose MACs reduction, as the benchmark's one counter
(:class:`manidp.macs.InstanceMacs`, gates included) measures it exactly, is
closest to ``--reduction``. The dense timm model (same weights, BN unfolded,
as it runs in practice) and the deployed form (``manidp.gating.deploy_model``)
are timed side by side in one process (warm-up, interleaved repeats, median),
for each thread count. Output: one JSON object per measurement.

    python benchmarks/resnet34_latency.py                      # 0.55, 1 and 2 threads
    python benchmarks/resnet34_latency.py --reduction 0.40 --threads 4
    python benchmarks/resnet34_latency.py --profile            # where the deployed time goes
"""
from __future__ import annotations

import argparse
import copy
import json
import sys

import timm
import torch

from manidp.gating import DEFAULT_SLICE_CACHE_MB, deploy_model, deployed_blocks, insert_gates, kept_channels
from manidp.latency import (MEMORY_FORMATS, InMemoryFormat, hardware_profile, measure_latency, optimized_dense,
                            prepare_deployed, spread, time_side_by_side)
from manidp.macs import InstanceMacs, count_macs
from manidp.methods.manidp import SaliencyGate

INPUT = (3, 224, 224)


def _kept_count(rate: float, channels: int, multiple: int = 1) -> int:
    """round(rate * C), rounded to a multiple of ``multiple`` (the SIMD block, as ``round_to`` does)."""
    return min(channels, max(multiple, round(rate * channels / multiple) * multiple))


def force_keep_pattern(gates, rate: float, generator: torch.Generator, multiple: int = 1) -> None:
    """Make every gate keep the same random ``round(rate * C)`` channels (mask 1) for any input."""
    for site in gates:
        channels = site.out_channels
        keep = torch.randperm(channels, generator=generator)[: _kept_count(rate, channels, multiple)]
        bias = -torch.ones(channels)
        bias[keep] = 1.0
        with torch.no_grad():
            site.gate.fc2.weight.zero_()
            site.gate.fc2.bias.copy_(bias)


def gated_resnet34(reduction: float, seed: int = 0, multiple: int = 1):
    """(dense model, gated model, measured MACs ratio, keep rate) for the requested reduction.

    The keep rate is chosen on the kept counts alone; the MACs ratio reported
    is then measured from the masks a real forward produces.
    """
    torch.manual_seed(seed)
    dense = timm.create_model("resnet34", pretrained=False).eval()
    for module in dense.modules():  # timm zero-initialises each block's last BN: give the branches real outputs
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.0)
    dense_macs = count_macs(dense, INPUT)
    gated = copy.deepcopy(dense)
    gates = insert_gates(gated, SaliencyGate)
    gated.eval()
    counter = InstanceMacs(gated, INPUT)

    def planned_ratio(rate: float) -> float:
        in_kept, out_kept = {}, {}
        for site in gates:
            kept = torch.tensor([float(_kept_count(rate, site.out_channels, multiple))])
            out_kept.update({name: kept for name in site.conv_names})
            in_kept.update({name: kept for name in site.consumer_names})
        return float(counter(1, in_kept, out_kept)[0]) / dense_macs

    rate = min((i / 512 for i in range(1, 513)), key=lambda r: abs(1 - planned_ratio(r) - reduction))
    force_keep_pattern(gates, rate, torch.Generator().manual_seed(seed), multiple)
    with torch.no_grad():
        gated(torch.randn(1, *INPUT))
    measured = float(counter(1, *kept_channels(gates))[0]) / dense_macs
    return dense, gated, measured, rate


def ablations(dense, gated, inputs, args, threads: int, macs_ratio: float) -> dict:
    """What each optimization buys: the deployed form with one of them removed, all timed side by side.

    ``full``: everything; ``no_slice_cache``: slices gathered (unpacked) on
    every call; ``eager_gates``: gates as eager modules, not frozen TorchScript;
    ``nchw``: NCHW activations instead of the dense reference's format;
    ``no_dispatch``: every block gathered, nothing frozen; ``aten_ops``: no
    compiled ops (:mod:`manidp.kernels`: gate, scale + pool, residual + ReLU
    as ATen ops). Ratios are against the optimized dense reference.
    """
    reference, info = optimized_dense(dense, inputs)
    fmt, mode = info["memory_format"], info["mode"]

    def variant(cache_mb=args.slice_cache_mb, memory_format=fmt, eager_gates=False, compiled=True):
        deployed = deploy_model(gated, slice_cache_mb=cache_mb)
        for block in deployed_blocks(deployed).values():
            block.use_kernels = compiled
            if eager_gates:
                block.fused = [getattr(block, f"gate{i + 1}") for i in range(len(block.fused))]
        return prepare_deployed(deployed, inputs, memory_format, mode)[0]

    undispatched = deploy_model(gated, slice_cache_mb=args.slice_cache_mb).to(memory_format=MEMORY_FORMATS[fmt])
    models = {"dense_eager": dense, "dense": reference, "full": variant(), "no_slice_cache": variant(cache_mb=0),
              "eager_gates": variant(eager_gates=True), "aten_ops": variant(compiled=False),
              "nchw": variant(memory_format="contiguous" if fmt == "channels_last" else "channels_last"),
              "no_dispatch": InMemoryFormat(undispatched, fmt)}
    times = measure_latency(models, inputs, args.warmup, args.repeats, args.clock)
    medians = {name: spread(t)["median"] for name, t in times.items()}
    return {"benchmark": "resnet34_latency_ablations", "threads": threads, "clock": args.clock,
            "macs_ratio": macs_ratio,
            "dense_reference": info, "ms": medians,
            "latency_ratio": {name: ms / medians["dense"] for name, ms in medians.items()},
            "profile": hardware_profile("cpu", threads, "fp32")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduction", type=float, default=0.55, help="requested MACs reduction (default 0.55)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--instances", type=int, default=2, help="random inputs per repeat")
    parser.add_argument("--slice-cache-mb", type=float, default=DEFAULT_SLICE_CACHE_MB,
                        help="memory cap of the deployed form's slice cache")
    parser.add_argument("--round-to", type=int, default=1,
                        help="kept counts rounded to this multiple (8/16: oneDNN's SIMD block; default 1 = none)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the calling thread's CPU time (1 thread only; robust when others share the cores)")
    parser.add_argument("--ablations", action="store_true",
                        help="also time the deployed form with one optimization removed at a time, side by side")
    parser.add_argument("--profile", action="store_true",
                        help="also print a torch.profiler table of the deployed model (stderr)")
    args = parser.parse_args(argv)
    if args.round_to < 1:
        parser.error("--round-to must be >= 1")

    dense, gated, macs_ratio, rate = gated_resnet34(args.reduction, multiple=args.round_to)
    inputs = [torch.randn(1, *INPUT) for _ in range(args.instances)]
    with torch.no_grad():
        reference = torch.cat([gated(x) for x in inputs])
    for threads in args.threads:
        torch.set_num_threads(threads)
        deployed = deploy_model(gated, slice_cache_mb=args.slice_cache_mb)  # planned on this thread count
        fields = time_side_by_side(dense, deployed, inputs, reference, args.warmup, args.repeats, args.clock)
        print(json.dumps({
            "benchmark": "resnet34_latency", "threads": threads, "requested_reduction": args.reduction,
            "round_to": args.round_to,
            "keep_rate": rate, "macs_ratio": macs_ratio,
            "latency_over_macs": fields["latency_ratio"] / macs_ratio, **fields,
            "repeats": args.repeats, "profile": hardware_profile("cpu", threads, "fp32"),
        }), flush=True)
        if args.ablations:
            print(json.dumps(ablations(dense, gated, inputs, args, threads, macs_ratio)), flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
                for x in inputs:
                    deployed(x.clone())
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
