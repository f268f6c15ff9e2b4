"""ManiDP's saliency gate, and the folded form the deployed model runs (card: README.md)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from manidp.gating import GateKernel

__all__ = ["SaliencyGate"]


class SaliencyGate(nn.Module):
    """ManiDP's saliency gate: ``pi`` from the pooled input, mask ``pi * 1[pi >= threshold]``.

    Keeps the last forward's pre-threshold saliency ``pi`` (``[B, C_out]``,
    fp32, with gradient) in :attr:`saliency` for the losses.
    """

    #: Weight initialisations: ours and the authors' (``kaiming_normal_`` on both Linear layers).
    fc1_inits = ("torch", "kaiming_normal")
    fc2_inits = ("near_identity", "kaiming_normal")

    def __init__(self, in_channels: int, out_channels: int, clamp_max: float = 1000.0,
                 threshold_init: float = -1e4, fc1_init: str = "torch", fc2_init: str = "near_identity"):
        super().__init__()
        hidden = out_channels if out_channels < 80 else out_channels // 2
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, out_channels)
        if fc1_init == "kaiming_normal":  # the authors'; "torch" keeps nn.Linear's own (a third of its std)
            nn.init.kaiming_normal_(self.fc1.weight)
        if fc2_init == "kaiming_normal":  # the authors': every channel of a pretrained net rescaled at step 0
            nn.init.kaiming_normal_(self.fc2.weight)
        else:
            # pi = 1 +- about 0.02 at the start: the gated net starts as the dense one, and the small
            # random weights (not zeros) let the first Linear learn from the first step
            nn.init.normal_(self.fc2.weight, std=0.01 / math.sqrt(hidden))
        nn.init.ones_(self.fc2.bias)
        self.clamp_max = clamp_max
        self.register_buffer("threshold", torch.tensor(float(threshold_init)))
        self.saliency: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._mask(x)
        return self._mask(x)

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.fc1.weight.dtype
        pooled = x.mean((2, 3)) if x.dtype == dtype else x.mean((2, 3), dtype=dtype)
        pi = F.relu(self.fc2(F.relu(self.fc1(pooled)))).clamp(max=self.clamp_max)
        self.saliency = pi
        return pi.masked_fill(pi < self.threshold, 0.0)  # pi * 1[pi >= threshold], no gradient through 1[.]

    def extra_repr(self) -> str:
        return f"threshold={self.threshold.item():.4g}"

    def inference_form(self) -> nn.Module:
        """The same mask in fewer ops, for the deployed model (:class:`_InferenceSaliencyGate`)."""
        return _InferenceSaliencyGate(self).train(self.training)

    def kernel_spec(self) -> GateKernel:
        """This gate as one compiled op (:class:`manidp.gating.GateKernel`), for the deployed model."""
        return _InferenceSaliencyGate(self).kernel_spec()


class _InferenceSaliencyGate(nn.Module):
    """:class:`SaliencyGate`'s mask with the threshold folded into one op: what the deployed form runs.

    ``pi = clamp(relu(z), max=M)`` masked by ``pi >= t`` equals
    ``threshold(clamp(z, max=M), t', 0)`` with ``t'`` the float just below ``t``
    (``threshold`` keeps values ``> t'``, i.e. ``>= t``, in float32), and when ``t > 0`` a
    negative ``z`` falls below ``t'`` anyway, so the ReLU goes too: two ops
    instead of four (relu, clamp, lt, masked_fill). At batch 1 on small
    feature maps each op costs microseconds of dispatch, more than its
    arithmetic. Equal outputs, bit for bit (tested).
    """

    def __init__(self, gate: SaliencyGate):
        super().__init__()
        self.fc1, self.fc2 = gate.fc1, gate.fc2
        self.clamp_max = float(gate.clamp_max)
        threshold = gate.threshold.detach().float()
        self.relu = not float(threshold) > 0
        # The float32 just below t (what the comparison sees): the float64 neighbour would round back to t.
        self.cut = float(torch.nextafter(threshold, torch.tensor(-math.inf)))

    def kernel_spec(self) -> GateKernel:
        """pool -> fc1 -> ReLU -> fc2 -> ReLU -> clamp -> keep ``> cut``: the same mask as one op."""
        return GateKernel(self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, relu_out=True,
                          clamp_max=self.clamp_max, cut=self.cut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.fc1.weight.dtype
        pooled = x.mean((2, 3)) if x.dtype == dtype else x.mean((2, 3), dtype=dtype)
        z = self.fc2(F.relu(self.fc1(pooled)))
        if self.relu:
            z = F.relu(z)
        return F.threshold(z.clamp(max=self.clamp_max), self.cut, 0.0)
