"""Batch-1 CPU latency of the per-instance resnet34 on instances never run before (serving), kept sets padded or not.

``resnet34_latency.py`` warms up on its timed instances and repeats them, so
oneDNN's primitive cache already holds their convolution shapes when the clock
runs (only the slice cache is restored between passes). A served stream meets
new kept counts, hence new shapes, hence a new oneDNN primitive each. Here the
per-instance gated resnet34 of ``resnet34_latency.py`` is deployed twice, kept
sets padded to oneDNN's 16-channel block (the default on AVX-512) and not
padded, both planned and warmed on other instances; every timed instance then
runs exactly once through each model and through the prepacked dense model
(order alternating), on the calling thread's CPU clock (1 thread). Prints one
JSON line: medians over the instances and the ratios against dense.

    python benchmarks/unseen_instances.py                # 10 unseen instances
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

from manidp.gating import deploy_model, deployed_blocks, fold_batchnorm, fuse_onednn
from manidp.latency import hardware_profile, prepare_deployed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduction", type=float, default=0.55)
    parser.add_argument("--instances", type=int, default=10, help="unseen instances, each timed once per model")
    parser.add_argument("--plan-instances", type=int, default=2)
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import resnet34_latency as bench  # the sibling script (python puts benchmarks/ on sys.path)

    generator = torch.Generator().manual_seed(1)

    def draw(n):
        return [torch.randn(1, 3, args.size, args.size, generator=generator) for _ in range(n)]

    plan, calibration = draw(args.plan_instances), torch.cat(draw(bench.CALIBRATION))
    dense, gated, _, _, _ = bench.gated_resnet34(args.reduction, pattern="per_instance", calibration=calibration,
                                                  size=args.size)
    last = torch.channels_last
    reference = fuse_onednn(fold_batchnorm(copy.deepcopy(dense).eval()).to(memory_format=last),
                            plan[0].contiguous(memory_format=last))
    models, plans = {"dense": lambda x: reference(x.contiguous(memory_format=last))}, {}
    for name, block in (("padded_16", 16), ("unpadded", 1)):
        deployed = deploy_model(gated)
        for b in deployed_blocks(deployed).values():
            b.kept_block = block
        models[name], info = prepare_deployed(deployed, plan, "channels_last", "onednn")
        plans[name] = sum(entry["path"] == "gathered" for entry in info["plan"].values())
    times = {name: [] for name in models}
    with torch.inference_mode():
        models["dense"](plan[0])
        for i, x in enumerate(draw(args.instances)):
            for name in (list(models) if i % 2 == 0 else list(models)[::-1]):
                start = time.thread_time()
                models[name](x.clone())
                times[name].append((time.thread_time() - start) * 1000)
    ms = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({"benchmark": "resnet34_unseen_instances", "keep_pattern": "per_instance", "threads": 1,
                      "size": args.size,
                      "clock": "cpu", "instances": args.instances, "ms": ms,
                      "latency_ratio": {name: ms[name] / ms["dense"] for name in ("padded_16", "unpadded")},
                      "gathered_blocks": plans, "ms_each": times, "load_average": os.getloadavg(),
                      "profile": hardware_profile("cpu", 1, "fp32")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
