"""Gates at training time: the contract a method's gate follows, and where gates go in a backbone.

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
gate keeps itself; this package never looks inside it. A gate that can be
written as one compiled op describes itself with ``kernel_spec() ->``
:class:`GateKernel`.

Gates are inserted *into* the timm blocks in place (:func:`insert_gates`, for
the block types in :data:`BLOCKS`, one module per block family under
``manidp/gating/blocks/``): the block object and its forward stay timm's own
(nothing is copied), each gate becomes a child module of the block (``gate1``,
``gate2``), and two hooks apply it: a forward pre-hook on the conv it gates
reads that conv's input, a forward hook on a later module multiplies that
module's output by the mask. Layer names (and so ``InstanceMacs`` keys and
state-dict keys of the backbone) do not change. Stem, shortcut/downsample
convs and the classifier are never gated.

Each :class:`ChannelGate` records, per forward, ``.mask`` (``[B, C_out]``,
with gradient in training) and, in training mode only, ``.features`` (the
global average pool of the *unmasked* tensor at the masking point, fp32: ManiDP's
manifold term); :func:`kept_channels` turns the masks into the counts
:class:`~manidp.macs.InstanceMacs` takes. ``insert_gates(..., round_to=8)``
rounds kept counts to oneDNN's SIMD channel block in training, evaluation and
the deployed form alike (:func:`round_kept`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from manidp import kernels
from manidp.errors import UserError

__all__ = ["GateFactory", "GateSpec", "ChannelGate", "GateKernel", "BLOCKS", "register_gated_block", "insert_gates",
           "gated_layers", "kept_channels", "round_kept", "copy_model"]

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

    def scale_pool_mask(self, y: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, keep: int) -> tuple:
        """The previous gate's kept channels ``y`` (channels ``index``) times their ``mask`` values, and this
        gate's mask of their pool, in one call (``torch.ops.manidp.scale_pool_gate``): (the scaled map, in
        place, or a new one of its first ``keep`` channels; the mask ``[1, C_out]``)."""
        if not kernels.available():
            raise UserError(f"the compiled gate op is not available: {kernels.status()}")
        return torch.ops.manidp.scale_pool_gate(y, index, mask, keep, self.w1t, self.b1, self.w2t, self.b2,
                                                self.relu_out, self.abs_pool, self.clamp_max, self.cut, self.topk,
                                                self.round_to)

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
