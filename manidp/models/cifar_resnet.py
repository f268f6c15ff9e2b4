"""CIFAR-style ResNets (He et al. 2016, section 4.2), registered into timm.

Three stages of ``n`` BasicBlocks with 16/32/64 channels on 32x32 inputs
(depth = 6n + 2: ResNet-20/32/56/110). Shortcuts are **option A**: identity
where shapes match, and where they do not, a parameter-free shortcut that
subsamples by the stride and zero-pads the new channels. This is the design of
the original paper and of the ManiDP / FPGM CIFAR tables (ResNet-56 = 125.49 M
MACs). Blocks use timm's BasicBlock attribute names (``conv1``, ``bn1``,
``act1``, ``conv2``, ``bn2``, ``act2``, ``downsample``) so the methods that wrap
blocks handle CIFAR and timm ResNets with one code path.

Create them through timm: ``timm.create_model("cifar_resnet56", num_classes=10)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: spatial subsampling plus zero channels, no weights."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class CifarBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = ZeroPadShortcut(in_chs, out_chs, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        stages, chs = [], width
        for i, out_chs in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                blocks.append(CifarBasicBlock(chs, out_chs, 2 if (i > 0 and j == 0) else 1))
                chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = chs
        self.fc = nn.Linear(chs, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.global_pool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_cifar_resnet(depth: int, pretrained: bool = False, **kwargs) -> CifarResNet:
    if pretrained:
        raise ValueError("no hub weights exist for CIFAR ResNets; pass a local checkpoint instead")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    model = CifarResNet(depth, **kwargs)
    # timm's place for a model's native input, read by `manidp macs` and anything that asks timm.
    model.pretrained_cfg = model.default_cfg = {"input_size": (kwargs.get("in_chans", 3), 32, 32),
                                                "num_classes": model.fc.out_features}
    return model


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create_cifar_resnet(20, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create_cifar_resnet(32, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create_cifar_resnet(56, pretrained, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create_cifar_resnet(110, pretrained, **kwargs)
