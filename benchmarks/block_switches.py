"""Per-block paired timing of one switch of the deployed form: what a change worth tens of microseconds buys.

A whole-model ratio (``resnet34_latency.py``) moves by 0.01-0.04 between
processes and between models of one process on this kind of machine, more
than a change of a few tens of microseconds per block can show. Here the
static resnet34 of ``resnet34_latency.py`` is deployed once, planned and
warmed on other instances, and every gated block is timed on the input it
receives in use, its gathered path run with the switch on and off in
alternating order, repeat after repeat, on the same warm slice cache: the
paired per-repeat ratio (on / off) cancels the machine's drift, and the
block-by-block difference adds up to what the switch saves per image.

Switches (both sides run the same cached slices, so only the switch differs):

* ``fused_glue``: conv1's outputs scaled, pooled, gate 2 and the padding
  dropped in one compiled call (``manidp::scale_pool_gate``), against three
  (``scale_pool_``, the gate op, a channel copy);
* ``use_kernels``: the compiled glue and gate ops against ATen ops.

    python benchmarks/block_switches.py                              # fused_glue, 1 thread, CPU clock
    python benchmarks/block_switches.py --switch use_kernels --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # as resnet34_latency.py: before torch loads

import torch  # noqa: E402

from manidp.gating import block_inputs, deploy_model, deployed_blocks  # noqa: E402
from manidp.latency import hardware_profile, paired_ratio, prepare_deployed  # noqa: E402

SWITCHES = ("fused_glue", "use_kernels")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switch", choices=SWITCHES, default="fused_glue")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=301, help="paired repeats per block (default 301)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--reduction", type=float, default=0.55)
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--threads and --repeats must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    # one thread: the thread's CPU time (immune to other jobs); more: wall time (the other threads' work counts)
    clock, clock_name = (time.thread_time, "cpu") if args.threads == 1 else (time.perf_counter, "wall")
    import resnet34_latency as bench  # the sibling script (python puts benchmarks/ on sys.path)

    generator = torch.Generator().manual_seed(1)
    x, *plan = (torch.randn(1, 3, args.size, args.size, generator=generator) for _ in range(3))
    _, gated, _, _, _ = bench.gated_resnet34(args.reduction, size=args.size)
    runnable, prepared = prepare_deployed(deploy_model(gated), plan, "channels_last", "onednn", choose_format=False)
    blocks = deployed_blocks(runnable)
    with torch.inference_mode():
        inputs = {name: seen[0] for name, seen in block_inputs(runnable, [x]).items()}
    totals = {True: 0.0, False: 0.0}
    for name, block in blocks.items():
        if block.path != "gathered":
            continue
        times = {True: [], False: []}
        with torch.inference_mode():
            for r in range(args.warmup + args.repeats):
                for on in ((True, False) if r % 2 else (False, True)):
                    setattr(block, args.switch, on)
                    source = inputs[name].clone()
                    start = clock()
                    block(source)
                    if r >= args.warmup:
                        times[on].append(clock() - start)
        setattr(block, args.switch, True)
        medians = {on: statistics.median(t) * 1e6 for on, t in times.items()}
        totals[True] += medians[True]
        totals[False] += medians[False]
        print(json.dumps({"benchmark": "block_switch", "switch": args.switch, "block": name,
                          "input_shape": list(inputs[name].shape), "on_us": medians[True], "off_us": medians[False],
                          "saved_us": medians[False] - medians[True],
                          "on_over_off_paired": paired_ratio(times[True], times[False])}), flush=True)
    print(json.dumps({"benchmark": "block_switch_total", "switch": args.switch, "threads": args.threads,
                      "clock": clock_name, "repeats": args.repeats, "gathered_blocks": sum(
                          b.path == "gathered" for b in blocks.values()),
                      "on_us": totals[True], "off_us": totals[False], "saved_us": totals[False] - totals[True],
                      "load_average": os.getloadavg(), "profile": hardware_profile("cpu", args.threads, "fp32")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
