"""Batch-1 CPU latency of a deployed resnet34 after ``torch.set_num_threads``: repacked, stale, or deployed fresh.

oneDNN's AVX2 convolutions lay some prepacked weights out for the thread
count they are packed at and reorder them on every call at another count. A
deployed form therefore drops what it packed when the thread count changes
and packs again (``SliceCache.at_threads``). This times three copies of the
static gated resnet34 of ``resnet34_latency.py`` (every block on one path,
unplanned: the gathered slices, then the dense path's full-width
convolutions), each warmed before the switch: **fresh** (deployed and warmed
at the new count only), **switched** (warmed at the old count, then run at
the new one: what a user gets), and **stale** (the same, with the repack
suppressed: what the deployed form did before). Interleaved repeats in one
process, median per-instance ms; one JSON line per path and switch.

    python benchmarks/thread_switch.py                 # 1 -> 2 and 2 -> 1 threads
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # as resnet34_latency.py: idle threads spin (set before torch)

import torch  # noqa: E402

from manidp.gating import deploy_model, deployed_blocks  # noqa: E402
from manidp.latency import hardware_profile, measure_latency  # noqa: E402


def _warm(model, inputs, threads: int) -> None:
    torch.set_num_threads(threads)
    with torch.no_grad():
        for _ in range(2):  # a miss, then the hit that packs
            for x in inputs:
                model(x.clone())


def _keep_stale_packs(model, threads: int) -> None:
    """Tell every block its packs belong to ``threads``: they are kept and run at that count, as before."""
    for block in deployed_blocks(model).values():
        block.cache.threads = block.full.threads = threads


def _packed(model) -> list:
    """What a deployed model has packed: its cached slices and its blocks' full-width convolutions."""
    blocks = deployed_blocks(model).values()
    cached = next(iter(blocks)).cache.snapshot()[0].values()
    return [v for v, _ in cached if hasattr(v, "packed")] + [c for block in blocks for c in block.full.values()]


def switch(gated, inputs, before: int, after: int, warmup: int, repeats: int, path: str = "gathered") -> dict:
    models = {name: deploy_model(gated) for name in ("fresh", "switched", "stale")}
    for model in models.values():
        for block in deployed_blocks(model).values():
            block.path = path
    _warm(models["switched"], inputs, before)
    _warm(models["stale"], inputs, before)
    packed_before = {name: _packed(models[name]) for name in ("switched", "stale")}  # held: no id is reused
    _keep_stale_packs(models["stale"], after)
    _warm(models["fresh"], inputs, after)
    _warm(models["switched"], inputs, after)
    _warm(models["stale"], inputs, after)
    # each copy is what its name says: the stale one runs the packs of the old count, the switched one new ones
    if [id(c) for c in _packed(models["stale"])] != [id(c) for c in packed_before["stale"]]:
        raise SystemExit("the stale copy repacked: it would not time the packs of the old thread count")
    if {id(c) for c in _packed(models["switched"])} & {id(c) for c in packed_before["switched"]}:
        raise SystemExit("the switched copy kept a pack of the old thread count")
    with torch.no_grad():
        reference = torch.cat([gated(x) for x in inputs])
        for name, model in models.items():
            out = torch.cat([model(x.clone()) for x in inputs])
            error = float((out - reference).abs().max() / reference.abs().max())
            if error > 1e-4:
                raise SystemExit(f"the {name} deployed form differs from the masked model (relative error {error})")
    times = measure_latency({name: lambda x, m=model: m(x.clone()) for name, model in models.items()}, inputs,
                            warmup, repeats)
    ms = {name: statistics.median(values) for name, values in times.items()}
    return {"benchmark": "thread_switch", "path": path, "threads_before": before, "threads_after": after, "ms": ms,
            "over_fresh": {name: value / ms["fresh"] for name, value in ms.items()}, "repeats": repeats,
            "load_average": os.getloadavg(), "profile": hardware_profile("cpu", after, "fp32")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduction", type=float, default=0.55)
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--paths", nargs="+", choices=("gathered", "dense"), default=["gathered", "dense"],
                        help="the path every block runs: gathered slices, or the dense path's full-width "
                             "convolutions (default both)")
    parser.add_argument("--switches", nargs="+", default=["1:2", "2:1"],
                        help="thread-count switches BEFORE:AFTER (default 1:2 2:1)")
    args = parser.parse_args(argv)
    try:
        switches = [tuple(int(n) for n in s.split(":")) for s in args.switches]
    except ValueError:
        parser.error("--switches takes BEFORE:AFTER thread counts, e.g. 1:2")
    if any(len(s) != 2 or min(s) < 1 for s in switches):
        parser.error("--switches takes BEFORE:AFTER thread counts >= 1, e.g. 1:2")
    import resnet34_latency as bench  # the sibling script (python puts benchmarks/ on sys.path)

    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1, 3, args.size, args.size, generator=generator) for _ in range(args.instances)]
    _, gated, _, _, _ = bench.gated_resnet34(args.reduction, size=args.size)
    for path in args.paths:
        for before, after in switches:
            print(json.dumps(switch(gated, inputs, before, after, args.warmup, args.repeats, path)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
