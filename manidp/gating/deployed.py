"""The deployed form of a gated model: what deployment and latency measurement run.

:func:`deploy_model` copies a gated model and replaces every gated block by
its deployed form (a :class:`_Deployed` subclass registered beside its block
family under ``manidp/gating/blocks/``): BN folded, outputs equal to the
masked model's, and two ways to run:

* *gathered* (CPU, batch 1): the convolutions run on the kept channels only,
  their BN-folded weight slices taken from the model's shared
  :class:`~manidp.gating.slices.SliceCache`; kept sets are padded with
  zero-mask channels to oneDNN's SIMD block, so convolution shapes recur.
* *dense-then-mask*: full-width folded convolutions times the masks (static
  shapes, no host synchronisation, so CUDA and batches > 1 run it).

On the CPU a gate that offers ``kernel_spec()`` (a
:class:`~manidp.gating.gates.GateKernel`) runs as one compiled op
(:mod:`manidp.kernels`): pool included on the gathered path, with its mask
multiply on the dense path; the gathered path's scale-and-pool and
residual-sum-and-ReLU are compiled ops too. Otherwise (no compiler, other
devices) gates run as one frozen TorchScript call on their fp32 pooled input.
Gate 2 of a gathered block reads the pool of conv1's kept outputs, scattered
into a C-long vector only. :mod:`manidp.gating.plan` picks each block's path
and freezes what is static.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from manidp import kernels
from manidp.errors import UserError
from manidp.gating.fusion import DataDependent, fold_batchnorm, fuse_onednn
from manidp.gating.gates import ChannelGate, GateKernel, _entry, copy_model, round_kept
from manidp.gating.slices import (DEFAULT_SLICE_CACHE_MB, SliceCache, _ConvGeometry, _PackedConvs,
                                  _SlicedConv, _simd_block, packs)

__all__ = ["deploy_model", "deployed_blocks", "slice_cache", "set_slice_cache_limit", "cast_deployed", "padded_kept"]


class _RoundedGate(nn.Module):
    """A method's gate followed by :func:`round_kept` (the deployed form's copy of a rounding gate)."""

    def __init__(self, gate: nn.Module, multiple: int):
        super().__init__()
        self.gate = gate
        self.multiple = multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.gate(x)
        return round_kept(mask, self.gate.saliency, self.multiple)

    def kernel_spec(self) -> Optional["GateKernel"]:
        """The wrapped gate's compiled form with the rounding added (None when it has none)."""
        spec = getattr(self.gate, "kernel_spec", None)
        if not callable(spec):
            return None
        kernel = spec()
        kernel.round_to = self.multiple
        return kernel


def _bn_act(bn: nn.Module) -> nn.Module:
    """The activation a timm ``BatchNormAct2d`` applies after normalizing (identity for a plain BN)."""
    return getattr(bn, "act", nn.Identity())


def _plain_conv(conv: nn.Module, where: str) -> nn.Conv2d:
    if type(conv) is not nn.Conv2d or isinstance(conv.padding, str):
        raise UserError(f"{where}: the deployed form supports plain nn.Conv2d with numeric padding, "
                        f"got {type(conv).__name__}")
    return conv


def _require_identity(block: nn.Module, names: Sequence[str]) -> None:
    """Optional timm sub-blocks the deployed forms do not implement must be absent (or identity in eval)."""
    for name in names:
        module = getattr(block, name, None)
        if module is not None and not isinstance(module, nn.Identity):
            raise UserError(f"{type(block).__name__}.{name} ({type(module).__name__}) is not supported by the "
                            "deployed form")


def _pooled(x: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """The gate input: the fp32 global average pool as a ``[B, C, 1, 1]`` map (contract item 2), of
    ``|x|`` for a gate that pools magnitudes (``pools_abs``).

    fp32 whatever the activations' dtype: under bf16, whose spacing near 1 is
    2**-7, a saliency compared with its threshold would flip masks.
    """
    if absolute:
        x = x.abs()
    if x.dtype == torch.float32:
        return x.mean((2, 3), keepdim=True)  # one op; the dtype argument adds two (sum, divide)
    return x.mean((2, 3), keepdim=True, dtype=torch.float32)


def _fuse_gate(gate: nn.Module, channels: int, device) -> nn.Module:
    """The gate as one frozen TorchScript call on its pooled input, else the gate itself.

    Each gate is about ten tiny ops (Linear, ReLU, clamp, threshold, ...): in
    eager mode their Python dispatch costs more than their arithmetic. Tracing
    on a pooled ``[1, C, 1, 1]`` map is exact by the gate contract; the trace
    is checked at another batch size, and freezing turns the weights and
    thresholds into fp32 constants (a later bf16 cast of the model leaves them
    alone). A gate that does not trace (data-dependent Python) stays eager.
    """
    example = torch.rand(1, channels, 1, 1, device=device)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(copy_model(gate), example,
                                     check_inputs=[(torch.rand(3, channels, 1, 1, device=device),)])
            return torch.jit.freeze(traced)
    except (RuntimeError, torch.jit.TracingCheckError):
        return gate


class _Deployed(DataDependent):
    """A gated block in deployed form: BN folded, two ways to run.

    * ``"gathered"`` (CPU, batch 1): the gate decides, then the convolutions
      run on cached slices of the kept channels only. A deployed block may
      overwrite its input (the residual is accumulated into it).
    * ``"dense"`` (any device, any batch): the folded convolutions run at full
      width and the masks multiply their outputs: static shapes, no host
      synchronisation, so it also serves CUDA and batches > 1.

    ``path`` picks the way for batch-1 CPU calls (:func:`plan_deployment`
    measures which is faster); every other call runs dense.
    """

    def __init__(self):
        super().__init__()
        self.path = "gathered"
        self.cache = SliceCache(int(DEFAULT_SLICE_CACHE_MB * 2 ** 20))
        self.recorded: Optional[list] = None  # masks of dense calls, while a plan counts kept channels
        self.use_kernels = True  # the compiled ops where they run (False: ATen only, to compare)
        self.gather_kernel = True  # kept weights through manidp::gather_slice (False: ATen's, to compare)
        self.pack_on_reuse = True  # slices packed on their first hit (False: on the miss, to compare)
        self.exact_inputs = True  # recurring slices read the kept input channels only (False: padded, to compare)
        self.fused_glue = True  # scale, pool, gate 2 and compaction in one compiled call (False: three, to compare)
        self.kept_block = _simd_block()  # kept sets padded to a multiple of this (:meth:`_kept`; 1: not padded)
        self.full = _PackedConvs()  # the dense path's convolutions and the shortcut, prepacked per input shape

    def _set_gates(self, *gates: ChannelGate) -> None:
        """Keep the method's gates (fp32, eager: what a trace of the dense path inlines) and their fused
        forms (:func:`_fuse_gate`, for eager calls). The fused ones are plain attributes, not
        submodules: TorchScript cannot trace a module that holds frozen modules."""
        for i, site in enumerate(gates, 1):
            gate = copy_model(site.gate).eval().float()
            if site.round_to:
                gate = _RoundedGate(gate, site.round_to)
            elif getattr(gate, "inference_form", None) is not None:
                gate = gate.inference_form().eval()  # the same mask in fewer ops (a method may offer one)
            self.add_module(f"gate{i}", gate)
        self.gate_channels = [site.in_channels for site in gates]
        # a gate reading mean |x| (FBS) gets the pool of |x|: equal to mean x only for inputs >= 0, and
        # a block input (mobilenetv2's, after a linear projection) can be negative
        self.pools_abs = [bool(getattr(site.gate, "pools_abs", False)) for site in gates]
        self._fuse_gates()

    def _fuse_gates(self) -> None:
        """The compiled forms of the gates (None for a gate without ``kernel_spec``), and a reset of the frozen
        TorchScript ones, which :attr:`fused` builds on first use: where the compiled ops run they are
        never needed."""
        self._fused = None
        self.kernels = []
        for i in range(len(self.gate_channels)):
            spec = getattr(getattr(self, f"gate{i + 1}").float(), "kernel_spec", None)
            self.kernels.append(spec() if callable(spec) else None)

    @property
    def fused(self) -> list:
        """Each gate as one frozen TorchScript call on its pooled input (:func:`_fuse_gate`), built once."""
        if self._fused is None:
            fused = []
            for i, channels in enumerate(self.gate_channels):
                gate = getattr(self, f"gate{i + 1}")
                tensors = [*gate.parameters(), *gate.buffers()]
                fused.append(_fuse_gate(gate, channels, tensors[0].device if tensors else None))
            self._fused = fused
        return self._fused

    @fused.setter
    def fused(self, gates: list) -> None:
        self._fused = gates

    def _gate(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Gate ``i``'s mask ``[B, C]`` for the (full-width) tensor it reads.

        Inside a trace the eager gate is inlined into the frozen graph; in fp32
        it reads ``x`` itself (it pools anyway: one op fewer than pooling first).
        Outside one, :meth:`_mask_of`.
        """
        if torch.jit.is_tracing():
            gate = getattr(self, f"gate{i + 1}")
            mask = gate(x if x.dtype == torch.float32 else _pooled(x, self.pools_abs[i]))
        else:
            mask = self._mask_of(i, x)
        if self.recorded is not None:
            self.recorded.append(mask)
        return mask

    def _masked(self, i: int, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``target`` times gate ``i``'s mask of ``source``, in place (the dense-then-mask path).

        One compiled op (:class:`GateKernel`) where the gate offers one and the
        op runs here (CPU, fp32/bf16, built); else the gate's ATen ops and a
        multiply. Masks being recorded (a plan counting kept channels) take
        the ATen way, which returns them.
        """
        kernel = self.kernels[i]
        if kernel is not None and self.use_kernels and self.recorded is None and kernel.runs_on(source, target):
            return kernel(source, target)
        return _scale(target, self._gate(i, source))

    def _mask_of(self, i: int, x: torch.Tensor, pooled: bool = False) -> torch.Tensor:
        """Gate ``i``'s mask ``[B, C]`` outside a trace, for a feature map ``x`` (or its pool, when
        ``pooled``): one compiled op (pool included) where it runs, else the frozen gate on the pool."""
        kernel = self.kernels[i]
        if kernel is not None and self.use_kernels and kernel.takes(x):
            return kernel.mask(x)
        return self.fused[i](x if pooled else _pooled(x, self.pools_abs[i]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()  # what is packed follows the thread count (SliceCache.at_threads)
        if threads != self.cache.threads or threads != self.full.threads:
            self.cache.at_threads(threads)
            self.full.at_threads(threads)
        if self.path == "gathered" and x.shape[0] == 1 and x.is_cpu:
            return self.gathered(x)
        return self.dense(x)

    def _kept(self, mask: torch.Tensor) -> tuple[torch.Tensor, bytes, int]:
        """Kept channels of a batch-1 mask: (index tensor, cache key, count), the index cached per set.

        The set is padded with the lowest-numbered skipped channels up to a
        multiple of :attr:`kept_block` (oneDNN's SIMD channel block; their mask
        entries are 0: computed and multiplied by zero, the output is
        unchanged). oneDNN pads output channels to that block anyway, so the
        padding costs next to nothing there, and a conv then has at most
        (C / block)^2 shapes: instances never seen before reuse oneDNN's
        compiled primitives instead of creating one per new kept count
        (benchmarks/README, ``unseen_instances.py``). The index lists the kept
        channels first (ascending), then the padding: ``index[:count]`` are the
        kept ones, which a recurring slice reads as its input channels
        (:meth:`_slice`'s ``exact``). An empty set keeps channel 0 (PyTorch
        refuses zero-size convolutions).
        """
        # numpy, not ATen: a select, a comparison and a conversion would be a dispatch each, and two gates a
        # block run this on every call, hit or miss
        if mask.dtype != torch.float32:
            mask = mask.float()
        alive = mask.detach().numpy()[0] != 0
        block = getattr(self, "kept_block", 1)  # deployed before padding existed: unpadded
        key = alive.tobytes() + block.to_bytes(2, "little")

        def build():
            index, count = padded_kept(torch.from_numpy(alive), block)
            return (index, count), index.numel() * index.element_size()

        index, count = self.cache.get((id(self), "kept", key), build)
        return index, key, count

    def _gather(self, weight: torch.Tensor, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """``weight[rows][:, cols]`` (None: every channel), what a slice-cache miss gathers. The compiled op
        writes it channels-last in one pass, the layout oneDNN's reorder reads fastest; ATen takes two
        index_selects and leaves it OIHW."""
        if (self.use_kernels and getattr(self, "gather_kernel", True) and weight.is_cpu and weight.dim() == 4
                and weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous()
                and kernels.available()):
            return torch.ops.manidp.gather_slice(weight, rows, cols)
        if rows is not None:
            weight = weight.index_select(0, rows)
        return weight if cols is None else weight.index_select(1, cols)

    def _slice(self, name: str, keys: tuple, build: Callable[[bool], _SlicedConv],
               exact: Optional[Callable[[], _SlicedConv]] = None) -> _SlicedConv:
        """The cached slice ``build(pack)`` makes, packed from its second use on.

        Packing (a reorder of the whole slice into oneDNN's layout) only pays when the slice is reused:
        on a miss the slice runs plain (oneDNN reorders inside that one call), and a hit on a plain slice
        packs it, once. Kept sets that vary per instance then pay no packing they never use
        (``pack_on_reuse`` False packs on the miss, to compare); recurring ones run packed from their
        second use. The packed slice replaces the plain one in the cache instead of changing it, so a
        restored snapshot holds what it held.

        ``exact`` (a slice whose input channels are a padded kept set) builds the packed slice on the
        kept input channels alone, which the caller then feeds ``input[:, :count]``: input channels are
        oneDNN's reduction dimension, which it does not pad, so the padding there is pure extra work
        (benchmarks/README, "exact input channels"). Only recurring slices take it: their shape has been
        seen, while a miss keeps the padded shape, one of few, whose oneDNN primitive exists already.
        """
        key = (id(self), name, *keys)
        eager = not getattr(self, "pack_on_reuse", True)

        def sized():
            sliced = build(eager and self.cache.max_bytes > 0)
            return sliced, sliced.nbytes

        hits = self.cache.hits
        conv = self.cache.get(key, sized)
        if self.cache.hits > hits and not conv.packed and conv.packable:
            conv = exact() if exact is not None and getattr(self, "exact_inputs", True) else conv.packed_copy()
            self.cache.replace(key, conv)
        return conv

    def _reading_slice(self, name: str, keys: tuple, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       rows: Optional[torch.Tensor], cols: torch.Tensor, count: int,
                       geometry: _ConvGeometry) -> tuple[_SlicedConv, torch.Tensor]:
        """A convolution reading ``y``, whose channels are the padded kept set ``cols`` (its first ``count``
        kept) or, compacted (:meth:`_scaled_mask`), those ``count`` alone, restricted to output channels
        ``rows`` (None: all), cached: (slice, its input). A miss reads the channels ``y`` has; once the slice
        recurs it reads the ``count`` kept channels alone (:meth:`_slice`'s ``exact``): a compacted ``y``
        whole, a padded one copied; an empty kept set (one padded channel) and an unpadded one read ``y``
        whole. A slice packed with padded input channels never meets a compacted ``y``: packing on reuse
        packs the kept channels alone, and packing on a miss compacts nothing."""
        shape = tuple(y.shape)

        def sliced(inputs: torch.Tensor, input_shape: tuple, pack: bool) -> _SlicedConv:  # on a miss or a repack
            return _SlicedConv(self._gather(weight, rows, inputs), bias if rows is None else bias.index_select(0, rows),
                               geometry, 1, input_shape, pack)

        exact = None
        if 0 < count < cols.numel():
            exact = lambda: sliced(cols[:count], (shape[0], count, *shape[2:]), True)  # noqa: E731
        conv = self._slice(name, keys, lambda pack: sliced(cols[:shape[1]], shape, pack), exact)  # y's channels
        return conv, _leading_channels(y, conv.input_shape[1])

    def _first_slice(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     geometry: _ConvGeometry) -> tuple[torch.Tensor, torch.Tensor, bytes, int, _SlicedConv, bool]:
        """Gate 1's mask of ``x``, its kept channels (index, key, count), the block's first convolution
        restricted to those output channels (cached), and whether that slice recurred (a cache hit)."""
        mask = self._mask_of(0, x)
        index, key, count = self._kept(mask)
        hits = self.cache.hits
        conv = self._slice(name, (key, x.shape), lambda pack: _SlicedConv(
            self._gather(weight, index), bias.index_select(0, index), geometry, 1, x.shape, pack))
        return mask, index, key, count, conv, self.cache.hits > hits

    def _scaled_mask(self, y: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, count: int, channels: int,
                     recurring: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The first convolution's outputs ``y`` (the padded kept set ``index``, ``count`` kept) times their
        mask values, and gate 2's mask of their pool: (``y``, mask).

        Once the kept set recurs (``recurring``), ``y`` comes back compacted to its ``count`` kept channels,
        which the second convolution's recurring slice reads whole (:meth:`_reading_slice`); a kept set
        seen once keeps its padding, so a miss's convolution keeps one of few padded shapes. Where the
        gate offers a compiled op, all of it is one call (``manidp::scale_pool_gate``: scale, pool, gate
        and compaction in one pass over ``y``); else ``manidp::scale_pool_`` (or ATen), the gate on the
        pool and a copy.
        """
        keep = index.numel()
        # only where conv2's recurring slice is packed on the kept channels (a packable slice, packed on reuse):
        # a slice left plain keeps its padded input channels
        if (recurring and packs(y)
                and getattr(self, "exact_inputs", True) and getattr(self, "pack_on_reuse", True) and 0 < count < keep):
            keep = count
        kernel = self.kernels[1]
        if (kernel is not None and self.use_kernels and getattr(self, "fused_glue", True)
                and mask.dtype == torch.float32 and _compiled_gathered(y) and kernel.takes(y)):
            return kernel.scale_pool_mask(y, index, mask, keep)
        y, pooled = _scale_pool(y, mask, index, channels, self.use_kernels)
        return _leading_channels(y, keep), self._mask_of(1, pooled, pooled=True)

    def _full_conv(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   geometry: "_ConvGeometry", relu: bool, groups: int = 1) -> torch.Tensor:
        """A full-width convolution of the dense path (then ReLU), prepacked and fused as the gathered slices
        are on eager CPU calls (the dense reference gets the same, :func:`fuse_onednn`), else ``F.conv2d``
        (inside a trace, on other devices)."""
        if packs(x) and not torch.jit.is_tracing():
            key = (name, tuple(x.shape), x.dtype)
            conv = self.full.get(key)
            if conv is None:
                conv = self.full[key] = _SlicedConv(weight, bias, geometry, groups, x.shape)
            return conv(x, relu)
        y = F.conv2d(x, weight, bias, geometry.stride, geometry.padding, geometry.dilation, groups)
        return y.relu_() if relu else y

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """The block's shortcut of ``x``: the downsample branch with its convolution prepacked (eager CPU calls)."""
        downsample = getattr(self, "downsample", None)
        if downsample is None:
            return x
        if packs(x) and not torch.jit.is_tracing():
            key = ("downsample", tuple(x.shape), x.dtype)
            if key not in self.full:
                try:
                    self.full[key] = fuse_onednn(downsample, x)
                except UserError:
                    self.full[key] = downsample
            return self.full[key](x)
        return downsample(x)

    def gathered(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def padded_kept(alive: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """(index, count) of a boolean keep vector: its ``count`` kept channels (ascending), then the
    lowest-numbered skipped ones up to a multiple of ``block`` (at least one channel, at most all)."""
    kept = alive.nonzero().squeeze(1)
    count = kept.numel()
    target = min(alive.numel(), max(1, -(-count // block) * block))
    if target == count:
        return kept, count
    return torch.cat([kept, (~alive).nonzero().squeeze(1)[:target - count]]), count


def _leading_channels(y: torch.Tensor, count: int) -> torch.Tensor:
    """``y[:, :count]`` in ``y``'s memory format (a view of a contiguous batch-1 map, a copy of a channels-last
    one), the input of a slice built on the kept channels only (:meth:`_Deployed._slice`'s ``exact``)."""
    if count == y.shape[1]:
        return y
    part = y[:, :count]
    last = y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    return part.contiguous(memory_format=torch.channels_last if last else torch.contiguous_format)


def _scale(y: torch.Tensor, mask: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y`` times the mask's scales (of the kept channels ``index``), broadcast over space."""
    scales = mask if index is None else mask.index_select(1, index)
    if scales.dtype != y.dtype:
        scales = scales.to(y.dtype)
    return y.mul_(scales.unsqueeze(-1).unsqueeze(-1))


def _scatter_pooled(y: torch.Tensor, index: torch.Tensor, channels: int) -> torch.Tensor:
    """Gate input from a tensor holding only the kept channels ``index``: the ``[1, C, 1, 1]`` pool.

    The skipped channels are zero, so only a C-long vector is filled, never a
    full-width feature map.
    """
    pooled = y.new_zeros(1, channels, 1, 1, dtype=torch.float32)
    return pooled.index_copy_(1, index, _pooled(y))


def _compiled_gathered(*tensors: torch.Tensor) -> bool:
    """Whether the gathered path's compiled ops (``manidp::scale_pool_`` / ``add_channels_``) take these
    tensors: batch-1 fp32 channels_last CPU maps, and the ops built (:mod:`manidp.kernels`)."""
    return all(t.is_cpu and t.dtype == torch.float32 and t.shape[0] == 1 and t.dim() == 4
               and t.is_contiguous(memory_format=torch.channels_last) for t in tensors) and kernels.available()


def _scale_pool(y: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, channels: int,
                compiled: bool = True) -> tuple:
    """``y`` (the kept channels ``index``) times their mask values, in place, and the next gate's input
    (the ``[1, C, 1, 1]`` pool, zeros at skipped channels): one compiled op where it runs, else four."""
    if compiled and mask.dtype == torch.float32 and _compiled_gathered(y):
        return y, torch.ops.manidp.scale_pool_(y, index, mask)
    y = _scale(y, mask, index)
    return y, _scatter_pooled(y, index, channels)


def _residual_relu(out: torch.Tensor, index: torch.Tensor, z: torch.Tensor, mask: torch.Tensor,
                   act: nn.Module, compiled: bool = True) -> torch.Tensor:
    """``act(out + z * mask)`` at the kept channels ``index`` of ``out`` (in place): the end of a gathered
    BasicBlock; one compiled pass when ``act`` is a ReLU and the op runs, else scale, index_add and act."""
    if compiled and type(act) is nn.ReLU and mask.dtype == torch.float32 and _compiled_gathered(out, z):
        return torch.ops.manidp.add_channels_(out, index, z, mask, True)
    return act(_add_channels(out, index, _scale(z, mask, index)))


def _add_channels(out: torch.Tensor, index: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``out.index_add_(1, index, z)``: ``z`` (the kept channels ``index``) added into ``out`` in place.

    On channels_last tensors the channels are the innermost dimension, and
    ``index_add_`` along dim 1 of the 4-D tensor takes a slow strided path;
    the same sum on the ``[N*H*W, C]`` view of both tensors is several times
    faster. Other layouts take ``index_add_``.
    """
    last = torch.channels_last
    if out.dim() == 4 and out.is_contiguous(memory_format=last) and z.is_contiguous(memory_format=last):
        try:  # view, never reshape: a copy would take the sum and drop it
            rows = out.permute(0, 2, 3, 1).view(-1, out.shape[1])
            rows.index_add_(1, index, z.permute(0, 2, 3, 1).view(-1, z.shape[1]))
            return out
        except RuntimeError:
            pass
    return out.index_add_(1, index, z)


def _strip_gate_hooks(block: nn.Module) -> None:
    """Remove the gating hooks from a block's modules: the deployed form applies its gates itself."""
    for module in block.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), ChannelGate)]:
                del hooks[key]


def deploy_model(model: nn.Module, slice_cache_mb: float = DEFAULT_SLICE_CACHE_MB) -> nn.Module:
    """The deployed form of a gated model (a copy; ``model`` is untouched).

    Every gated block is replaced by its deployed form (:class:`_Deployed`:
    BN folded, gathered or dense-then-mask), the remaining conv + BN pairs are
    folded (:func:`fold_batchnorm`), and the blocks share one
    :class:`SliceCache` capped at ``slice_cache_mb``. Eval mode, inference
    only; outputs equal the masked model's. Every block starts on the gathered
    path for batch-1 CPU calls; :func:`plan_deployment` measures the faster
    path per block and :func:`compile_deployed` freezes what is static.

    The slices and the full-width convolutions are packed on first use for
    the thread count of that moment (oneDNN's AVX2 convolutions reorder some
    weights packed for another count on every call); a call at another count
    drops them and packs again (:meth:`SliceCache.at_threads`). The plan
    (:func:`plan_deployment`) was timed at one count: plan again at another.
    """
    deployed = copy_model(model).eval()
    replace = [(name, module, _entry(module)) for name, module in deployed.named_modules()]
    replace = [(name, module, entry) for name, module, entry in replace
               if entry is not None and any(isinstance(c, ChannelGate) for c in module.children())]
    if not replace:
        raise UserError("deploy_model needs a gated model (insert_gates first)")
    cache = SliceCache(int(slice_cache_mb * 2 ** 20))
    with torch.no_grad():
        for name, block, entry in replace:
            parent_name, _, child = name.rpartition(".")
            parent = deployed.get_submodule(parent_name) if parent_name else deployed
            _strip_gate_hooks(block)
            replacement = entry.deployed(block)
            replacement.cache = cache
            setattr(parent, child, replacement)
    fold_batchnorm(deployed)
    return deployed.requires_grad_(False)


def deployed_blocks(model: nn.Module) -> dict[str, _Deployed]:
    """The deployed blocks of a deployed model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _Deployed)}


def slice_cache(model: nn.Module) -> SliceCache:
    """The slice cache a deployed model's blocks share."""
    blocks = list(deployed_blocks(model).values())
    if not blocks:
        raise UserError("not a deployed model (deploy_model first)")
    return blocks[0].cache


def set_slice_cache_limit(model: nn.Module, slice_cache_mb: float) -> None:
    """Set the memory cap (MiB) of a deployed model's slice cache (emptied: entries refill on use)."""
    cache = slice_cache(model)
    if slice_cache_mb < 0:
        raise UserError(f"the slice cache's memory cap must be >= 0 MiB, got {slice_cache_mb}")
    cache.max_bytes = int(slice_cache_mb * 2 ** 20)
    cache.clear()


def cast_deployed(model: nn.Module, device=None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """``model.to(device, dtype)`` that keeps the gates in fp32 (thresholds must compare in fp32)."""
    model.to(device=device, dtype=dtype)
    for block in deployed_blocks(model).values():
        block._fuse_gates()  # frozen constants neither move nor cast: fuse again, in fp32, where the block now is
        block.cache.clear()  # slices of the old dtype / device
        block.full.clear()
    return model
