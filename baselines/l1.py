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

from baselines._structured import StructuredPruning


class L1Norm(StructuredPruning):
    name = "l1"

    @staticmethod
    def filter_scores(filters: torch.Tensor) -> torch.Tensor:
        return filters.abs().sum(1)
