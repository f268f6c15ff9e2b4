"""Optimizations of a static graph, shared by the deployed form and the optimized dense reference.

BatchNorm folded into the convolution before it (:func:`fold_batchnorm`),
every plain convolution run as the deployed form runs its slices
(:func:`fuse_onednn`: prepacked oneDNN, ReLU and residual sum fused), and
frozen TorchScript (:func:`trace_and_freeze`). Giving the dense reference the
same machinery is what makes a latency comparison measure channel skipping
alone. Modules whose shapes depend on the data (:class:`DataDependent`: the
deployed blocks) are kept whole: they fold and pack their own.
"""
from __future__ import annotations

import operator
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from manidp.errors import UserError
from manidp.gating.slices import _ConvGeometry, _SlicedConv, packs

__all__ = ["DataDependent", "fold_batchnorm", "fuse_onednn", "trace_and_freeze"]


class DataDependent(nn.Module):
    """A module whose shapes depend on the data (a deployed gated block): fx tracing keeps it whole."""


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


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` into it, in place.

    The pairs are found on the model's ``torch.fx`` graph (deployed blocks are
    leaves: they fold their own), so any traceable backbone is covered: the
    stem, downsample branches, and a whole dense model. A model fx cannot
    trace is returned as it is.
    """

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module: nn.Module, name: str) -> bool:
            return isinstance(module, DataDependent) or super().is_leaf_module(module, name)

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


def trace_and_freeze(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """A static module (a dense path, a dense model) as frozen TorchScript for inputs shaped like
    ``example``: BN folded, weights constant, no Python dispatch per op."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.freeze(torch.jit.trace(module.eval(), example, check_trace=False))


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps deployed blocks whole (their shapes depend on the data)."""

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, DataDependent) or super().is_leaf_module(module, name)


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
    missing, raises ``UserError``. Its weights are packed for this moment's
    thread count once and for good (unlike a deployed block's, which repack):
    after ``torch.set_num_threads``, fuse again, or AVX2's oneDNN reorders
    some of them on every call (``manidp latency`` keys its reference by
    thread count).
    """
    if not packs(example):
        raise UserError("prepacked oneDNN convolutions need a CPU build of torch with oneDNN and fp32 inputs "
                        "(bf16 only on a CPU with bf16 instructions: AVX-512 BW/VL/DQ or AVX-NE-CONVERT)")
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
