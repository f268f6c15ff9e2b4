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
   ``x.mean((2, 3))``: the deployed batch-1 form computes a gate's input from
   the kept channels alone and hands the gate a ``[1, C_in, 1, 1]`` map.
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
* ``deploy_model(model) -> nn.Module``: the batch-1 deployed form (a copy),
  which never computes a skipped channel (see :class:`DeployedBasicBlock`);
  its outputs equal the masked model's outputs.
* ``copy_model(model)``: a deepcopy that drops the per-forward records.
* ``register_gated_block(block_type, specs, deployed_type)``: a new block type.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models._efficientnet_blocks import InvertedResidual
from timm.models.resnet import BasicBlock, Bottleneck

from manidp.errors import UserError
from manidp.models.cifar_resnet import CifarBasicBlock

__all__ = [
    "GateFactory", "GateSpec", "ChannelGate", "BLOCKS", "register_gated_block", "insert_gates",
    "gated_layers", "kept_channels", "copy_model", "deploy_model",
    "DeployedBasicBlock", "DeployedBottleneck", "DeployedInvertedResidual",
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
                 conv_names: Sequence[str], consumer_names: Sequence[str]):
        super().__init__()
        self.gate = gate
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv_names = tuple(conv_names)
        self.consumer_names = tuple(consumer_names)
        self.mask: Optional[torch.Tensor] = None
        self.features: Optional[torch.Tensor] = None

    def read_input(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook on the gated conv: evaluate the gate on its input."""
        mask = self.gate(args[0])
        if mask.shape != (args[0].shape[0], self.out_channels):
            raise RuntimeError(f"gate returned a mask of shape {tuple(mask.shape)}, expected "
                               f"({args[0].shape[0]}, {self.out_channels}) for {self.conv_names[0]}")
        self.mask = mask

    def apply_mask(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook at the masking point: record pooled features, multiply by the mask."""
        if self.training:
            self.features = output.mean((2, 3), dtype=torch.float32)
        return output * self.mask.to(output.dtype)[:, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, gates {', '.join(self.conv_names)}"


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


def insert_gates(model: nn.Module, gate_factory: GateFactory) -> list[ChannelGate]:
    """Insert gates into every supported block of ``model`` in place; return them in forward order."""
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
                [prefix + c for c in spec.gated], [prefix + c for c in spec.consumers],
            ).to(reads.weight.device)
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


def _kept(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and scales of a batch-1 mask's kept channels.

    An empty set keeps channel 0 with scale 0: the output is the same (the
    channel is multiplied by zero) and PyTorch refuses zero-size convolutions.
    """
    index = mask[0].nonzero().squeeze(1)
    if index.numel() == 0:
        return mask.new_zeros(1, dtype=torch.long), mask.new_zeros(1)
    return index, mask[0].index_select(0, index)


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride, padding, dilation,
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


_ONEDNN = torch.backends.mkldnn.is_available()


def _scatter_pooled(y: torch.Tensor, index: torch.Tensor, channels: int) -> torch.Tensor:
    """The global average pool of the full-width masked tensor, as a ``[1, C, 1, 1]`` map."""
    pooled = y.new_zeros(1, channels, 1, 1)
    pooled[0, index, 0, 0] = y.mean((2, 3))[0]
    return pooled


class _Deployed(nn.Module):
    """Batch-1 inference only. A deployed block may overwrite its input tensor
    (the residual is accumulated into it when the shortcut is the identity)."""

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[0] != 1:
            raise ValueError(f"the deployed model runs one instance at a time (batch size 1), got {x.shape[0]}")


class DeployedBasicBlock(_Deployed):
    """A gated BasicBlock at batch 1: per call, evaluate the gates and run smaller convolutions.

    conv1 runs on the kept output channels only (rows of the BN-folded weight,
    one ``index_select``); conv2 runs on the kept input x kept output channels
    (one gather from a precomputed ``[C2*C1, k*k]`` view, indexed by
    ``k2 * C1 + k1``); its result is added into the shortcut at the kept
    channels (``index_add_``), so no full-width scatter is needed.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        _require_identity(block, ("aa", "se"))
        conv1 = _plain_conv(block.conv1, "BasicBlock.conv1")
        conv2 = _plain_conv(block.conv2, "BasicBlock.conv2")
        if conv1.groups != 1 or conv2.groups != 1:
            raise UserError("the deployed BasicBlock supports ungrouped convolutions only")
        self.gate1, self.gate2 = block.gate1.gate, block.gate2.gate
        self.act1, self.act2 = block.act1, block.act2
        self.downsample = block.downsample
        w1, b1 = _fold_bn(conv1, block.bn1)
        w2, b2 = _fold_bn(conv2, block.bn2)
        self.mid, self.out = w1.shape[0], w2.shape[0]
        self.k1, self.k2 = tuple(w1.shape[2:]), tuple(w2.shape[2:])
        self.register_buffer("w1", w1.reshape(self.mid, -1))
        self.register_buffer("b1", b1)
        self.register_buffer("w2", w2.reshape(self.out * self.mid, -1))
        self.register_buffer("b2", b2)
        self.conv1_args = (conv1.stride, conv1.padding, conv1.dilation)
        self.conv2_args = (conv2.stride, conv2.padding, conv2.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        k1, s1 = _kept(self.gate1(x))
        w1 = self.w1.index_select(0, k1).view(-1, x.shape[1], *self.k1)
        y = _conv(x, w1, self.b1.index_select(0, k1), *self.conv1_args)
        y = self.act1(y).mul_(s1.to(y.dtype).view(1, -1, 1, 1))
        k2, s2 = _kept(self.gate2(_scatter_pooled(y, k1, self.mid)))
        w2 = self.w2.index_select(0, (k2[:, None] * self.mid + k1[None, :]).view(-1))
        z = _conv(y, w2.view(k2.numel(), k1.numel(), *self.k2), self.b2.index_select(0, k2), *self.conv2_args)
        z = z.mul_(s2.to(z.dtype).view(1, -1, 1, 1))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act2(shortcut.index_add_(1, k2, z))


class DeployedBottleneck(_Deployed):
    """A gated Bottleneck at batch 1: the 1x1 convs run as matrix products on the kept channels.

    conv1 (1x1 reduce): kept output rows of the folded weight; conv2 (3x3):
    kept input x kept output channels; conv3 (1x1 expand, dense output): the
    kept input channels, taken as rows of its pre-transposed weight, so the
    slice is one contiguous ``index_select``; the shortcut is its accumulator.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        _require_identity(block, ("aa", "se"))
        convs = [_plain_conv(getattr(block, n), f"Bottleneck.{n}") for n in ("conv1", "conv2", "conv3")]
        conv1, conv2, conv3 = convs
        if conv1.kernel_size != (1, 1) or conv1.stride != (1, 1) or conv3.kernel_size != (1, 1) \
                or conv3.stride != (1, 1) or conv2.groups != 1:
            raise UserError("the deployed Bottleneck needs stride-1 1x1 conv1/conv3 and an ungrouped conv2")
        self.gate1, self.gate2 = block.gate1.gate, block.gate2.gate
        self.act1, self.act2, self.act3 = block.act1, block.act2, block.act3
        self.downsample = block.downsample
        w1, b1 = _fold_bn(conv1, block.bn1)
        w2, b2 = _fold_bn(conv2, block.bn2)
        w3, b3 = _fold_bn(conv3, block.bn3)
        self.c1, self.c2 = w1.shape[0], w2.shape[0]
        self.k2 = tuple(w2.shape[2:])
        self.register_buffer("w1", w1.flatten(1))
        self.register_buffer("b1", b1)
        self.register_buffer("w2", w2.reshape(self.c2 * self.c1, -1))
        self.register_buffer("b2", b2)
        self.register_buffer("w3t", w3.flatten(1).t().contiguous())
        self.register_buffer("b3", b3.view(-1, 1))
        self.conv2_args = (conv2.stride, conv2.padding, conv2.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        _, cin, h, w = x.shape
        k1, s1 = _kept(self.gate1(x))
        y = torch.addmm(self.b1.index_select(0, k1)[:, None], self.w1.index_select(0, k1), x.reshape(cin, h * w))
        y = self.act1(y).mul_(s1.to(y.dtype)[:, None]).view(1, -1, h, w)
        k2, s2 = _kept(self.gate2(_scatter_pooled(y, k1, self.c1)))
        w2 = self.w2.index_select(0, (k2[:, None] * self.c1 + k1[None, :]).view(-1))
        y = _conv(y, w2.view(k2.numel(), k1.numel(), *self.k2), self.b2.index_select(0, k2), *self.conv2_args)
        y = self.act2(y).mul_(s2.to(y.dtype).view(1, -1, 1, 1))
        h2, w2_ = y.shape[2:]
        shortcut = x if self.downsample is None else self.downsample(x)
        out = shortcut.reshape(-1, h2 * w2_).addmm_(self.w3t.index_select(0, k2).t(), y.view(-1, h2 * w2_))
        return self.act3(out.add_(self.b3).view(1, -1, h2, w2_))


class DeployedInvertedResidual(_Deployed):
    """A gated MobileNetV2 inverted residual at batch 1.

    The one mask selects the expanded channels: ``conv_pw`` computes only
    those (a matrix product), ``conv_dw`` convolves only those (a depthwise
    conv with as many groups as kept channels), ``conv_pwl`` reads only those.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        _require_identity(block, ("aa", "se", "conv_s2d"))
        pw, dw, pwl = (_plain_conv(getattr(block, n), f"InvertedResidual.{n}")
                       for n in ("conv_pw", "conv_dw", "conv_pwl"))
        if pw.kernel_size != (1, 1) or pwl.kernel_size != (1, 1) or pw.stride != (1, 1) \
                or dw.groups != dw.in_channels or dw.out_channels != dw.in_channels:
            raise UserError("the deployed InvertedResidual needs 1x1 expansion/projection and a depthwise conv")
        self.gate1 = block.gate1.gate
        self.act1, self.act2, self.act3 = _bn_act(block.bn1), _bn_act(block.bn2), _bn_act(block.bn3)
        self.has_skip = block.has_skip
        w1, b1 = _fold_bn(pw, block.bn1)
        wd, bd = _fold_bn(dw, block.bn2)
        w3, b3 = _fold_bn(pwl, block.bn3)
        self.register_buffer("w1", w1.flatten(1))
        self.register_buffer("b1", b1)
        self.register_buffer("wd", wd)
        self.register_buffer("bd", bd)
        self.register_buffer("w3t", w3.flatten(1).t().contiguous())
        self.register_buffer("b3", b3.view(-1, 1))
        self.dw_args = (dw.stride, dw.padding, dw.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        _, cin, h, w = x.shape
        k, s = _kept(self.gate1(x))
        y = torch.addmm(self.b1.index_select(0, k)[:, None], self.w1.index_select(0, k), x.reshape(cin, h * w))
        y = self.act1(y).view(1, -1, h, w)
        y = _conv(y, self.wd.index_select(0, k), self.bd.index_select(0, k), *self.dw_args, k.numel())
        y = self.act2(y).mul_(s.to(y.dtype).view(1, -1, 1, 1))
        h2, w2 = y.shape[2:]
        out = torch.addmm(self.b3, self.w3t.index_select(0, k).t(), y.view(-1, h2 * w2))
        out = self.act3(out).view(1, -1, h2, w2)
        return out.add_(x) if self.has_skip else out


def _strip_gate_hooks(block: nn.Module) -> None:
    """Remove the gating hooks from a block's modules: the deployed form applies its gates itself."""
    for module in block.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), ChannelGate)]:
                del hooks[key]


def deploy_model(model: nn.Module) -> nn.Module:
    """The batch-1 deployed form of a gated model (a copy; ``model`` is untouched).

    Every gated block is replaced by its deployed form (BN folded, convolutions
    sliced per call to the channels its gates keep); the rest of the network
    runs as it is. Eval mode, inference only, batch size 1.
    """
    deployed = copy_model(model).eval()
    replace = [(name, module, _entry(module)) for name, module in deployed.named_modules()]
    replace = [(name, module, entry) for name, module, entry in replace
               if entry is not None and any(isinstance(c, ChannelGate) for c in module.children())]
    if not replace:
        raise UserError("deploy_model needs a gated model (insert_gates first)")
    with torch.no_grad():
        for name, block, entry in replace:
            parent_name, _, child = name.rpartition(".")
            parent = deployed.get_submodule(parent_name) if parent_name else deployed
            _strip_gate_hooks(block)
            setattr(parent, child, entry.deployed(block))
    return deployed.requires_grad_(False)


_BASIC = (GateSpec("gate1", "conv1", ("conv1",), ("conv2",), "act1"),
          GateSpec("gate2", "conv2", ("conv2",), (), "bn2"))
register_gated_block(BasicBlock, _BASIC, DeployedBasicBlock)
register_gated_block(CifarBasicBlock, _BASIC, DeployedBasicBlock)
register_gated_block(Bottleneck, (GateSpec("gate1", "conv1", ("conv1",), ("conv2",), "act1"),
                                  GateSpec("gate2", "conv2", ("conv2",), ("conv3",), "act2")), DeployedBottleneck)
register_gated_block(InvertedResidual, (GateSpec("gate1", "conv_pw", ("conv_pw", "conv_dw"), ("conv_pwl",), "bn2"),),
                     DeployedInvertedResidual)
