"""Dynamic channel gating shared by every gated method (ManiDP, FBS, ...).

A *gate* is any ``nn.Module`` that is called with the tensor entering the
convolution it gates (``[B, C_in, H, W]``) and returns a per-instance,
per-output-channel multiplier ``[B, C_out]``: values >= 0, exact zeros are
skipped channels, non-zero values scale the kept channels (ManiDP keeps its
saliency as the scale; a binary gate returns 0/1). Methods build gates with a
*gate factory* ``factory(in_channels, out_channels) -> nn.Module``.

**The contract a gate must follow** (ManiDP's and FBS's gates do):

1. ``gate(x) -> mask``, ``mask.shape == (B, C_out)``, ``mask >= 0``.
2. The gate depends on ``x`` only through its global average pool
   ``x.mean((2, 3))`` (or, for a gate with ``pools_abs = True``, that of
   ``|x|``): the deployed form computes a gate's input from the kept
   channels alone and hands the gate a ``[B, C_in, 1, 1]`` map (fp32).
3. In eval mode the mask depends on the instance only (no batch statistics),
   so a batch-1 call gives the same mask as the same instance in a batch.

Anything else a method needs (ManiDP's pre-threshold saliency, thresholds) the
gate keeps itself; this module never looks inside it.

Where gates sit (:data:`BLOCKS`, extended with :func:`register_gated_block`).
Gates are inserted *into* the timm blocks in place: the block object and its
forward stay timm's own (nothing is copied), each gate becomes a child module
of the block (``gate1``, ``gate2``), and two hooks apply it: a forward
pre-hook on the conv it gates reads that conv's input, a forward hook on a
later module multiplies that module's output by the mask. Layer names (and so
``InstanceMacs`` keys and state-dict keys of the backbone) do not change.

* ``BasicBlock`` (timm resnet18/34, :class:`~manidp.models.cifar_resnet.CifarBasicBlock`):
  gate 1 reads the block input and masks conv1's output after BN and ReLU;
  gate 2 reads that masked tensor and masks conv2's output after BN, before
  the residual add (the authors' placement).
* ``Bottleneck`` (resnet50): gate 1 masks conv1 (the 1x1 reduce) after
  BN+ReLU, gate 2 masks conv2 (the 3x3) after BN+ReLU; conv3 (the expansion,
  coupled to the residual) stays dense.
* ``InvertedResidual`` (mobilenetv2): ONE gate reads the block input and
  masks the depthwise output after BN+ReLU6. A depthwise channel only reads
  its own expanded channel, so one zero skips the expanded channel of
  ``conv_pw``, the depthwise channel of ``conv_dw`` and the input channel of
  ``conv_pwl`` at once; applying the mask a second time after ``conv_pw``
  would add nothing but a second scaling. The first block of mobilenetv2
  (a ``DepthwiseSeparableConv`` without expansion) is not gated.

Stem, shortcut/downsample convs and the classifier are never gated.

What the machinery gives a method (the API FBS and ManiDP share):

* ``insert_gates(model, gate_factory) -> list[ChannelGate]`` (in place, in
  forward order); ``gate_factory(in_channels, out_channels) -> nn.Module``.
  Each :class:`ChannelGate` holds the method's gate as ``.gate`` and records,
  per forward, ``.mask`` (``[B, C_out]``, with gradient in training) and, in
  training mode only, ``.features`` (the global average pool of the *unmasked*
  tensor at the masking point, fp32, ``[B, C_out]``: ManiDP's manifold term).
  ``.conv_names`` / ``.consumer_names`` name the convs whose output / input
  channels its zeros skip; ``.in_channels`` / ``.out_channels`` its sizes.
* ``gated_layers(model) -> list[ChannelGate]``: the gates of a gated model
  (also of a copy).
* ``kept_channels(gates) -> (in_kept, out_kept)``: ``{conv name: Tensor[B]}``
  counts of nonzero mask entries of the last forward, the arguments
  :class:`~manidp.macs.InstanceMacs` takes (``counter(B, in_kept, out_kept)``).
* ``insert_gates(..., round_to=8)``: kept counts rounded to a multiple of 8
  or 16 (oneDNN's SIMD channel block), in training, evaluation and the
  deployed form alike (:func:`round_kept`); ManiDP and FBS expose it as the
  method option ``round_to``.
* ``deploy_model(model, slice_cache_mb)``: the deployed form (a copy), whose
  outputs equal the masked model's. Every gated block becomes a
  :class:`_Deployed` block with BN folded and two paths: *gathered* (CPU,
  batch 1: the convolutions run on the kept channels only, their BN-folded
  weight slices taken from a bounded LRU :class:`SliceCache` keyed by kept
  set and prepacked for oneDNN; kept sets padded with zero-mask channels to
  oneDNN's SIMD block, so convolution shapes recur) and *dense-then-mask* (full-width folded
  convolutions times the masks: static shapes, no host synchronisation, so
  CUDA and batches > 1 run it). On the CPU a gate that offers
  ``kernel_spec()`` (a :class:`GateKernel`) runs as one compiled op
  (:mod:`manidp.kernels`): pool included on the gathered path, with its mask
  multiply on the dense path; the gathered path's scale-and-pool and
  residual-sum-and-ReLU are compiled ops too. Otherwise (no compiler, other
  devices) gates run as one frozen TorchScript call on their fp32 pooled
  input. Gate 2 of a gathered block reads the pool of conv1's kept outputs,
  scattered into a C-long vector only.
* ``plan_deployment(deployed, inputs)``: per block, time both paths on the
  running hardware and keep the faster (the plan is returned, to record);
  the gathered path is timed leave-one-out, each instance on a slice cache
  warmed by the other instances only, as an instance in use meets it.
* ``compile_deployed(deployed, example)``: freeze what is static (the whole
  model when every block runs dense, else the dense-path blocks).
* ``fold_batchnorm(model)``, ``trace_and_freeze(module, example)``: the same
  optimizations for a dense reference. ``cast_deployed`` moves/casts a
  deployed model keeping gates and thresholds in fp32.
* ``copy_model(model)``: a deepcopy that drops the per-forward records.
* ``register_gated_block(block_type, specs, deployed_type)``: a new block type.
"""
from __future__ import annotations

import copy
import math
import operator
import statistics
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp
from timm.models._efficientnet_blocks import InvertedResidual
from timm.models.resnet import BasicBlock, Bottleneck

from manidp import kernels
from manidp.errors import UserError
from manidp.models.cifar_resnet import CifarBasicBlock

__all__ = [
    "GateFactory", "GateSpec", "ChannelGate", "GateKernel", "BLOCKS", "register_gated_block", "insert_gates",
    "gated_layers", "kept_channels", "round_kept", "copy_model", "deploy_model", "plan_deployment",
    "compile_deployed", "fold_batchnorm", "fuse_onednn", "trace_and_freeze", "deployed_blocks", "slice_cache",
    "set_slice_cache_limit", "cast_deployed", "SliceCache", "DEFAULT_SLICE_CACHE_MB", "DeployedBasicBlock",
    "DeployedBottleneck", "DeployedInvertedResidual",
]

GateFactory = Callable[[int, int], nn.Module]


@dataclass(frozen=True)
class GateSpec:
    """One gate of a block type, by the block's attribute names.

    ``reads``: the conv whose input the gate reads; ``gated``: convs whose output
    channels a zero skips; ``consumers``: convs whose input channels a zero
    skips; ``apply_at``: the module whose output is multiplied by the mask.
    """

    attr: str
    reads: str
    gated: tuple[str, ...]
    consumers: tuple[str, ...]
    apply_at: str


class ChannelGate(nn.Module):
    """A gate placed in a block: applies it through hooks and records its mask.

    ``conv_names`` / ``consumer_names`` are the model-level names of the convs
    whose output / input channels the mask skips (the keys of
    :func:`kept_channels`).
    """

    def __init__(self, gate: nn.Module, in_channels: int, out_channels: int,
                 conv_names: Sequence[str], consumer_names: Sequence[str], round_to: Optional[int] = None):
        super().__init__()
        self.gate = gate
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv_names = tuple(conv_names)
        self.consumer_names = tuple(consumer_names)
        self.round_to = round_to
        self.mask: Optional[torch.Tensor] = None
        self.features: Optional[torch.Tensor] = None

    def read_input(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook on the gated conv: evaluate the gate on its input."""
        mask = self.gate(args[0])
        if mask.shape != (args[0].shape[0], self.out_channels):
            raise RuntimeError(f"gate returned a mask of shape {tuple(mask.shape)}, expected "
                               f"({args[0].shape[0]}, {self.out_channels}) for {self.conv_names[0]}")
        self.mask = round_kept(mask, self.gate.saliency, self.round_to) if self.round_to else mask

    def apply_mask(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook at the masking point: record pooled features, multiply by the mask."""
        if self.training:
            self.features = output.mean((2, 3), dtype=torch.float32)
        return output * self.mask.to(output.dtype)[:, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, gates {', '.join(self.conv_names)}"


def round_kept(mask: torch.Tensor, saliency: torch.Tensor, multiple: int) -> torch.Tensor:
    """Round each instance's kept-channel count to the nearest multiple of ``multiple`` (halves up).

    oneDNN's CPU kernels block channels by 8 (AVX2) or 16 (AVX-512): 36 kept
    channels cost about what 48 do, so rounding lets the deployed form pay
    only for what it computes. Kept channels rank first (by mask value), then
    the skipped ones by pre-threshold ``saliency``; rounding up adds the most
    salient skipped channels with their saliency as scale (one whose saliency
    is 0 stays skipped), rounding down drops the weakest kept ones. An
    instance that keeps nothing keeps nothing.
    """
    kept = mask != 0
    count = kept.sum(1, keepdim=True)
    target = ((count + multiple // 2) // multiple * multiple).clamp(max=mask.shape[1])
    target = torch.where(count > 0, target.clamp(min=multiple), count)
    saliency = saliency.detach().to(mask.dtype)
    score = saliency + kept.to(mask.dtype) * (saliency.abs().amax(1, keepdim=True) + mask.detach().abs() + 1)
    rank = score.argsort(1, descending=True).argsort(1)
    keep = rank < target
    return torch.where(keep, torch.where(kept, mask, saliency), torch.zeros_like(mask))


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


class GateKernel:
    """A gate as one compiled op (``torch.ops.manidp.gate_scale_``, :mod:`manidp.kernels`).

    A gate that can be written as ``pool -> Linear [-> ReLU -> Linear] ->
    ReLU -> clamp -> threshold / top-k`` describes itself by returning one
    from a ``kernel_spec()`` method (ManiDP's and FBS's gates do); the
    deployed dense-then-mask path then runs gate and mask multiply as a single
    call instead of about ten ATen ops. Weights are given as ``nn.Linear``
    stores them (``[out, in]``) and kept transposed, fp32, detached.
    ``abs_pool``: pool ``|x|`` (FBS); ``cut``: keep values ``> cut``;
    ``topk``: keep only the ``topk`` largest (0: all); ``round_to``: then
    round the kept count as :func:`round_kept` does (the pre-selection values
    are its saliencies). The mask must equal
    the gate's own (up to fp32 rounding of the sums), which tests check.
    """

    def __init__(self, w1: torch.Tensor, b1: Optional[torch.Tensor] = None, w2: Optional[torch.Tensor] = None,
                 b2: Optional[torch.Tensor] = None, relu_out: bool = True, abs_pool: bool = False,
                 clamp_max: float = math.inf, cut: float = -math.inf, topk: int = 0, round_to: int = 0):
        def vector(t):
            return None if t is None else t.detach().float().contiguous()

        self.w1t = w1.detach().float().t().contiguous()
        self.b1, self.b2 = vector(b1), vector(b2)
        self.w2t = None if w2 is None else w2.detach().float().t().contiguous()
        self.relu_out, self.abs_pool = bool(relu_out), bool(abs_pool)
        self.clamp_max, self.cut, self.topk = float(clamp_max), float(cut), int(topk)
        self.round_to = int(round_to)  # kept counts rounded as round_kept does (0: not rounded)

    def __call__(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``target`` (in place) times the mask the gate computes from ``source``."""
        if not kernels.available():
            raise UserError(f"the compiled gate op is not available: {kernels.status()}")
        return torch.ops.manidp.gate_scale_(source, target, self.w1t, self.b1, self.w2t, self.b2, self.relu_out,
                                            self.abs_pool, self.clamp_max, self.cut, self.topk, self.round_to)

    def mask(self, source: torch.Tensor) -> torch.Tensor:
        """The gate's mask ``[B, C_out]`` (fp32) of ``source`` (a feature map or its ``[B, C, 1, 1]``
        pool), pool included, in one call (``torch.ops.manidp.gate_mask``)."""
        if not kernels.available():
            raise UserError(f"the compiled gate op is not available: {kernels.status()}")
        return torch.ops.manidp.gate_mask(source, self.w1t, self.b1, self.w2t, self.b2, self.relu_out,
                                          self.abs_pool, self.clamp_max, self.cut, self.topk, self.round_to)

    def takes(self, source: torch.Tensor) -> bool:
        """Whether the ops take this input (a 4-D fp32 or bf16 CPU map, weights on the CPU) and are built."""
        return (source.is_cpu and self.w1t.is_cpu and source.dim() == 4
                and source.dtype in (torch.float32, torch.bfloat16) and kernels.available())

    def runs_on(self, source: torch.Tensor, target: torch.Tensor) -> bool:
        """Whether ``self(source, target)`` runs: both taken (:meth:`takes`), same dtype, 4-D CPU target."""
        return target.is_cpu and target.dim() == 4 and source.dtype == target.dtype and self.takes(source)


@dataclass(frozen=True)
class _BlockEntry:
    specs: tuple[GateSpec, ...]
    deployed: type


#: Block types that can be gated: type -> gate placement and deployed form.
BLOCKS: dict[type, _BlockEntry] = {}


def register_gated_block(block_type: type, specs: Sequence[GateSpec], deployed: type) -> None:
    """Teach :func:`insert_gates` and :func:`deploy_model` a new block type."""
    BLOCKS[block_type] = _BlockEntry(tuple(specs), deployed)


def _entry(module: nn.Module) -> Optional[_BlockEntry]:
    for cls in type(module).__mro__:
        if cls in BLOCKS:
            return BLOCKS[cls]
    return None


def insert_gates(model: nn.Module, gate_factory: GateFactory, round_to: Optional[int] = None) -> list[ChannelGate]:
    """Insert gates into every supported block of ``model`` in place; return them in forward order.

    ``round_to`` (e.g. 8 or 16): every mask's kept count is rounded to that
    multiple (:func:`round_kept`), in training, evaluation and the deployed
    form alike; the gates must keep their pre-threshold scores in ``.saliency``.
    """
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise UserError(f"round_to must be a positive integer (e.g. 8 or 16) or null, got {round_to!r}")
    blocks = [(name, module, _entry(module)) for name, module in model.named_modules()]
    blocks = [(name, module, entry) for name, module, entry in blocks if entry is not None]
    if not blocks:
        supported = ", ".join(sorted(t.__name__ for t in BLOCKS))
        raise UserError(f"{type(model).__name__} has no block a gate can be inserted into; supported blocks: "
                        f"{supported}")
    gates = []
    for name, block, entry in blocks:
        prefix = f"{name}." if name else ""
        for spec in entry.specs:
            if hasattr(block, spec.attr):
                raise UserError(f"{prefix}{spec.attr} already exists: gates were inserted into this model before")
            reads = getattr(block, spec.reads)
            site = ChannelGate(
                gate_factory(reads.in_channels, getattr(block, spec.gated[0]).out_channels),
                reads.in_channels, getattr(block, spec.gated[0]).out_channels,
                [prefix + c for c in spec.gated], [prefix + c for c in spec.consumers], round_to,
            ).to(reads.weight.device)
            if round_to and not hasattr(site.gate, "saliency"):
                raise UserError(f"round_to needs gates that keep their pre-threshold scores in .saliency; "
                                f"{type(site.gate).__name__} does not")
            block.add_module(spec.attr, site)
            reads.register_forward_pre_hook(site.read_input)
            getattr(block, spec.apply_at).register_forward_hook(site.apply_mask)
            gates.append(site)
    return gates


def gated_layers(model: nn.Module) -> list[ChannelGate]:
    """The :class:`ChannelGate` modules of a gated model, in module order."""
    return [m for m in model.modules() if isinstance(m, ChannelGate)]


def kept_channels(gates: Iterable[ChannelGate]) -> tuple[dict, dict]:
    """Per-instance kept channel counts of the last forward, as ``InstanceMacs`` wants them.

    A channel is kept when its mask entry is non-zero. Returns
    ``(in_kept, out_kept)``: ``{conv name: Tensor[B]}``.
    """
    in_kept, out_kept = {}, {}
    for site in gates:
        if site.mask is None:
            raise RuntimeError("kept_channels needs a forward pass of the gated model first")
        count = (site.mask != 0).sum(1)
        out_kept.update({name: count for name in site.conv_names})
        in_kept.update({name: count for name in site.consumer_names})
    return in_kept, out_kept


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that drops per-forward records (masks, saliencies).

    Records are plain tensor attributes of modules (parameters and buffers
    live elsewhere); after a training step they are part of an autograd graph,
    which ``deepcopy`` refuses, and a copy has no use for them anyway.
    """
    memo = {id(v): None for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)}
    return copy.deepcopy(model, memo)


# ---------------------------------------------------------------- deployed form
def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and bias with an eval-mode BatchNorm folded in."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    return weight.detach().contiguous(), bias.detach().contiguous()


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


_ONEDNN = torch.backends.mkldnn.is_available()
# oneDNN convolution with a weight reordered once into its blocked layout, bias and ReLU fused (the ops
# Inductor's CPU freezing emits). A gathered slice is packed when it enters the cache, so a repeated
# kept set pays neither the gather nor oneDNN's per-call weight reorder (at 7x7 that reorder costs
# about as much as the convolution).
_PACKED = _ONEDNN and hasattr(torch.ops.mkldnn, "_convolution_pointwise") \
    and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
          groups: int = 1) -> torch.Tensor:
    """``F.conv2d``, but straight to oneDNN on CPU.

    At batch 1, PyTorch sends a 3x3 convolution whose input has at most 20480
    elements to its slow im2col path; a gathered 7x7 conv (e.g. 285 of 512
    channels) lands there and runs about 2x slower than through oneDNN, which
    the dense model (512 x 7 x 7 = 25088 elements) gets.
    """
    if x.is_cpu and _ONEDNN and x.dtype in (torch.float32, torch.bfloat16):
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _simd_block() -> int:
    """Channels per SIMD block of oneDNN's fp32 CPU kernels on this CPU: 16 with AVX-512, else 8."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


#: Whether :class:`_SlicedConv` reorders weights from an input-channels-last copy (an ablation; default OIHW).
_REORDER_FROM_CHANNELS_LAST = False


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

    __slots__ = ("weight", "bias", "geometry", "groups", "packed", "nbytes")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, geometry: _ConvGeometry, groups: int,
                 input_shape: Sequence[int], pack: bool = True):
        self.geometry, self.groups = geometry, groups
        self.nbytes = weight.numel() * weight.element_size() + bias.numel() * bias.element_size()
        self.packed = pack and _PACKED and weight.is_cpu and weight.dtype in (torch.float32, torch.bfloat16)
        if self.packed:
            g = geometry
            # from OIHW by default: an input-channels-last copy first makes oneDNN's reorder itself faster
            # (its blocked layouts keep input channels innermost), but the copy eats the gain on a cache
            # miss (benchmarks/miss_path.py, the resnet34 ablation row channels_last_reorder)
            source = weight.contiguous(memory_format=torch.channels_last) if _REORDER_FROM_CHANNELS_LAST \
                and weight.dim() == 4 else weight.contiguous()
            weight = torch.ops.mkldnn._reorder_convolution_weight(
                source, list(g.padding), list(g.stride), list(g.dilation), groups, list(input_shape))
        self.weight, self.bias = weight, bias

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

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def snapshot(self) -> tuple:
        """The entries as they are now (references to the slices, no copies), for :meth:`restore`."""
        return OrderedDict(self._entries), self.bytes

    def restore(self, state: tuple) -> None:
        """Back to a :meth:`snapshot`: what was cached since is dropped. A timer restores the cache before
        every pass over the same instances, so no pass finds slices that an earlier pass of those
        instances left: each sees the cache its first pass saw."""
        entries, self.bytes = state
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
    """A block's full-width prepacked convolutions, by (name, input shape, dtype); oneDNN's blocked weights
    cannot be copied, so a copy starts empty and refills on use."""

    def __deepcopy__(self, memo) -> "_PackedConvs":
        return _PackedConvs()


#: Default memory cap of a deployed model's slice cache.
DEFAULT_SLICE_CACHE_MB = 256.0


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


class _Deployed(nn.Module):
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
        if self.path == "gathered" and x.shape[0] == 1 and x.is_cpu:
            return self.gathered(x)
        return self.dense(x)

    def _kept(self, mask: torch.Tensor) -> tuple[torch.Tensor, bytes]:
        """Kept channels of a batch-1 mask: (index tensor, cache key), the index cached per set.

        The set is padded with the lowest-numbered skipped channels up to a
        multiple of :attr:`kept_block` (oneDNN's SIMD channel block; their mask
        entries are 0: computed and multiplied by zero, the output is
        unchanged). oneDNN pads channels to that block anyway, so the padding
        costs next to nothing, and a conv then has at most (C / block)^2
        shapes: instances never seen before reuse oneDNN's compiled primitives
        instead of creating one per new kept count (benchmarks/README,
        ``unseen_instances.py``). An empty set keeps channel 0 (PyTorch
        refuses zero-size convolutions).
        """
        alive = mask[0] != 0
        block = getattr(self, "kept_block", 1)  # deployed before padding existed: unpadded
        key = alive.numpy().tobytes() + block.to_bytes(2, "little")

        def build():
            padded = alive
            count = int(alive.sum())
            target = min(alive.numel(), max(1, -(-count // block) * block))
            if target > count:
                padded = alive.clone()
                padded[(~alive).nonzero().squeeze(1)[:target - count]] = True
            index = padded.nonzero().squeeze(1)
            return index, index.numel() * index.element_size()

        return self.cache.get((id(self), "kept", key), build), key

    def _slice(self, name: str, keys: tuple, build: Callable[[bool], _SlicedConv]) -> _SlicedConv:
        """The cached slice ``build(pack)`` makes; packing (a reorder of the whole slice) only pays when
        the slice is reused, so a cache with no room gets plain slices."""
        def sized():
            sliced = build(self.cache.max_bytes > 0)
            return sliced, sliced.nbytes

        return self.cache.get((id(self), name, *keys), sized)

    def _full_conv(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   geometry: "_ConvGeometry", relu: bool, groups: int = 1) -> torch.Tensor:
        """A full-width convolution of the dense path (then ReLU), prepacked and fused as the gathered slices
        are on eager CPU calls (the dense reference gets the same, :func:`fuse_onednn`), else ``F.conv2d``
        (inside a trace, on other devices)."""
        if _PACKED and x.is_cpu and x.dtype in (torch.float32, torch.bfloat16) and not torch.jit.is_tracing():
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
        if _PACKED and x.is_cpu and x.dtype in (torch.float32, torch.bfloat16) and not torch.jit.is_tracing():
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
    ``index_add_`` along dim 1 of the 4-D tensor takes a slow strided path
    (resnet34 at 56x56: 258 us at 1 thread); the same sum on the ``[N*H*W, C]``
    view of both tensors is 2-5x faster. Other layouts take ``index_add_``.
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


class DeployedBasicBlock(_Deployed):
    """A gated BasicBlock. Gathered: conv1 on the kept output channels (ReLU fused), conv2 on the
    kept input x kept output channels, its result added into the shortcut at the kept channels
    (``index_add_``)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        _require_identity(block, ("aa", "se"))
        conv1 = _plain_conv(block.conv1, "BasicBlock.conv1")
        conv2 = _plain_conv(block.conv2, "BasicBlock.conv2")
        if conv1.groups != 1 or conv2.groups != 1:
            raise UserError("the deployed BasicBlock supports ungrouped convolutions only")
        self._set_gates(block.gate1, block.gate2)
        self.act1, self.act2 = block.act1, block.act2
        self.relu1 = type(block.act1) is nn.ReLU  # fused into the gathered conv1
        self.downsample = None if block.downsample is None else fold_batchnorm(block.downsample)
        w1, b1 = _fold_bn(conv1, block.bn1)
        w2, b2 = _fold_bn(conv2, block.bn2)
        self.mid = w1.shape[0]
        self.register_buffer("w1", w1)
        self.register_buffer("b1", b1)
        self.register_buffer("w2", w2)
        self.register_buffer("b2", b2)
        self.geo1, self.geo2 = _ConvGeometry.of(conv1), _ConvGeometry.of(conv2)

    def gathered(self, x: torch.Tensor) -> torch.Tensor:
        m1 = self._mask_of(0, x)
        k1, key1 = self._kept(m1)
        conv1 = self._slice("conv1", (key1, x.shape), lambda pack: _SlicedConv(
            self.w1.index_select(0, k1), self.b1.index_select(0, k1), self.geo1, 1, x.shape, pack))
        y = conv1(x, self.relu1)
        y, pooled = _scale_pool(y if self.relu1 else self.act1(y), m1, k1, self.mid, self.use_kernels)
        m2 = self._mask_of(1, pooled, pooled=True)
        k2, key2 = self._kept(m2)
        conv2 = self._slice("conv2", (key1, key2, y.shape[2:]), lambda pack: _SlicedConv(
            self.w2.index_select(0, k2).index_select(1, k1), self.b2.index_select(0, k2), self.geo2, 1, y.shape, pack))
        z = conv2(y, False)
        shortcut = self._shortcut(x)
        return _residual_relu(shortcut, k2, z, m2, self.act2, self.use_kernels)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        y = self._full_conv("conv1", x, self.w1, self.b1, self.geo1, self.relu1)
        y = self._masked(0, x, y if self.relu1 else self.act1(y))
        z = self._masked(1, y, self._full_conv("conv2", y, self.w2, self.b2, self.geo2, False))
        shortcut = self._shortcut(x)
        return self.act2(z.add_(shortcut))


class DeployedBottleneck(_Deployed):
    """A gated Bottleneck. Gathered: conv1 (1x1 reduce) on its kept outputs, conv2 (3x3) on kept
    input x kept output channels, conv3 (1x1 expand, dense output) on the kept input channels;
    every slice is cached and prepacked."""

    def __init__(self, block: nn.Module):
        super().__init__()
        _require_identity(block, ("aa", "se"))
        convs = [_plain_conv(getattr(block, n), f"Bottleneck.{n}") for n in ("conv1", "conv2", "conv3")]
        conv1, conv2, conv3 = convs
        if conv1.kernel_size != (1, 1) or conv3.kernel_size != (1, 1) or any(c.groups != 1 for c in convs):
            raise UserError("the deployed Bottleneck needs 1x1 conv1/conv3 and ungrouped convolutions")
        self._set_gates(block.gate1, block.gate2)
        self.act1, self.act2, self.act3 = block.act1, block.act2, block.act3
        self.relu1, self.relu2 = type(block.act1) is nn.ReLU, type(block.act2) is nn.ReLU
        self.downsample = None if block.downsample is None else fold_batchnorm(block.downsample)
        for i, (conv, bn) in enumerate(zip(convs, (block.bn1, block.bn2, block.bn3)), 1):
            w, b = _fold_bn(conv, bn)
            self.register_buffer(f"w{i}", w)
            self.register_buffer(f"b{i}", b)
        self.c1 = self.w1.shape[0]
        self.geo = tuple(_ConvGeometry.of(c) for c in convs)

    def gathered(self, x: torch.Tensor) -> torch.Tensor:
        g1, g2, g3 = self.geo
        m1 = self._mask_of(0, x)
        k1, key1 = self._kept(m1)
        conv1 = self._slice("conv1", (key1, x.shape), lambda pack: _SlicedConv(
            self.w1.index_select(0, k1), self.b1.index_select(0, k1), g1, 1, x.shape, pack))
        y = conv1(x, self.relu1)
        y, pooled = _scale_pool(y if self.relu1 else self.act1(y), m1, k1, self.c1, self.use_kernels)
        m2 = self._mask_of(1, pooled, pooled=True)
        k2, key2 = self._kept(m2)
        conv2 = self._slice("conv2", (key1, key2, y.shape[2:]), lambda pack: _SlicedConv(
            self.w2.index_select(0, k2).index_select(1, k1), self.b2.index_select(0, k2), g2, 1, y.shape, pack))
        y2 = conv2(y, self.relu2)
        y2 = _scale(y2 if self.relu2 else self.act2(y2), m2, k2)
        conv3 = self._slice("conv3", (key2, y2.shape[2:]), lambda pack: _SlicedConv(
            self.w3.index_select(1, k2), self.b3, g3, 1, y2.shape, pack))
        shortcut = self._shortcut(x)
        return self.act3(conv3(y2, False).add_(shortcut))

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        g1, g2, g3 = self.geo
        y = self._full_conv("conv1", x, self.w1, self.b1, g1, self.relu1)
        y = self._masked(0, x, y if self.relu1 else self.act1(y))
        y2 = self._full_conv("conv2", y, self.w2, self.b2, g2, self.relu2)
        y = self._masked(1, y, y2 if self.relu2 else self.act2(y2))
        shortcut = self._shortcut(x)
        return self.act3(self._full_conv("conv3", y, self.w3, self.b3, g3, False).add_(shortcut))


class DeployedInvertedResidual(_Deployed):
    """A gated MobileNetV2 inverted residual.

    The one mask selects the expanded channels: gathered, ``conv_pw`` computes
    only those, ``conv_dw`` convolves only those (a depthwise conv with as many
    groups as kept channels), ``conv_pwl`` reads only those.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        _require_identity(block, ("aa", "se", "conv_s2d"))
        pw, dw, pwl = (_plain_conv(getattr(block, n), f"InvertedResidual.{n}")
                       for n in ("conv_pw", "conv_dw", "conv_pwl"))
        if pw.kernel_size != (1, 1) or pwl.kernel_size != (1, 1) or pw.groups != 1 or pwl.groups != 1 \
                or dw.groups != dw.in_channels or dw.out_channels != dw.in_channels:
            raise UserError("the deployed InvertedResidual needs 1x1 expansion/projection and a depthwise conv")
        self._set_gates(block.gate1)
        self.act1, self.act2, self.act3 = _bn_act(block.bn1), _bn_act(block.bn2), _bn_act(block.bn3)
        self.has_skip = block.has_skip
        for name, conv, bn in (("w1", pw, block.bn1), ("wd", dw, block.bn2), ("w3", pwl, block.bn3)):
            w, b = _fold_bn(conv, bn)
            self.register_buffer(name, w)
            self.register_buffer("b" + name[1:], b)
        self.geo = tuple(_ConvGeometry.of(c) for c in (pw, dw, pwl))

    def gathered(self, x: torch.Tensor) -> torch.Tensor:
        g1, gd, g3 = self.geo
        m = self._mask_of(0, x)
        k, key = self._kept(m)
        pw = self._slice("pw", (key, x.shape), lambda pack: _SlicedConv(
            self.w1.index_select(0, k), self.b1.index_select(0, k), g1, 1, x.shape, pack))
        y = self.act1(pw(x, False))
        dw = self._slice("dw", (key, y.shape[2:]), lambda pack: _SlicedConv(
            self.wd.index_select(0, k), self.bd.index_select(0, k), gd, k.numel(), y.shape, pack))
        y = _scale(self.act2(dw(y, False)), m, k)
        pwl = self._slice("pwl", (key, y.shape[2:]), lambda pack: _SlicedConv(
            self.w3.index_select(1, k), self.b3, g3, 1, y.shape, pack))
        out = self.act3(pwl(y, False))
        return out.add_(x) if self.has_skip else out

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        g1, gd, g3 = self.geo
        y = self.act1(self._full_conv("pw", x, self.w1, self.b1, g1, False))
        y = self.act2(self._full_conv("dw", y, self.wd, self.bd, gd, False, self.wd.shape[0]))
        y = self._masked(0, x, y)
        out = self.act3(self._full_conv("pwl", y, self.w3, self.b3, g3, False))
        return out.add_(x) if self.has_skip else out


def _strip_gate_hooks(block: nn.Module) -> None:
    """Remove the gating hooks from a block's modules: the deployed form applies its gates itself."""
    for module in block.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), ChannelGate)]:
                del hooks[key]


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` into it, in place.

    The pairs are found on the model's ``torch.fx`` graph (deployed blocks are
    leaves: they fold their own), so any traceable backbone is covered: the
    stem, downsample branches, and a whole dense model. A model fx cannot
    trace is returned as it is.
    """

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module: nn.Module, name: str) -> bool:
            return isinstance(module, _Deployed) or super().is_leaf_module(module, name)

    try:
        graph = Tracer().trace(model)
    except Exception:  # noqa: BLE001 - fx raises many types; an untraceable model keeps its BatchNorms
        return model
    with torch.no_grad():
        for node in graph.nodes:
            if node.op != "call_module" or type(model.get_submodule(node.target)) is not nn.BatchNorm2d:
                continue
            source = node.args[0]
            if not isinstance(source, torch.fx.Node) or source.op != "call_module" or len(source.users) != 1:
                continue
            conv = model.get_submodule(source.target)
            if type(conv) is not nn.Conv2d:
                continue
            weight, bias = _fold_bn(conv, model.get_submodule(node.target))
            conv.weight = nn.Parameter(weight, requires_grad=False)
            conv.bias = nn.Parameter(bias, requires_grad=False)
            parent, _, child = node.target.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    return model


def deploy_model(model: nn.Module, slice_cache_mb: float = DEFAULT_SLICE_CACHE_MB) -> nn.Module:
    """The deployed form of a gated model (a copy; ``model`` is untouched).

    Every gated block is replaced by its deployed form (:class:`_Deployed`:
    BN folded, gathered or dense-then-mask), the remaining conv + BN pairs are
    folded (:func:`fold_batchnorm`), and the blocks share one
    :class:`SliceCache` capped at ``slice_cache_mb``. Eval mode, inference
    only; outputs equal the masked model's. Every block starts on the gathered
    path for batch-1 CPU calls; :func:`plan_deployment` measures the faster
    path per block and :func:`compile_deployed` freezes what is static.
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


def _clock() -> Callable[[], float]:
    """The planner's clock: with one CPU thread that thread's CPU time, which leaves out waits for a busy
    core; else wall time (a module function, so tests can give the planner a fake clock)."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _time_call(func: Callable, inputs: Sequence[torch.Tensor], repeats: int,
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
        for j, x in enumerate(inputs):
            if j != i:
                block.gathered(x.clone())
        warmed.append(cache.snapshot())
    cache.restore(start)

    def before(i: int) -> None:
        cache.restore(warmed[i])

    return before


def trace_and_freeze(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """A static module (a dense path, a dense model) as frozen TorchScript for inputs shaped like
    ``example``: BN folded, weights constant, no Python dispatch per op."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.freeze(torch.jit.trace(module.eval(), example, check_trace=False))


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps deployed blocks whole (their shapes depend on the data)."""

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, _Deployed) or super().is_leaf_module(module, name)


def _is_relu(model: nn.Module, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return type(model.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_) and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _other_summand(node: torch.fx.Node, conv: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The other tensor of ``conv + other`` when ``node`` is that sum of two same-shaped tensors, else None."""
    if not (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)
            and len(node.args) == 2 and not node.kwargs):
        return None
    other = node.args[1] if node.args[0] is conv else node.args[0]
    if other is conv or not isinstance(other, torch.fx.Node) or "tensor_meta" not in other.meta:
        return None
    mine, theirs = conv.meta["tensor_meta"], other.meta["tensor_meta"]
    return other if (mine.shape, mine.dtype) == (theirs.shape, theirs.dtype) else None


@torch.no_grad()
def fuse_onednn(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``model`` (BN folded, eval) with every plain convolution run as the gathered path runs its slices.

    Each ``nn.Conv2d`` becomes one oneDNN call on a weight reordered once for
    inputs shaped like its input in ``example`` (:class:`_SlicedConv` at full
    width), with a following ReLU fused, and a following residual sum (and its
    ReLU) fused too (oneDNN's binary post-op). This is the deployed form's
    convolution machinery given to a dense model, so a comparison between the
    two measures channel skipping alone. Deployed blocks are left whole (they
    pack their own). The result is an eager ``torch.fx.GraphModule`` (TorchScript
    cannot hold oneDNN's blocked weights); a model fx cannot trace, or oneDNN
    missing, raises ``UserError``.
    """
    if not (_PACKED and example.is_cpu and example.dtype in (torch.float32, torch.bfloat16)):
        raise UserError("prepacked oneDNN convolutions need a CPU build of torch with oneDNN and fp32/bf16 inputs")
    try:
        gm = torch.fx.GraphModule(model, _LeafTracer().trace(model))
    except Exception as err:  # noqa: BLE001 - fx raises many types
        raise UserError(f"{type(model).__name__} cannot be traced by torch.fx: {err}") from err
    graph = gm.graph
    for node in list(graph.nodes):  # folded BNs and eval-mode dropouts are identities in between
        if node.op == "call_module" and type(gm.get_submodule(node.target)) in (nn.Identity, nn.Dropout):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    gm.recompile()
    ShapeProp(gm).propagate(example)
    for i, node in enumerate([n for n in graph.nodes if n.op == "call_module"
                              and type(gm.get_submodule(n.target)) is nn.Conv2d]):
        conv = gm.get_submodule(node.target)
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            continue
        bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
        sliced = _SlicedConv(conv.weight.detach(), bias.detach(), _ConvGeometry.of(conv), conv.groups,
                             node.args[0].meta["tensor_meta"].shape)
        last, other, relu = node, None, False
        users = list(node.users)
        if len(users) == 1:
            other = _other_summand(users[0], node)
            if other is not None:
                last = users[0]
                users = list(last.users)
            if len(users) == 1 and _is_relu(gm, users[0]):
                last, relu = users[0], True
        gm.register_buffer(f"_onednn_w{i}", sliced.weight, persistent=False)
        gm.register_buffer(f"_onednn_b{i}", sliced.bias, persistent=False)
        g = sliced.geometry
        with graph.inserting_before(last):
            weight, bias = graph.get_attr(f"_onednn_w{i}"), graph.get_attr(f"_onednn_b{i}")
            if other is None:
                fused = graph.call_function(torch.ops.mkldnn._convolution_pointwise.default, (
                    node.args[0], weight, bias, list(g.padding), list(g.stride), list(g.dilation), conv.groups,
                    "relu" if relu else "none", [], ""))
            else:
                fused = graph.call_function(torch.ops.mkldnn._convolution_pointwise.binary, (
                    node.args[0], other, weight, bias, list(g.padding), list(g.stride), list(g.dilation),
                    conv.groups, "add", 1.0, "relu" if relu else None, [], ""))
        fused.meta = dict(last.meta)  # its shape, for the convolutions and sums that read it
        last.replace_all_uses_with(fused)
        while last is not node:
            previous = last.args[0] if last.args[0] is not other else last.args[1]
            graph.erase_node(last)
            last = previous
        graph.erase_node(node)
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


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
    seen: dict[str, list] = {name: [] for name in blocks}
    handles = [block.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].clone()))
               for name, block in blocks.items()]
    try:
        for block in blocks.values():
            block.path = "dense"
        for x in inputs:
            model(x)
    finally:
        for h in handles:
            h.remove()
    plan = {}
    for name, block in blocks.items():
        block_inputs = seen[name]
        kept = _kept_counts(block, block_inputs)
        if not (block_inputs[0].is_cpu and block_inputs[0].shape[0] == 1):
            block.path = "dense"
            plan[name] = {"path": "dense", "gathered_ms": None, "dense_ms": None, "kept": kept}
            continue
        dense = trace_and_freeze(_DensePath(block), block_inputs[0]) if freeze_dense else block.dense
        before = _leave_one_out(block, block_inputs)
        gathered_ms = _time_call(block.gathered, block_inputs, repeats, before)
        dense_ms = _time_call(dense, block_inputs, repeats)
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
    inputs: dict[str, torch.Tensor] = {}
    handles = [block.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args[0].clone()))
               for name, block in blocks.items()]
    try:
        model(example.clone())
    finally:
        for h in handles:
            h.remove()
    for name, block in blocks.items():
        if block.path == "dense":
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, trace_and_freeze(_DensePath(block), inputs[name]))
    return model


_BASIC = (GateSpec("gate1", "conv1", ("conv1",), ("conv2",), "act1"),
          GateSpec("gate2", "conv2", ("conv2",), (), "bn2"))
register_gated_block(BasicBlock, _BASIC, DeployedBasicBlock)
register_gated_block(CifarBasicBlock, _BASIC, DeployedBasicBlock)
register_gated_block(Bottleneck, (GateSpec("gate1", "conv1", ("conv1",), ("conv2",), "act1"),
                                  GateSpec("gate2", "conv2", ("conv2",), ("conv3",), "act2")), DeployedBottleneck)
register_gated_block(InvertedResidual, (GateSpec("gate1", "conv_pw", ("conv_pw", "conv_dw"), ("conv_pwl",), "bn2"),),
                     DeployedInvertedResidual)
