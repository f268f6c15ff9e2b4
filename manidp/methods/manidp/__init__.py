"""``manidp``: Manifold Regularized Dynamic Network Pruning (Tang et al., CVPR 2021).

The method card (paper, knobs, departures from the authors' code) is
``README.md`` beside this file. The registered methods are
:class:`~manidp.methods.manidp.method.ManiDP` and the variants in
:mod:`~manidp.methods.manidp.ablations` (entry points in pyproject.toml).
"""
from manidp.methods.manidp.ablations import ManiDPAuthors, ManiDPNoComplexity, ManiDPNoManifold, ManiDPPlain
from manidp.methods.manidp.gate import SaliencyGate
from manidp.methods.manidp.method import ManiDP
from manidp.methods.manidp.terms import (instance_weights, keep_rate_schedule, quantile_threshold, rank_threshold,
                                         similarity_loss, sparsity_loss)

__all__ = ["SaliencyGate", "ManiDP", "ManiDPAuthors", "ManiDPNoManifold", "ManiDPNoComplexity", "ManiDPPlain",
           "instance_weights", "sparsity_loss", "similarity_loss", "keep_rate_schedule", "rank_threshold",
           "quantile_threshold"]
