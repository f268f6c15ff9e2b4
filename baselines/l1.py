"""``l1``: L1-norm filter pruning (Li et al., "Pruning Filters for Efficient
ConvNets", ICLR 2017). Static.

Score of an output filter: the L1 norm of its whole weight tensor
(c_in x k x k); the lowest-scored filters go, with their BN entries and the
matching input channels of the next conv. Pruned once, from the starting
weights (the dense checkpoint of ``init_from``), then the smaller model is
fine-tuned by the shared engine. See ``baselines/README.md`` for the card.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from baselines._structured import StructuredPruning
from manidp.methods import RunContext


class L1Norm(StructuredPruning):
    name = "l1"

    @staticmethod
    def filter_scores(filters: torch.Tensor) -> torch.Tensor:
        return filters.abs().sum(1)

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Prune once, before fine-tuning: the engine then trains the physically smaller model."""
        self.plan(model, ctx)
        return self.remove(model, ctx, self.select(model))
