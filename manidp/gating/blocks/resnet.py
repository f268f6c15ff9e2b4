"""ResNet blocks: where gates sit in a ``BasicBlock`` and a ``Bottleneck``, and their deployed forms.

* ``BasicBlock`` (timm resnet18/34, :class:`~manidp.models.cifar_resnet.CifarBasicBlock`):
  gate 1 reads the block input and masks conv1's output after BN and ReLU;
  gate 2 reads that masked tensor and masks conv2's output after BN, before
  the residual add (the authors' placement).
* ``Bottleneck`` (resnet50): gate 1 masks conv1 (the 1x1 reduce) after
  BN+ReLU, gate 2 masks conv2 (the 3x3) after BN+ReLU; conv3 (the expansion,
  coupled to the residual) stays dense.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.resnet import BasicBlock, Bottleneck

from manidp.errors import UserError
from manidp.gating.deployed import _Deployed, _plain_conv, _require_identity, _residual_relu, _scale
from manidp.gating.fusion import _fold_bn, fold_batchnorm
from manidp.gating.gates import GateSpec, register_gated_block
from manidp.gating.slices import _ConvGeometry
from manidp.models.cifar_resnet import CifarBasicBlock

__all__ = ["DeployedBasicBlock", "DeployedBottleneck"]


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
        m1, k1, key1, n1, conv1, recurring = self._first_slice("conv1", x, self.w1, self.b1, self.geo1)
        y = conv1(x, self.relu1)
        y, m2 = self._scaled_mask(y if self.relu1 else self.act1(y), m1, k1, n1, self.mid, recurring)
        k2, key2, _ = self._kept(m2)
        conv2, y = self._reading_slice("conv2", (key1, key2, y.shape[2:]), y, self.w2, self.b2, k2, k1, n1, self.geo2)
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
        m1, k1, key1, n1, conv1, recurring = self._first_slice("conv1", x, self.w1, self.b1, g1)
        y = conv1(x, self.relu1)
        y, m2 = self._scaled_mask(y if self.relu1 else self.act1(y), m1, k1, n1, self.c1, recurring)
        k2, key2, n2 = self._kept(m2)
        conv2, y = self._reading_slice("conv2", (key1, key2, y.shape[2:]), y, self.w2, self.b2, k2, k1, n1, g2)
        y2 = conv2(y, self.relu2)
        y2 = _scale(y2 if self.relu2 else self.act2(y2), m2, k2)
        conv3, y2 = self._reading_slice("conv3", (key2, y2.shape[2:]), y2, self.w3, self.b3, None, k2, n2, g3)
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


_BASIC = (GateSpec("gate1", "conv1", ("conv1",), ("conv2",), "act1"),
          GateSpec("gate2", "conv2", ("conv2",), (), "bn2"))
register_gated_block(BasicBlock, _BASIC, DeployedBasicBlock)
register_gated_block(CifarBasicBlock, _BASIC, DeployedBasicBlock)
register_gated_block(Bottleneck, (GateSpec("gate1", "conv1", ("conv1",), ("conv2",), "act1"),
                                  GateSpec("gate2", "conv2", ("conv2",), ("conv3",), "act2")), DeployedBottleneck)
