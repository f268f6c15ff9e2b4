"""What a slice-cache miss costs per resnet34 3x3 convolution, one way of paying it per row (batch 1, CPU).

For each of resnet34's four stage widths (64 @ 56x56 ... 512 @ 7x7) a conv2 of a
gated BasicBlock keeps a random ``--keep`` of its input and output channels, and
each way to run it is timed on the calling thread's CPU clock (best of
``--repeats``, load average printed beside it):

* ``dense``: the full-width convolution, weight prepacked once (the dense reference's);
* ``hit``: the kept slice, prepacked once (a slice-cache hit);
* ``miss_oihw``: gather the kept rows and columns, reorder into oneDNN's layout from OIHW, run;
* ``miss_channels_last``: the same, reordered from an input-channels-last copy (what the deployed form does);
* ``miss_unpacked``: gather, and let oneDNN reorder inside the call (``mkldnn_convolution``);
* ``gemm_im2col``: gather the kept weight as a ``[k_out, k_in * 9]`` matrix and multiply it with
  ``F.unfold`` of the input (no weight reorder at all);
* ``miss_gather_op``: ``manidp::gather_slice`` gathers straight into channels-last in one pass, then
  the reorder (what the deployed form does when the compiled ops are built; absent otherwise);
* ``hit_padded``: the hit with both kept sets padded to a 16-channel block (what a miss runs, so that
  convolution shapes recur), the padding channels of the input zero;
* ``hit_exact_inputs``: the output channels padded, the input channels the kept ones alone (what a
  recurring slice runs: input channels are oneDNN's reduction dimension, which it does not pad).

    python benchmarks/miss_path.py              # keep 0.67 of each side (about 0.45 of the MACs)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from manidp import kernels
from manidp.gating.deployed import padded_kept

STAGES = ((64, 56), (128, 28), (256, 14), (512, 7))


def _best(func, repeats: int) -> float:
    func()  # oneDNN creates and caches its primitive for this shape first
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        func()
        best = min(best, time.thread_time() - start)
    return best * 1000


def stage(channels: int, size: int, keep: float, repeats: int, generator: torch.Generator) -> dict:
    pointwise, reorder = torch.ops.mkldnn._convolution_pointwise, torch.ops.mkldnn._reorder_convolution_weight
    kept = round(keep * channels)
    weight = torch.randn(channels, channels, 3, 3, generator=generator)
    bias = torch.randn(channels, generator=generator)
    rows = torch.randperm(channels, generator=generator)[:kept].sort().values
    cols = torch.randperm(channels, generator=generator)[:kept].sort().values
    full = torch.randn(1, channels, size, size, generator=generator).contiguous(memory_format=torch.channels_last)
    x = full[:, cols].contiguous(memory_format=torch.channels_last)
    geometry = ([1, 1], [1, 1], [1, 1])

    def conv(inputs, packed, b):
        return pointwise(inputs, packed, b, *geometry, 1, "none", [], "")

    def gathered():
        return weight.index_select(0, rows).index_select(1, cols), bias.index_select(0, rows)

    dense_packed = reorder(weight, *geometry, 1, list(full.shape))
    hit_packed = reorder(gathered()[0], *geometry, 1, list(x.shape))

    def miss(channels_last: bool):
        w, b = gathered()
        if channels_last:
            w = w.contiguous(memory_format=torch.channels_last)
        return conv(x, reorder(w, *geometry, 1, list(x.shape)), b)

    def unpacked():
        w, b = gathered()
        return torch.ops.aten.mkldnn_convolution(x, w, b, *geometry, 1)

    def gemm():
        w, b = gathered()
        columns = F.unfold(x, 3, padding=1)[0]  # [k_in * 9, H * W]
        return torch.addmm(b[:, None], w.reshape(kept, -1), columns).view(1, kept, size, size)

    def miss_op():
        w = torch.ops.manidp.gather_slice(weight, rows, cols)
        return conv(x, reorder(w, *geometry, 1, list(x.shape)), bias.index_select(0, rows))

    def padded(kept_index):  # as the deployed form pads a kept set: kept first, then skipped ones up to 16
        alive = torch.zeros(channels, dtype=torch.bool)
        alive[kept_index] = True
        return padded_kept(alive, 16)[0]

    rows_p, cols_p = padded(rows), padded(cols)
    x_p = full[:, cols_p].contiguous(memory_format=torch.channels_last)
    x_p[:, kept:] = 0  # padding channels carry zeros (their mask is 0)
    bias_p = bias.index_select(0, rows_p)
    padded_packed = reorder(weight.index_select(0, rows_p).index_select(1, cols_p), *geometry, 1, list(x_p.shape))
    exact_packed = reorder(weight.index_select(0, rows_p).index_select(1, cols), *geometry, 1, list(x.shape))
    expected = conv(x, hit_packed, bias.index_select(0, rows))
    for out in (conv(x_p, padded_packed, bias_p), conv(x, exact_packed, bias_p)):
        torch.testing.assert_close(out[:, :kept], expected, rtol=1e-3, atol=1e-3)
    for way in (lambda: miss(True), lambda: miss(False), unpacked, gemm):  # every row computes the same output
        torch.testing.assert_close(way(), expected, rtol=1e-3, atol=1e-3)
    ms = {"dense": _best(lambda: conv(full, dense_packed, bias), repeats),
          "hit": _best(lambda: conv(x, hit_packed, bias.index_select(0, rows)), repeats),
          "miss_oihw": _best(lambda: miss(False), repeats),
          "miss_channels_last": _best(lambda: miss(True), repeats),
          "miss_unpacked": _best(unpacked, repeats), "gemm_im2col": _best(gemm, repeats),
          "gather": _best(gathered, repeats),
          "hit_padded": _best(lambda: conv(x_p, padded_packed, bias_p), repeats),
          "hit_exact_inputs": _best(lambda: conv(x, exact_packed, bias_p), repeats),
          "reorder_oihw": _best(lambda: reorder(gathered()[0], *geometry, 1, list(x.shape)), repeats),
          "reorder_channels_last": _best(lambda: reorder(
              gathered()[0].contiguous(memory_format=torch.channels_last), *geometry, 1, list(x.shape)), repeats)}
    ms["reorder_oihw"] -= ms["gather"]
    ms["reorder_channels_last"] -= ms["gather"]
    if kernels.load():
        torch.testing.assert_close(miss_op(), expected, rtol=1e-3, atol=1e-3)
        ms["miss_gather_op"] = _best(miss_op, repeats)
        ms["gather_op"] = _best(lambda: torch.ops.manidp.gather_slice(weight, rows, cols), repeats)
    return {"benchmark": "miss_path", "channels": channels, "size": size, "kept": kept,
            "kept_padded": int(rows_p.numel()), "threads":
            torch.get_num_threads(), "ms": ms, "over_dense": {k: v / ms["dense"] for k, v in ms.items()},
            "load_average": os.getloadavg()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.67, help="kept fraction of input and output channels")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    for channels, size in STAGES:
        print(json.dumps(stage(channels, size, args.keep, args.repeats, generator)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
