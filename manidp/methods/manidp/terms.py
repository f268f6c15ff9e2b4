"""ManiDP's loss terms, keep-rate schedule and threshold rules (card: README.md)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["instance_weights", "sparsity_loss", "similarity_loss", "keep_rate_schedule", "rank_threshold",
           "quantile_threshold"]


def instance_weights(losses: torch.Tensor, complexity: float, gamma: float = 1.0) -> torch.Tensor:
    """beta_i = 1[L_i < C] * ((C - L_i) / C) ** gamma: easy instances near 1, hard ones 0."""
    if complexity <= 0:
        return torch.zeros_like(losses)
    easy = (losses < complexity).to(losses.dtype)
    return easy * ((complexity - losses) / complexity).clamp(min=0).pow(gamma)


def sparsity_loss(saliencies: Sequence[torch.Tensor], beta: torch.Tensor) -> torch.Tensor:
    """sum_l mean_i(beta_i * mean_k pi_ik^l)."""
    return sum((beta * pi.mean(1)).mean() for pi in saliencies)


def similarity_loss(saliency: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """||R - T||_F^2 / B^2 for one layer: T, R the cosine-similarity matrices of saliencies and features."""
    s = F.normalize(saliency.flatten(1), dim=1)
    f = F.normalize(features.flatten(1), dim=1)
    diff = f @ f.t() - s @ s.t()
    return diff.pow(2).sum() / saliency.shape[0] ** 2


def keep_rate_schedule(epoch: int, epochs: int, target: float) -> float:
    """r_e = r_T + (1 - r_T) * (1 + cos(pi * (e + 1) / E)) / 2 (1 -> r_T over the run)."""
    return target + (1 - target) * (1 + math.cos(math.pi * (epoch + 1) / max(1, epochs))) / 2


def rank_threshold(mean_saliency: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """The ceil(keep_rate * c)-th largest mean saliency (the authors' threshold rule)."""
    k = min(len(mean_saliency), max(1, math.ceil(keep_rate * len(mean_saliency))))
    return torch.topk(mean_saliency, k, sorted=True).values[-1]


def quantile_threshold(saliencies: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """The threshold that keeps a ``keep_rate`` fraction of the (instance, channel) saliencies given.

    The ``(1 - keep_rate)`` quantile of every entry: one scalar per layer, so
    instances with low saliencies still lose more channels than others. 0
    keeps nothing (the threshold sits above the largest saliency).
    """
    values = saliencies.detach().flatten().float().sort().values
    drop = int(round((1 - keep_rate) * len(values)))
    if drop >= len(values):
        return values[-1] * (1 + 1e-6) + 1e-12
    return values[drop]
