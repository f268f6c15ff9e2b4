"""ManiDP's registered variants: the ablations (one term removed each) and the authors' choices."""
from __future__ import annotations

from manidp.methods.manidp.method import ManiDP

__all__ = ["ManiDPNoManifold", "ManiDPNoComplexity", "ManiDPAuthors", "ManiDPPlain"]


class ManiDPNoManifold(ManiDP):
    """Ablation: no manifold alignment term (eta = 0)."""

    name = "manidp_no_manifold"
    paper_names = ()  # a variant of ours: only ``manidp`` sits on the paper's ManiDP rows
    default_options = {**ManiDP.default_options, "eta": 0.0}


class ManiDPNoComplexity(ManiDP):
    """Ablation: no complexity weighting (beta = 1 for every instance)."""

    name = "manidp_no_complexity"
    paper_names = ()  # a variant of ours: only ``manidp`` sits on the paper's ManiDP rows
    default_options = {**ManiDP.default_options, "no_complexity": True}


class ManiDPAuthors(ManiDP):
    """The authors' variant: mean-rank thresholds, gates at the backbone's lr, beta not detached.

    Everything else as :class:`ManiDP` (the schedule a dataset sets, gradient
    clipping, the budget calibration), so beside the ``manidp`` row it shows
    what the three departures of our default buy.
    """

    name = "manidp_authors"
    paper_names = ()  # a variant of ours: only ``manidp`` sits on the paper's ManiDP rows
    default_options = {**ManiDP.default_options, "threshold_rule": "mean_rank", "gate_lr_scale": 1.0,
                       "detach_beta": False}


class ManiDPPlain(ManiDP):
    """Ablation: plain dynamic gating with a uniform sparsity penalty (eta = 0, beta = 1)."""

    name = "manidp_plain"
    paper_names = ()  # a variant of ours: only ``manidp`` sits on the paper's ManiDP rows
    default_options = {**ManiDP.default_options, "eta": 0.0, "no_complexity": True}
