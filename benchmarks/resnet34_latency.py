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
for each thread count. Output: one JSON object per measurement; its
``latency_ratio_paired`` is the median of the per-repeat ratios with a 95 %
interval (with ``--repeats 15``, the default, about the 4th to 12th ratio),
the figure's resolution on this machine. torch's OpenMP threads spin while
idle (``OMP_WAIT_POLICY=ACTIVE`` unless the environment says otherwise).

    python benchmarks/resnet34_latency.py                      # 0.55, 1 and 2 threads
    python benchmarks/resnet34_latency.py --reduction 0.40 --threads 4
    python benchmarks/resnet34_latency.py --profile            # where the deployed time goes
    python benchmarks/resnet34_latency.py --processes 3        # the same measurement in 3 fresh processes
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

# Idle OpenMP threads spin between operators, as a latency deployment on its own cores runs them (both
# sides get it: one process). The runtime reads this once, when torch loads it, so it is set before the
# import; OMP_WAIT_POLICY=PASSIVE in the environment times the sleeping regime. Each JSON line's profile
# records which (benchmarks/README, "The OpenMP wait policy").
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

import timm  # noqa: E402
import torch  # noqa: E402

from manidp.gating import (DEFAULT_SLICE_CACHE_MB, deploy_model, deployed_blocks, insert_gates, kept_channels,
                           slice_cache)
from manidp.latency import (MEMORY_FORMATS, InMemoryFormat, distinct_kept_sets, hardware_profile, measure_latency,
                            optimized_dense, paired_ratio, prepare_deployed, spread, time_side_by_side)
from manidp.macs import InstanceMacs, count_macs
from manidp.methods.manidp import SaliencyGate

SIZE = 224  # ImageNet resolution; --size changes it (the tests run smaller inputs, which prove the fields, not the speed)
PATTERNS = ("static", "per_instance")
CALIBRATION = 16  # random inputs that place the per-instance gates' thresholds (never planned on nor timed)


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


def draw_per_instance(gated, gates, rate: float, calibration: torch.Tensor, generator: torch.Generator, macs,
                      threshold: float = 1.0) -> float:
    """Make every gate keep a kept set that varies per instance, each channel kept for about ``rate`` of them.

    Each gate's two Linear layers become random projections of its pooled
    input, standardised per input channel on ``calibration`` (a batch disjoint
    from the planning and timed instances); each output channel's bias puts
    the threshold at that channel's ``1 - rate`` quantile. Calibrated in one
    batched forward, gate by gate in forward order, so every gate sees inputs
    the gates before it already shaped. The kept count varies per instance
    (the MACs ratio is measured on the timed instances' own masks). Returns
    the mean MACs ratio of the calibration batch.
    """
    def calibrate(site):
        def hook(gate, args):
            pooled = args[0].mean((2, 3)).float()
            hidden, inputs = gate.fc1.weight.shape
            w1 = torch.randn(hidden, inputs, generator=generator) / pooled.std(0).clamp(min=1e-6) / inputs ** 0.5
            w2 = torch.randn(site.out_channels, hidden, generator=generator) / hidden ** 0.5
            z = torch.relu(pooled @ w1.T) @ w2.T
            gate.fc1.weight.copy_(w1)
            gate.fc2.weight.copy_(w2)
            gate.fc2.bias.copy_(threshold - torch.quantile(z, 1 - rate, dim=0))
            gate.threshold.fill_(threshold)
            gate.clamp_max = threshold  # kept channels' mask is exactly 1, as in the static pattern
        return hook

    handles = [site.gate.register_forward_pre_hook(calibrate(site)) for site in gates]
    try:
        with torch.no_grad():
            gated(calibration)
    finally:
        for handle in handles:
            handle.remove()
    counter, dense_macs = macs
    return float(counter(len(calibration), *kept_channels(gates)).mean()) / dense_macs


def gated_resnet34(reduction: float, seed: int = 0, multiple: int = 1, pattern: str = "static",
                   calibration: torch.Tensor | None = None, size: int = SIZE):
    """(dense model, gated model, gates, keep rate) for the requested reduction and keep pattern.

    The keep rate is chosen on the kept counts alone (as if static); the MACs
    ratio is then measured from the masks real forwards produce.
    """
    torch.manual_seed(seed)
    dense = timm.create_model("resnet34", pretrained=False).eval()
    for module in dense.modules():  # timm zero-initialises each block's last BN: give the branches real outputs
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.0)
    dense_macs = count_macs(dense, (3, size, size))
    gated = copy.deepcopy(dense)
    gates = insert_gates(gated, SaliencyGate)
    gated.eval()
    counter = InstanceMacs(gated, (3, size, size))

    def planned_ratio(rate: float) -> float:
        in_kept, out_kept = {}, {}
        for site in gates:
            kept = torch.tensor([float(_kept_count(rate, site.out_channels, multiple))])
            out_kept.update({name: kept for name in site.conv_names})
            in_kept.update({name: kept for name in site.consumer_names})
        return float(counter(1, in_kept, out_kept)[0]) / dense_macs

    rate = min((i / 512 for i in range(1, 513)), key=lambda r: abs(1 - planned_ratio(r) - reduction))
    if pattern == "static":
        force_keep_pattern(gates, rate, torch.Generator().manual_seed(seed), multiple)
    else:
        # a channel kept at random for a fraction r of instances costs more than r of the MACs on average
        # (conv2 pays kept in x kept out, and the counts vary): correct r on the calibration batch
        for attempt in range(4):
            ratio = draw_per_instance(gated, gates, rate, calibration, torch.Generator().manual_seed(seed),
                                      (counter, dense_macs))
            if attempt == 3 or abs(ratio - (1 - reduction)) < 0.005:
                break
            rate = min(1.0, rate * ((1 - reduction) / ratio) ** 0.5)
    return dense, gated, gates, rate, (counter, dense_macs)


def measured_macs_ratio(gated, gates, macs, inputs) -> float:
    """Mean MACs ratio of ``inputs`` from the masks a real forward produces (gates included)."""
    counter, dense_macs = macs
    with torch.no_grad():
        gated(torch.cat(inputs))
    return float(counter(len(inputs), *kept_channels(gates)).mean()) / dense_macs


class IndependentOneDNNResNet34(torch.nn.Module):
    """timm's resnet34 as prepacked oneDNN calls, written without the project's code: the cross-check
    that the project's dense reference (``manidp.latency.optimized_dense``) leaves nothing on the table.

    BN folded by hand, each weight reordered once for its input shape, ReLU fused
    into conv1 and the stem, the residual sum and its ReLU fused into conv2
    (oneDNN's binary post-op), channels_last activations.
    """

    def __init__(self, model, input_shape):
        super().__init__()
        shapes = {}
        hooks = [m.register_forward_pre_hook(lambda m, a: shapes.__setitem__(m, list(a[0].shape)))
                 for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            model(torch.zeros(input_shape))
        for h in hooks:
            h.remove()

        def pack(conv, bn):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            weight = (conv.weight * scale[:, None, None, None]).detach()
            bias = (bn.bias - bn.running_mean * scale).detach()
            args = (list(conv.padding), list(conv.stride), list(conv.dilation))
            return (torch.ops.mkldnn._reorder_convolution_weight(weight, *args, 1, shapes[conv]), bias, *args)

        self.stem = pack(model.conv1, model.bn1)
        self.maxpool, self.fc = model.maxpool, model.fc
        self.blocks = [(pack(b.conv1, b.bn1), pack(b.conv2, b.bn2),
                        None if b.downsample is None else pack(b.downsample[0], b.downsample[1]))
                       for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]

    @staticmethod
    def _conv(x, packed, relu):
        weight, bias, padding, stride, dilation = packed
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, 1,
                                                       "relu" if relu else "none", [], "")

    def forward(self, x):
        x = self.maxpool(self._conv(x.contiguous(memory_format=torch.channels_last), self.stem, True))
        for conv1, conv2, downsample in self.blocks:
            y = self._conv(x, conv1, True)
            shortcut = x if downsample is None else self._conv(x, downsample, False)
            weight, bias, padding, stride, dilation = conv2
            x = torch.ops.mkldnn._convolution_pointwise.binary(y, shortcut, weight, bias, padding, stride, dilation,
                                                               1, "add", 1.0, "relu", [], "")
        return self.fc(x.mean((2, 3)))


def ablations(dense, gated, inputs, plan_inputs, args, threads: int, macs_ratio: float, dense_reference) -> dict:
    """What each optimization buys: the deployed form with one of them removed, all timed side by side.

    ``full``: everything; ``no_slice_cache``: slices gathered (unpacked) on
    every call; ``eager_gates``: gates as eager modules, not frozen TorchScript;
    ``reference_format``: the dense reference's memory format, where ``full``
    times both formats on the planning instances and keeps the faster;
    ``no_dispatch``: every block gathered, nothing compiled; ``aten_ops``: no
    compiled ops (:mod:`manidp.kernels`: gate, scale + pool, residual + ReLU
    as ATen ops); ``no_kept_padding``: kept sets not padded to oneDNN's SIMD
    block (every new kept count a new convolution shape, a new oneDNN
    primitive);
    ``aten_gather``: a miss gathers its kept weights with two ATen
    index_selects and reorders them from OIHW, instead of
    ``manidp::gather_slice`` writing them channels-last in one pass;
    ``pack_on_miss``: a slice is packed when it is gathered, not on its first
    reuse (a kept set that never recurs pays a reorder it never uses);
    ``padded_inputs``: a recurring slice reads the padded kept set as its
    input channels, not the kept channels alone; ``unfused_glue``: scale,
    pool, gate 2 and the dropping of the padding as three calls (the
    ``scale_pool_`` op, the gate op, a copy), not one (``scale_pool_gate``).
    Each is planned and warmed on ``plan_inputs`` and its slice cache
    restored before every pass. Ratios are against the optimized dense
    reference.
    """
    reference, info = dense_reference
    fmt, mode = info["memory_format"], info["mode"]
    restore = {}

    def variant(name, cache_mb=args.slice_cache_mb, memory_format=fmt, eager_gates=False, compiled=True,
                dispatch=True, kept_block=None, gather_kernel=True, pack_on_reuse=True, choose_format=True,
                exact_inputs=True, fused_glue=True):
        deployed = deploy_model(gated, slice_cache_mb=cache_mb)
        for block in deployed_blocks(deployed).values():
            block.use_kernels, block.gather_kernel, block.pack_on_reuse = compiled, gather_kernel, pack_on_reuse
            block.exact_inputs, block.fused_glue = exact_inputs, fused_glue
            if kept_block is not None:
                block.kept_block = kept_block
            if eager_gates:
                block.fused = [getattr(block, f"gate{i + 1}") for i in range(len(block.fused))]
        cache = slice_cache(deployed)
        if dispatch:
            runnable, prepared = prepare_deployed(deployed, plan_inputs, memory_format, mode,
                                                  choose_format=choose_format)
            cache = prepared["cache"]  # a copy's, when the other memory format won
        else:
            runnable = InMemoryFormat(deployed.to(memory_format=MEMORY_FORMATS[memory_format]), memory_format)
            with torch.inference_mode():
                for x in plan_inputs:
                    runnable(x.clone())
        warm = cache.snapshot()
        restore[name] = lambda: cache.restore(warm)
        return runnable

    models = {"dense_eager": dense, "dense": reference, "full": variant("full"),
              "no_slice_cache": variant("no_slice_cache", cache_mb=0),
              "eager_gates": variant("eager_gates", eager_gates=True), "aten_ops": variant("aten_ops", compiled=False),
              "reference_format": variant("reference_format", choose_format=False),
              "no_dispatch": variant("no_dispatch", dispatch=False),
              "no_kept_padding": variant("no_kept_padding", kept_block=1),
              "aten_gather": variant("aten_gather", gather_kernel=False),
              "pack_on_miss": variant("pack_on_miss", pack_on_reuse=False),
              "padded_inputs": variant("padded_inputs", exact_inputs=False),
              "unfused_glue": variant("unfused_glue", fused_glue=False)}
    times = measure_latency(models, inputs, args.warmup, args.repeats, args.clock, restore)
    medians = {name: spread(t)["median"] for name, t in times.items()}
    return {"benchmark": "resnet34_latency_ablations", "threads": threads, "clock": args.clock,
            "macs_ratio": macs_ratio, "dense_reference": info, "ms": medians,
            "latency_ratio": {name: ms / medians["dense"] for name, ms in medians.items()},
            "latency_ratio_paired": {name: paired_ratio(t, times["dense"]) for name, t in times.items()},
            "load_average": os.getloadavg(), "profile": hardware_profile("cpu", threads, "fp32")}


def crosscheck(dense_reference, independent, inputs, args, threads: int) -> dict:
    """The project's dense reference against :class:`IndependentOneDNNResNet34`, side by side."""
    times = measure_latency({"reference": dense_reference[0], "independent": independent}, inputs, args.warmup,
                            args.repeats, args.clock)
    ms = {name: spread(t)["median"] for name, t in times.items()}
    return {"benchmark": "resnet34_dense_crosscheck", "threads": threads, "clock": args.clock,
            "dense_reference": dense_reference[1], "ms": ms, "reference_over_independent":
            ms["reference"] / ms["independent"], "load_average": os.getloadavg(),
            "profile": hardware_profile("cpu", threads, "fp32")}


def _without_processes(argv: list[str]) -> list[str]:
    """The command line less its --processes option (each child runs one measurement)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out


def across_processes(processes: int, argv: list[str]) -> int:
    """Run this script ``processes`` times in fresh processes, one after the other; print every child's
    lines (with ``"process": i``), then per keep pattern and thread count the paired ratio of each process
    and their median, minimum and maximum.

    Within one process the paired interval (``latency_ratio_paired``) covers the repeats' noise. A fresh
    process also draws its own memory placement, thread placement and dispatch plan, and at 2 threads
    those move the ratio by more than that interval (benchmarks/README): a figure quoted against a target
    should come from several processes. The children inherit this process's environment (its
    ``OMP_WAIT_POLICY`` included, set before any of them loads torch).
    """
    import statistics
    import subprocess

    ratios: dict = {}
    for i in range(processes):
        result = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
        sys.stderr.write(result.stderr)
        if result.returncode != 0:
            print(f"resnet34_latency.py: process {i} failed (exit {result.returncode})", file=sys.stderr)
            return result.returncode
        for line in result.stdout.splitlines():
            row = json.loads(line) | {"process": i}
            print(json.dumps(row), flush=True)
            if row["benchmark"] == "resnet34_latency":
                ratios.setdefault((row["keep_pattern"], row["threads"]), []).append(
                    row["latency_ratio_paired"]["median"])
    for (pattern, threads), values in ratios.items():
        print(json.dumps({"benchmark": "resnet34_latency_processes", "keep_pattern": pattern, "threads": threads,
                          "processes": processes, "latency_ratio_paired": values,
                          "median": statistics.median(values), "min": min(values), "max": max(values)}), flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduction", type=float, default=0.55, help="requested MACs reduction (default 0.55)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", type=int, default=SIZE, help=f"input height and width (default {SIZE})")
    parser.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS),
                        help="keep patterns: static (every input keeps the same channels) and per_instance "
                             "(a kept set per instance); default both")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--instances", type=int, default=2, help="timed random inputs per repeat")
    parser.add_argument("--plan-instances", type=int, default=2,
                        help="other random inputs the deployed form is planned and warmed on")
    parser.add_argument("--slice-cache-mb", type=float, default=DEFAULT_SLICE_CACHE_MB,
                        help="memory cap of the deployed form's slice cache")
    parser.add_argument("--round-to", type=int, default=1,
                        help="static kept counts rounded to this multiple (8/16: oneDNN's SIMD block; default 1)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the calling thread's CPU time (1 thread only; robust when others share the cores)")
    parser.add_argument("--no-inductor", dest="inductor", action="store_false",
                        help="leave torch.compile (Inductor) out of the dense reference's candidates")
    parser.add_argument("--ablations", action="store_true",
                        help="also time the deployed form with one optimization removed at a time, side by side")
    parser.add_argument("--profile", action="store_true",
                        help="also print a torch.profiler table of the deployed model (stderr)")
    parser.add_argument("--processes", type=int, default=1,
                        help="run the whole measurement in N fresh processes, one after the other, and add a "
                             "summary line per keep pattern and thread count: how far the ratio moves between "
                             "processes, which one process's interval does not show (default 1)")
    args = parser.parse_args(argv)
    if args.round_to < 1:
        parser.error("--round-to must be >= 1")
    if args.processes < 1:
        parser.error("--processes must be >= 1")
    if args.processes > 1:
        return across_processes(args.processes, _without_processes(sys.argv[1:] if argv is None else list(argv)))

    generator = torch.Generator().manual_seed(1)
    inputs, plan_inputs, calibration = ([torch.randn(1, 3, args.size, args.size, generator=generator) for _ in range(n)]
                                        for n in (args.instances, args.plan_instances, CALIBRATION))
    models = {pattern: gated_resnet34(args.reduction, multiple=args.round_to, pattern=pattern,
                                      calibration=torch.cat(calibration), size=args.size) for pattern in args.patterns}
    dense = next(iter(models.values()))[0]
    for threads in args.threads:
        torch.set_num_threads(threads)
        # packed at the thread count it runs at, as the reference is: oneDNN's AVX2 convolutions lay a packed
        # weight out for the packing thread count and reorder it on every call at another
        independent = IndependentOneDNNResNet34(dense, (1, 3, args.size, args.size))
        dense_reference = optimized_dense(dense, inputs, inductor=args.inductor)  # chosen at this thread count
        print(json.dumps(crosscheck(dense_reference, independent, inputs, args, threads)), flush=True)
        for pattern, (_, gated, gates, rate, macs) in models.items():
            macs_ratio = measured_macs_ratio(gated, gates, macs, inputs)
            kept_sets = distinct_kept_sets(gated)
            with torch.no_grad():
                reference = torch.cat([gated(x) for x in inputs])
            deployed = deploy_model(gated, slice_cache_mb=args.slice_cache_mb)  # planned on this thread count
            fields = time_side_by_side(dense, deployed, inputs, reference, args.warmup, args.repeats, args.clock,
                                       dense_reference=dense_reference, plan_batches=plan_inputs)
            print(json.dumps({
                "benchmark": "resnet34_latency", "keep_pattern": pattern, "threads": threads, "size": args.size,
                "requested_reduction": args.reduction, "round_to": args.round_to if pattern == "static" else 1,
                "keep_rate": rate, "macs_ratio": macs_ratio, "distinct_kept_sets": kept_sets,
                "instances": len(inputs), "plan_instances": len(plan_inputs),
                "latency_over_macs": fields["latency_ratio"] / macs_ratio, **fields,
                "repeats": args.repeats, "load_average": os.getloadavg(),
                "profile": hardware_profile("cpu", threads, "fp32"),
            }), flush=True)
            if args.ablations:
                print(json.dumps(ablations(dense, gated, inputs, plan_inputs, args, threads, macs_ratio,
                                           dense_reference) | {"keep_pattern": pattern}), flush=True)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                runnable = prepare_deployed(deploy_model(gated, slice_cache_mb=args.slice_cache_mb), plan_inputs,
                                            dense_reference[1]["memory_format"], dense_reference[1]["mode"])[0]
                with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
                    for x in inputs:
                        runnable(x.clone())
                print(f"# {pattern}, {threads} thread(s)", file=sys.stderr)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
