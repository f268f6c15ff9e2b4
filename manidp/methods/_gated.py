"""What the dynamic (gated) methods share: per-instance MACs from the kept
channels of the last forward, the deployed form, no weight decay on the
gates, and one budget calibration on the validation split.

A gated method (ManiDP, FBS, channel gating) has one scalar knob that moves
its validation MACs reduction monotonically (a keep rate, a density, a
threshold shift). :meth:`GatedMethod.calibrate_budget` searches that knob
until the validation reduction meets the budget; the test split is never
looked at. Two searches serve the knobs there are:

* :func:`bracket_search`, for a continuous knob: bisection, or regula falsi
  (Illinois) when ``secant`` is set, which usually lands within tolerance in
  3-5 validation passes where bisection needs about 8;
* :func:`grid_search`, for a knob that only matters at known points (FBS's
  density changes a gate's top-k only at j / C): bisection over the points,
  then the closer of the two that bracket the budget.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from manidp.gating import deploy_model, gated_layers, kept_channels
from manidp.macs import InstanceMacs
from manidp.methods._base import Method, RunContext, default_param_groups

__all__ = ["GatedMethod", "bracket_search", "grid_search"]

Reduction = Callable[[float], float]


def bracket_search(reduction_at: Reduction, budget: float, above: float, below: float, *, steps: int,
                   tolerance: float, secant: bool = False) -> tuple[float, float]:
    """The knob whose reduction is closest to ``budget``, with its reduction.

    ``above`` is a knob value whose reduction lies above the budget, ``below``
    one whose reduction lies below; neither is evaluated. Stops after
    ``steps`` evaluations or once within ``tolerance``; leaves the best
    knob's setting in place (re-evaluating it when it was not the last).
    """
    f_above: Optional[float] = None  # reduction - budget at ``above`` (> 0) once evaluated
    f_below: Optional[float] = None
    knob, last_side, best = (above + below) / 2, 0, None
    for _ in range(steps):
        error = reduction_at(knob) - budget
        if best is None or abs(error) < abs(best[1]):
            best = (knob, error)
        if abs(error) <= tolerance:
            break
        side = 1 if error > 0 else -1
        if side > 0:
            above, f_above = knob, error
            if secant and last_side > 0 and f_below is not None:
                f_below /= 2  # Illinois: the same end moved twice, damp the other
        else:
            below, f_below = knob, error
            if secant and last_side < 0 and f_above is not None:
                f_above /= 2
        last_side = side
        if not secant or f_above is None or f_below is None:
            knob = (above + below) / 2
        else:
            knob = (above * f_below - below * f_above) / (f_below - f_above)
    if best[0] != knob:
        reduction_at(best[0])
    return best[0], best[1] + budget


def grid_search(reduction_at: Reduction, budget: float, points: Sequence[float]) -> float:
    """The point of ``points`` (sorted, reduction falling along them) whose reduction is closest to ``budget``."""
    lo, hi = 0, len(points) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if reduction_at(points[mid]) > budget else (lo, mid)
    return min((points[lo], points[hi]), key=lambda p: abs(reduction_at(p) - budget))


class GatedMethod(Method):
    """Base of the dynamic methods whose gates choose channels per instance.

    Subclasses set :attr:`gates` in ``prepare`` (``manidp.gating`` sites
    unless they override :meth:`kept_counts`) and call
    :meth:`calibrate_budget` in ``finalize``.
    """

    dynamic = True
    needs_budget = True

    def __init__(self, options: Optional[dict] = None, budget: Optional[float] = None):
        super().__init__(options, budget)
        self.gates: list = []

    # -- evaluation -----------------------------------------------------------
    def kept_counts(self, model: nn.Module) -> tuple[dict, Optional[dict]]:
        """``(in_kept, out_kept)`` of the last forward, per conv name, as :class:`InstanceMacs` reads them.

        Read from ``model``'s own gates, not :attr:`gates`: the model evaluated may be a copy.
        """
        return kept_channels(gated_layers(model))

    def instance_macs(self, model: nn.Module, counter: InstanceMacs, batch_size: int) -> torch.Tensor:
        in_kept, out_kept = self.kept_counts(model)
        return counter(batch_size, in_kept, out_kept)

    def deploy(self, model: nn.Module) -> nn.Module:
        return deploy_model(model)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """No weight decay on the gates: decay would pull saliencies toward zero, i.e. prune by itself."""
        return default_param_groups(model, weight_decay, no_decay_modules=self.gates)

    # -- budget calibration -----------------------------------------------------
    @torch.no_grad()
    def validation_pass(self, model: nn.Module, counter: InstanceMacs, ctx: RunContext) -> tuple[float, float]:
        """Mean per-instance MACs reduction (gates counted) and top-1 (%) on the validation split, eval mode."""
        model.eval()
        total_macs, correct, count = 0.0, 0, 0
        for images, targets in ctx.val_loader:
            with ctx.autocast():
                logits = model(images.to(ctx.device))
            correct += int((logits.argmax(1).cpu() == targets.cpu()).sum())
            total_macs += float(self.instance_macs(model, counter, len(images)).sum())
            count += len(images)
        return 1 - total_macs / count / ctx.dense_macs, 100.0 * correct / count

    def calibrate_budget(self, model: nn.Module, ctx: RunContext, set_knob: Callable[[float], None], *,
                         above: float = 0.0, below: float = 1.0, steps: int = 12, tolerance: float = 0.0025,
                         secant: bool = False, points: Optional[Sequence[float]] = None,
                         counter: Optional[InstanceMacs] = None) -> tuple[float, dict[float, tuple[float, float]]]:
        """Search the knob ``set_knob`` sets until the validation MACs reduction meets the budget.

        Over ``points`` when given (:func:`grid_search`), else between
        ``above`` and ``below`` (:func:`bracket_search`). Every knob is
        measured once (:meth:`validation_pass`); the chosen one is left set
        and the model in the mode it was in. Returns the knob and every
        measurement, ``{knob: (reduction, top-1)}``.
        """
        was_training = model.training
        counter = counter or InstanceMacs(model, ctx.input_size, ctx.device)
        measured: dict[float, tuple[float, float]] = {}
        current = [None]  # the knob set now: setting one can cost validation passes (ManiDP's thresholds)

        def set_once(knob: float) -> None:
            if current[0] != knob:
                set_knob(knob)
                current[0] = knob

        def reduction_at(knob: float) -> float:
            set_once(knob)
            if knob not in measured:
                measured[knob] = self.validation_pass(model, counter, ctx)
            return measured[knob][0]

        if points is not None:
            knob = grid_search(reduction_at, self.budget, points)
        else:
            knob, _ = bracket_search(reduction_at, self.budget, above, below, steps=steps, tolerance=tolerance,
                                     secant=secant)
        set_once(knob)
        model.train(was_training)
        return knob, measured
