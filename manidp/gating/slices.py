"""Sliced convolutions and the slice cache: how a deployed block runs a convolution on some channels.

A gathered convolution is the BN-folded weight restricted to the kept
channels (:class:`_SlicedConv`), reordered once into oneDNN's blocked layout
with bias and ReLU fused (the ops Inductor's CPU freezing emits). Slices are
kept in a bounded LRU :class:`SliceCache` keyed by kept set, so a repeated
kept set pays neither the gather nor oneDNN's per-call weight reorder.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from manidp._defaults import DEFAULT_SLICE_CACHE_MB
from manidp.errors import UserError

__all__ = ["SliceCache", "DEFAULT_SLICE_CACHE_MB", "onednn_bf16"]


_ONEDNN = torch.backends.mkldnn.is_available()
# oneDNN convolution with a weight reordered once into its blocked layout, bias and ReLU fused (the ops
# Inductor's CPU freezing emits). A gathered slice is packed when it enters the cache, so a repeated
# kept set pays neither the gather nor oneDNN's per-call weight reorder (on small maps that reorder
# can cost as much as the convolution).
_PACKED = _ONEDNN and hasattr(torch.ops.mkldnn, "_convolution_pointwise") \
    and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
# oneDNN runs a bf16 convolution only where the CPU has bf16 conversions (AVX-512 BW/VL/DQ or
# AVX-NE-CONVERT); elsewhere (an AVX2 laptop) torch refuses the call, and ATen's own convolution runs it.
_BF16 = _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions on this CPU (what the deployed form and the reference use)."""
    return _BF16


def _onednn_takes(x: torch.Tensor) -> bool:
    """Whether oneDNN's CPU convolution runs on ``x`` here: a CPU tensor of fp32, or of bf16 on a CPU with bf16."""
    return _ONEDNN and x.is_cpu and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _BF16))


def packs(x: torch.Tensor) -> bool:
    """Whether a convolution on (or of) ``x`` can be prepacked and fused through oneDNN on this machine."""
    return _PACKED and _onednn_takes(x)


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
          groups: int = 1) -> torch.Tensor:
    """``F.conv2d``, but straight to oneDNN on CPU.

    At batch 1, PyTorch sends a 3x3 convolution whose input has at most 20480
    elements to its slow im2col path; a gathered 7x7 conv (e.g. 285 of 512
    channels) lands there and runs much slower than through oneDNN, which
    the dense model (512 x 7 x 7 = 25088 elements) gets.
    """
    if _onednn_takes(x):
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _simd_block() -> int:
    """Channels per SIMD block of oneDNN's fp32 CPU kernels on this CPU: 16 with AVX-512, else 8."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


@dataclass(frozen=True)
class _ConvGeometry:
    stride: tuple
    padding: tuple
    dilation: tuple

    @classmethod
    def of(cls, conv: nn.Conv2d) -> "_ConvGeometry":
        return cls(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))


class _SlicedConv:
    """A BN-folded convolution restricted to some channels, ready to run (prepacked when oneDNN allows)."""

    __slots__ = ("weight", "bias", "geometry", "groups", "packed", "packable", "nbytes", "input_shape")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, geometry: _ConvGeometry, groups: int,
                 input_shape: Sequence[int], pack: bool = True):
        self.geometry, self.groups, self.input_shape = geometry, groups, tuple(input_shape)
        self.nbytes = weight.numel() * weight.element_size() + bias.numel() * bias.element_size()
        self.packable = packs(weight)
        self.packed = pack and self.packable
        if self.packed:
            g = geometry
            # A channels-last slice (manidp::gather_slice writes one) is reordered as it is: oneDNN's
            # blocked layouts keep input channels innermost, so that reorder is the fast one; copying an
            # OIHW slice to channels-last first would cost what it saves (benchmarks/miss_path.py).
            source = weight if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) \
                else weight.contiguous()
            weight = torch.ops.mkldnn._reorder_convolution_weight(
                source, list(g.padding), list(g.stride), list(g.dilation), groups, list(input_shape))
        self.weight, self.bias = weight, bias

    def packed_copy(self) -> "_SlicedConv":
        """This slice packed (a plain slice's weight is still the gathered one)."""
        return _SlicedConv(self.weight, self.bias, self.geometry, self.groups, self.input_shape, pack=True)

    def __call__(self, x: torch.Tensor, relu: bool) -> torch.Tensor:
        g = self.geometry
        if self.packed:
            return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, list(g.padding),
                                                           list(g.stride), list(g.dilation), self.groups,
                                                           "relu" if relu else "none", [], "")
        y = _conv(x, self.weight, self.bias, g.stride, g.padding, g.dilation, self.groups)
        return y.relu_() if relu else y

    def add(self, x: torch.Tensor, other: torch.Tensor, relu: bool) -> torch.Tensor:
        """``conv(x) + other`` (then ReLU), the sum fused into the convolution where oneDNN runs it: the
        residual add of a block costs no extra pass over memory."""
        g = self.geometry
        if self.packed:
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, other, self.weight, self.bias, list(g.padding), list(g.stride), list(g.dilation), self.groups,
                "add", 1.0, "relu" if relu else None, [], "")
        y = _conv(x, self.weight, self.bias, g.stride, g.padding, g.dilation, self.groups).add_(other)
        return y.relu_() if relu else y


class SliceCache:
    """Bounded LRU cache of sliced (and prepacked) BN-folded weights, keyed by kept-channel set.

    Trained gates are nearly static (few distinct kept sets), so most calls
    find their slices here and pay no gather. ``max_bytes`` caps the memory the
    cached slices hold (their dense size; oneDNN's blocked layout pads channels
    up to its SIMD block); the least recently used entries go first.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise UserError(f"the slice cache's memory cap must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        #: The torch thread count the cached slices were packed at (:meth:`at_threads`); None: not yet used.
        self.threads: Optional[int] = None

    def at_threads(self, threads: int) -> None:
        """Empty the cache when the thread count is not the one its slices were packed at.

        oneDNN's AVX2 convolutions lay some prepacked weights out for the
        thread count they are packed at and reorder them on every call at
        another (benchmarks/README, "A second CPU: AVX2 only"; the full-width
        convolutions ran much slower on the old count's packs,
        ``benchmarks/thread_switch.py``). The slices showed no such cost at
        resnet34's shapes; they are dropped too, since a repack costs one miss
        per slice, once. The hit and miss counts go on.
        """
        if threads != self.threads:
            if self.threads is not None:
                self.clear()
            self.threads = threads

    def get(self, key, build: Callable[[], tuple[object, int]]):
        """The entry for ``key``; on a miss ``build() -> (value, nbytes)`` makes it (and it is kept if it fits)."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]
        self.misses += 1
        value, nbytes = build()
        if nbytes <= self.max_bytes:
            self._entries[key] = (value, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                _, (_, freed) = self._entries.popitem(last=False)
                self.bytes -= freed
                self.evictions += 1
        return value

    def replace(self, key, value) -> None:
        """Put ``value`` in place of the entry for ``key`` (same size accounted), if the entry is cached."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (value, entry[1])

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def snapshot(self) -> tuple:
        """The entries as they are now (references to the slices, no copies) and the thread count they were
        packed at, for :meth:`restore`."""
        return OrderedDict(self._entries), self.bytes, self.threads

    def restore(self, state: tuple) -> None:
        """Back to a :meth:`snapshot`: what was cached since is dropped. A timer restores the cache before
        every pass over the same instances, so no pass finds slices that an earlier pass of those
        instances left: each sees the cache its first pass saw."""
        entries, self.bytes, self.threads = state
        self._entries = OrderedDict(entries)

    def reset_counts(self) -> None:
        self.hits = self.misses = self.evictions = 0

    def stats(self) -> dict:
        calls = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / calls if calls else None,
                "evictions": self.evictions, "entries": len(self._entries), "bytes": self.bytes,
                "max_bytes": self.max_bytes}

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo) -> "SliceCache":
        return SliceCache(self.max_bytes)  # packed oneDNN weights cannot be copied; a copy refills itself


class _PackedConvs(dict):
    """A block's full-width prepacked convolutions, by (name, input shape, dtype), packed at one thread
    count (:meth:`at_threads`, as :meth:`SliceCache.at_threads`); oneDNN's blocked weights cannot be
    copied, so a copy starts empty and refills on use."""

    threads: Optional[int] = None

    def at_threads(self, threads: int) -> None:
        """Empty, if packed at another thread count than ``threads``."""
        if threads != self.threads:
            self.clear()
            self.threads = threads

    def __deepcopy__(self, memo) -> "_PackedConvs":
        return _PackedConvs()


