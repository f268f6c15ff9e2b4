"""``fpgm`` and ``sfp``: soft filter pruning with the geometric-median and the
L2-norm criteria (He et al., "Filter Pruning via Geometric Median for Deep
Convolutional Neural Networks Acceleration", CVPR 2019; He et al., "Soft Filter
Pruning for Accelerating Deep Convolutional Neural Networks", IJCAI 2018).
Static.

Soft schedule: before the first epoch and at the end of every epoch, the
selected filters (per group, the planned number of lowest scores) are zeroed
and training goes on; they may recover and leave the selection. After
training, the last selection is removed physically.

* FPGM score: the sum of Euclidean distances from a filter to every other
  filter of its layer (raw weights, flattened). The smallest sums sit nearest
  the geometric median, so they are the most replaceable and go first.
* SFP score: the L2 norm of the filter.

``zero_grad`` picks the variant, recorded in each run's ``method_info``:
false = the papers (zero only); true (default) = the FPGM authors' code, which
also zeroes the selected filters' gradients after every backward, so the
selection sticks (we also re-zero them after each optimizer step, or the
momentum gathered before the selection would move them). Why the default is
the authors' code: it produced the published numbers, and with the paper's
variant the BN after a zeroed filter normalises it back to full strength
within a step (batch variance ~0, gradient x 1/sqrt(eps)), so the selection
churns every epoch and the final removal drops channels the network still
used; on a few-epoch fine-tune that collapses accuracy (digits-c ResNet-20,
3 epochs at lr 0.05, 40 %: 17.2 % top-1 against 88.1 % with the authors'
variant).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from baselines._structured import StructuredPruning, zero_filter_grads, zero_filters
from manidp.methods import RunContext, register_method

_VARIANTS = {False: "paper: zero the selected filters only",
             True: "authors' code: zero the selected filters and their gradients"}


class SoftFilterPruning(StructuredPruning):
    """Zero the lowest-scored filters every epoch, remove the last selection at the end."""

    default_options = {**StructuredPruning.default_options, "zero_grad": True}

    def __init__(self, options=None, budget=None):
        super().__init__(options, budget)
        self.selection: dict[str, list[int]] | None = None

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.plan(model, ctx)
        return model

    def _zero(self, model: nn.Module) -> dict:
        self.selection = self.select(model)
        zero_filters(model, self.groups, self.selection)
        return {"zeroed_filters": sum(len(v) for v in self.selection.values())}

    def on_train_start(self, model: nn.Module, ctx: RunContext) -> None:
        self._zero(model)

    def after_backward(self, model: nn.Module, ctx: RunContext) -> None:
        if self.options["zero_grad"] and self.selection:
            zero_filter_grads(model, self.groups, self.selection)

    def after_step(self, model: nn.Module, ctx: RunContext) -> None:
        """With zero gradients, momentum from before the selection would still move the filters;
        the BN after them would blow any such drift up to a full-scale channel, so re-zero them."""
        if self.options["zero_grad"] and self.selection:
            zero_filters(model, self.groups, self.selection)

    def on_epoch_end(self, model: nn.Module, ctx: RunContext) -> dict:
        return self._zero(model)

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Remove the selection zeroed last: re-scoring zeroed filters would favour other ones (FPGM)."""
        return self.remove(model, ctx, self.selection if self.selection is not None else self.select(model))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "selection": self.selection}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.selection = state.get("selection")

    def describe(self) -> dict:
        return {**super().describe(), "variant": _VARIANTS[bool(self.options["zero_grad"])]}


@register_method
class FPGM(SoftFilterPruning):
    name = "fpgm"

    @staticmethod
    def filter_scores(filters: torch.Tensor) -> torch.Tensor:
        return torch.cdist(filters[None], filters[None], compute_mode="donot_use_mm_for_euclid_dist")[0].sum(1)


@register_method
class SFP(SoftFilterPruning):
    name = "sfp"

    @staticmethod
    def filter_scores(filters: torch.Tensor) -> torch.Tensor:
        return filters.norm(dim=1)
