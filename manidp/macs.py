"""One MAC counter for every method: conv + Linear multiply-accumulates at batch 1.

This is the pruning papers' "FLOPs" convention (BN, activations, pooling and
additions are not counted; FLOPs = 2 x MACs only where a column says so).

* :func:`trace_layers` runs the model once at batch 1 and records, for every
  ``nn.Conv2d`` and ``nn.Linear`` that executes, the shapes that determine its
  cost (:class:`LayerCost`). Modules that do not run cost nothing; modules that
  run (a gate's small Linear layers, too) are counted.
* :func:`count_macs` is the dense or physically-pruned count: a static pruned
  model is counted as it physically is, because the trace sees its real shapes.
* :class:`InstanceMacs` is the per-instance counter for dynamic methods: they
  report, per layer, how many input and output channels each instance really
  kept (a ``[B]`` tensor, fractional where a method keeps parts of a channel),
  and it returns each instance's MACs. Layers a method does not mention count
  at their full traced cost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["LayerCost", "trace_layers", "count_macs", "InstanceMacs"]


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    groups: int
    kernel: int  # kh * kw (1 for Linear)
    positions: int  # output positions per instance: H_out * W_out, or rows for Linear

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @property
    def macs(self) -> int:
        return self.kernel * (self.in_channels // self.groups) * self.out_channels * self.positions

    def kept_macs(self, in_kept=None, out_kept=None):
        """MACs with only ``in_kept`` input and ``out_kept`` output channels computed.

        Either may be a number or a tensor of per-instance counts; ``None`` means
        all channels. A depthwise conv computes one input channel per output
        channel, so only ``out_kept`` matters there.
        """
        cin = self.in_channels if in_kept is None else in_kept
        cout = self.out_channels if out_kept is None else out_kept
        if self.depthwise:
            return self.kernel * cout * self.positions
        return self.kernel * (cin / self.groups) * cout * self.positions


def _rows_per_instance(out: torch.Tensor) -> int:
    return out.numel() // (out.shape[0] * out.shape[-1])


@torch.no_grad()
def trace_layers(model: nn.Module, input_size: Sequence[int], device=None) -> dict[str, LayerCost]:
    """Shapes of every conv/Linear that runs on one ``input_size`` (C, H, W) input."""
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
    costs: dict[str, LayerCost] = {}
    handles = []

    def hook(name):
        def record(module, inputs, output):
            if isinstance(module, nn.Conv2d):
                cost = LayerCost(
                    name, "conv", module.in_channels, module.out_channels, module.groups,
                    module.kernel_size[0] * module.kernel_size[1], output.shape[-2] * output.shape[-1],
                )
            else:
                cost = LayerCost(name, "linear", module.in_features, module.out_features, 1, 1,
                                 _rows_per_instance(output))
            if name in costs:  # a module run twice in one forward costs twice
                prev = costs[name]
                cost = LayerCost(name, cost.kind, cost.in_channels, cost.out_channels, cost.groups,
                                 cost.kernel, prev.positions + cost.positions)
            costs[name] = cost
        return record

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return costs


def count_macs(model: nn.Module, input_size: Sequence[int], device=None) -> int:
    """Conv + Linear MACs of one forward at batch 1, as the model physically is."""
    return sum(c.macs for c in trace_layers(model, input_size, device).values())


class InstanceMacs:
    """Per-instance MACs from the channels each instance kept, layer by layer.

    Build it once per model (one trace); call it per batch with the kept-channel
    counts the method observed. Layer names are ``model.named_modules()`` names
    of the conv/Linear layers.
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int], device=None):
        self.layers = trace_layers(model, input_size, device)
        self.dense = sum(c.macs for c in self.layers.values())

    def __call__(
        self,
        batch_size: int,
        in_kept: Optional[Mapping[str, torch.Tensor]] = None,
        out_kept: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> torch.Tensor:
        in_kept, out_kept = dict(in_kept or {}), dict(out_kept or {})
        unknown = (set(in_kept) | set(out_kept)) - set(self.layers)
        if unknown:
            raise KeyError(f"kept channels reported for layers the trace never saw: {sorted(unknown)}")
        total = torch.zeros(batch_size, dtype=torch.float64)
        for name, cost in self.layers.items():
            if name in in_kept or name in out_kept:
                ki, ko = in_kept.get(name), out_kept.get(name)
                ki = None if ki is None else ki.detach().double().cpu()
                ko = None if ko is None else ko.detach().double().cpu()
                total += cost.kept_macs(ki, ko)
            else:
                total += cost.macs
        return total
