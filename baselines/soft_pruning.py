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

**Zeroing silences the channel** (``silence_bn``, default true; our
departure from both authors' codes, which zero the conv filter only): the BN
shift and running mean of the selected channels are zeroed with the filter,
so a zeroed channel outputs exactly 0 instead of ``ReLU(shift)``, and the
physically pruned model computes what the masked model did (tested; without
it, removal changed validation top-1 by 0.7-1.6 points on digits-c). The BN
scale stays. The price, stated plainly: a silenced channel that a ReLU
follows gets no gradient (ReLU'(0) = 0), so with ``silence_bn`` such a filter
returns only if its score rises above others' (for SFP's L2 norm, never):
on the first-conv groups of option-A CIFAR ResNets soft pruning then selects
once. ``silence_bn: false`` is the authors' forward exactly (their zeroed
filters get a gradient through ``ReLU(shift)``), at the cost of a function
change at removal that ``val_top1_masked`` / ``val_top1_pruned`` record.

``soft_fraction`` (default 1.0: soft steps through the whole run, both
authors' codes): the fraction of the epochs (rounded to whole epochs) that
soft steps run in. After them the last selection is silenced (filter, BN
shift and running mean zeroed, whatever ``silence_bn`` says) and held
(gradients zeroed, re-zeroed after every step) for the remaining epochs, so
those epochs fine-tune exactly the network the removal keeps. 0 selects once
before training and holds it (prune-once, silenced). It is the recipe
sweep's knob for ``fpgm`` and ``sfp`` together with the authors' forward
(``silence_bn: false``): under ``silence_bn`` a silenced channel gets no
gradient, the selection never changes, and neither ``zero_grad`` nor how
often soft steps run changes a result (identical numbers, tested and swept);
with the authors' forward, zeroed filters regrow and the fraction sets how
long they may.

``zero_grad`` picks the variant, recorded in each run's ``method_info``:

* ``sfp`` default false = the SFP authors' code (he-y/soft-filter-pruning
  never masks gradients: zeroed filters keep updating and may be re-selected
  or recover);
* ``fpgm`` default true = the FPGM authors' code, which also zeroes the
  selected filters' gradients after every backward (we also re-zero them after
  each optimizer step, or the momentum gathered before the selection would
  move them), so the selection sticks: after the first epoch FPGM is in effect
  prune-once. ``zero_grad: false`` is the FPGM paper's variant, one option away.

The validation top-1 of the masked model (before removal) and of the pruned
model are recorded (``val_top1_masked``, ``val_top1_pruned``); they are equal.

``layers`` defaults to ``auto``: every conv where Torch-Pruning's dependency
graph allows it (the papers prune every conv; resnet18/34/50), the first conv
of each block on option-A CIFAR ResNets, whose parameter-free zero-pad
shortcuts cannot be followed.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from baselines._structured import StructuredPruning, zero_filter_grads, zero_filters
from manidp.errors import UserError
from manidp.methods import RunContext



class SoftFilterPruning(StructuredPruning):
    """Zero the lowest-scored filters every epoch, remove the last selection at the end."""

    default_options = {**StructuredPruning.default_options, "layers": "auto", "zero_grad": True, "silence_bn": True,
                       "soft_fraction": 1.0}
    #: What each zero_grad setting is, for this method (recorded in method_info).
    variants: dict = {}

    def __init__(self, options=None, budget=None):
        super().__init__(options, budget)
        fraction = self.options["soft_fraction"]
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise UserError(f"method option soft_fraction must be a fraction of the epochs in [0, 1], got {fraction!r}")
        self.selection: dict[str, list[int]] | None = None
        self.held = False  # the soft phase is over: the selection is silenced and held until removal

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.plan(model, ctx)
        return model

    def _zero(self, model: nn.Module, ctx: RunContext) -> dict:
        self.selection = self.select(model, ctx)
        zero_filters(model, self.groups, self.selection, self.options["silence_bn"])
        return {"zeroed_filters": sum(len(v) for v in self.selection.values())}

    def _soft_epochs(self, ctx: RunContext) -> int:
        return round(self.options["soft_fraction"] * ctx.epochs)

    def _hold(self, model: nn.Module) -> dict:
        """End the soft phase: silence the last selection; from now on it is held until removal."""
        self.held = True
        zero_filters(model, self.groups, self.selection, True)
        return {"held_filters": sum(len(v) for v in self.selection.values())}

    def on_train_start(self, model: nn.Module, ctx: RunContext) -> None:
        self._zero(model, ctx)
        if self._soft_epochs(ctx) == 0:
            self._hold(model)

    def after_backward(self, model: nn.Module, ctx: RunContext) -> None:
        if (self.options["zero_grad"] or self.held) and self.selection:
            zero_filter_grads(model, self.groups, self.selection)

    def after_step(self, model: nn.Module, ctx: RunContext) -> None:
        """With zero gradients, momentum from before the selection would still move the filters;
        the BN after them would blow any such drift up to a full-scale channel, so re-zero them."""
        if (self.options["zero_grad"] or self.held) and self.selection:
            zero_filters(model, self.groups, self.selection, self.options["silence_bn"] or self.held)

    def on_epoch_end(self, model: nn.Module, ctx: RunContext) -> dict:
        if self.held:
            return {}
        row = self._zero(model, ctx)
        if ctx.epoch + 1 == self._soft_epochs(ctx) < ctx.epochs:
            row.update(self._hold(model))
        return row

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Remove the selection zeroed last: re-scoring zeroed filters would favour other ones (FPGM)."""
        if self.selection is None:
            self._zero(model, ctx)
        masked = self.validation_top1(model, ctx) if ctx.val_loader is not None else None
        model = self.remove(model, ctx, self.selection)
        if masked is not None:
            self._final = {"val_top1_masked": masked, "val_top1_pruned": self.validation_top1(model, ctx)}
            ctx.log(f"{self.name}: validation top-1 {masked:.2f} % masked, {self._final['val_top1_pruned']:.2f} % "
                    "after physical removal")
        return model

    def final_metrics(self) -> dict:
        return dict(getattr(self, "_final", {}))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "selection": self.selection, "held": self.held}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.selection = state.get("selection")
        self.held = state.get("held", False)

    def describe(self) -> dict:
        return {**super().describe(), "variant": self.variants[bool(self.options["zero_grad"])]}


class FPGM(SoftFilterPruning):
    name = "fpgm"
    paper_names = ("FPGM",)
    variants = {True: "FPGM authors' code: zero the selected filters and their gradients",
                False: "FPGM paper: zero the selected filters, gradients kept"}

    @staticmethod
    def filter_scores(filters: torch.Tensor) -> torch.Tensor:
        return torch.cdist(filters[None], filters[None], compute_mode="donot_use_mm_for_euclid_dist")[0].sum(1)


class SFP(SoftFilterPruning):
    name = "sfp"
    paper_names = ("SFP",)
    default_options = {**SoftFilterPruning.default_options, "zero_grad": False}
    variants = {False: "SFP authors' code: zero the selected filters, gradients not masked",
                True: "departure: zero the selected filters and their gradients (as FPGM's code)"}

    @staticmethod
    def filter_scores(filters: torch.Tensor) -> torch.Tensor:
        return filters.norm(dim=1)
