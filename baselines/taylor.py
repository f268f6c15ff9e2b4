"""``taylor``: first-order Taylor importance (Molchanov, Mallya, Tyree, Frosio,
Kautz, "Importance Estimation for Neural Network Pruning", CVPR 2019). Static.

Score of a channel: how much the loss would change without it, to first
order, ``(sum_s g_s w_s)^2`` over the channel's parameters, averaged over a
few training mini-batches. Computed by Torch-Pruning's ``TaylorImportance``
on each coupled group (every layer whose outputs or inputs are the channel),
through the one importance hook of :class:`~baselines._structured.StructuredPruning`;
the lowest-scored channels of each group go, once, before fine-tuning. See
``baselines/README.md`` for the card.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from baselines._structured import StructuredPruning, scoring_batches, tp_groups
from manidp.methods import RunContext


class Taylor(StructuredPruning):
    name = "taylor"
    paper_names = ("Taylor",)
    data_driven = True
    default_options = {**StructuredPruning.default_options, "layers": "auto",
                       "batches": 10,  # mini-batches whose importances are summed (ranks as their mean)
                       "multivariable": True}  # (sum g w)^2 per channel (the paper); false: sum |g w|

    def channel_scores(self, model: nn.Module, ctx: RunContext) -> dict[str, torch.Tensor]:
        importance = tp.importance.TaylorImportance(multivariable=bool(self.options["multivariable"]),
                                                    normalizer=None)
        groups = tp_groups(model, ctx.input_size, self.groups)
        totals = {g.key: torch.zeros(g.channels, dtype=torch.float64) for g in self.groups}
        was_training = model.training
        model.eval()  # gradients through the running BN statistics: scoring leaves the dense model untouched
        for images, targets in scoring_batches(ctx, self.options["batches"]):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), targets).backward()
            for key, group in groups.items():
                totals[key] += importance(group).double().square().cpu()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        return totals
