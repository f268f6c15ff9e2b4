"""MobileNetV2 / EfficientNet inverted residuals: where the gate sits, and the deployed form.

``InvertedResidual`` (mobilenetv2): ONE gate reads the block input and masks
the depthwise output after BN+ReLU6. A depthwise channel only reads its own
expanded channel, so one zero skips the expanded channel of ``conv_pw``, the
depthwise channel of ``conv_dw`` and the input channel of ``conv_pwl`` at
once; applying the mask a second time after ``conv_pw`` would add nothing but
a second scaling. The first block of mobilenetv2 (a
``DepthwiseSeparableConv`` without expansion) is not gated.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models._efficientnet_blocks import InvertedResidual

from manidp.errors import UserError
from manidp.gating.deployed import _bn_act, _Deployed, _plain_conv, _require_identity, _scale
from manidp.gating.fusion import _fold_bn
from manidp.gating.gates import GateSpec, register_gated_block
from manidp.gating.slices import _ConvGeometry, _SlicedConv

__all__ = ["DeployedInvertedResidual"]


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
        m, k, key, _, pw, _ = self._first_slice("pw", x, self.w1, self.b1, g1)
        y = self.act1(pw(x, False))
        dw = self._slice("dw", (key, y.shape[2:]), lambda pack: _SlicedConv(
            self._gather(self.wd, k), self.bd.index_select(0, k), gd, k.numel(), y.shape, pack))
        y = _scale(self.act2(dw(y, False)), m, k)
        pwl = self._slice("pwl", (key, y.shape[2:]), lambda pack: _SlicedConv(
            self._gather(self.w3, None, k), self.b3, g3, 1, y.shape, pack))
        out = self.act3(pwl(y, False))
        return out.add_(x) if self.has_skip else out

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        g1, gd, g3 = self.geo
        y = self.act1(self._full_conv("pw", x, self.w1, self.b1, g1, False))
        y = self.act2(self._full_conv("dw", y, self.wd, self.bd, gd, False, self.wd.shape[0]))
        y = self._masked(0, x, y)
        out = self.act3(self._full_conv("pwl", y, self.w3, self.b3, g3, False))
        return out.add_(x) if self.has_skip else out


register_gated_block(InvertedResidual, (GateSpec("gate1", "conv_pw", ("conv_pw", "conv_dw"), ("conv_pwl",), "bn2"),),
                     DeployedInvertedResidual)
