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

from manidp.gating import DEFAULT_SLICE_CACHE_MB, deploy_model, insert_gates, kept_channels
from manidp.latency import hardware_profile, time_side_by_side
from manidp.macs import InstanceMacs, count_macs
from manidp.methods.manidp import SaliencyGate

INPUT = (3, 224, 224)


def _kept_count(rate: float, channels: int) -> int:
    return max(1, round(rate * channels))


def force_keep_pattern(gates, rate: float, generator: torch.Generator) -> None:
    """Make every gate keep the same random ``round(rate * C)`` channels (mask 1) for any input."""
    for site in gates:
        channels = site.out_channels
        keep = torch.randperm(channels, generator=generator)[: _kept_count(rate, channels)]
        bias = -torch.ones(channels)
        bias[keep] = 1.0
        with torch.no_grad():
            site.gate.fc2.weight.zero_()
            site.gate.fc2.bias.copy_(bias)


def gated_resnet34(reduction: float, seed: int = 0):
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
            kept = torch.tensor([float(_kept_count(rate, site.out_channels))])
            out_kept.update({name: kept for name in site.conv_names})
            in_kept.update({name: kept for name in site.consumer_names})
        return float(counter(1, in_kept, out_kept)[0]) / dense_macs

    rate = min((i / 512 for i in range(1, 513)), key=lambda r: abs(1 - planned_ratio(r) - reduction))
    force_keep_pattern(gates, rate, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        gated(torch.randn(1, *INPUT))
    measured = float(counter(1, *kept_channels(gates))[0]) / dense_macs
    return dense, gated, measured, rate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduction", type=float, default=0.55, help="requested MACs reduction (default 0.55)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--instances", type=int, default=2, help="random inputs per repeat")
    parser.add_argument("--slice-cache-mb", type=float, default=DEFAULT_SLICE_CACHE_MB,
                        help="memory cap of the deployed form's slice cache")
    parser.add_argument("--profile", action="store_true",
                        help="also print a torch.profiler table of the deployed model (stderr)")
    args = parser.parse_args(argv)

    dense, gated, macs_ratio, rate = gated_resnet34(args.reduction)
    inputs = [torch.randn(1, *INPUT) for _ in range(args.instances)]
    with torch.no_grad():
        reference = torch.cat([gated(x) for x in inputs])
    for threads in args.threads:
        torch.set_num_threads(threads)
        deployed = deploy_model(gated, slice_cache_mb=args.slice_cache_mb)  # planned on this thread count
        fields = time_side_by_side(dense, deployed, inputs, reference, args.warmup, args.repeats)
        print(json.dumps({
            "benchmark": "resnet34_latency", "threads": threads, "requested_reduction": args.reduction,
            "keep_rate": rate, "macs_ratio": macs_ratio,
            "latency_over_macs": fields["latency_ratio"] / macs_ratio, **fields,
            "repeats": args.repeats, "profile": hardware_profile("cpu", threads, "fp32"),
        }), flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
                for x in inputs:
                    deployed(x.clone())
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
