"""The contract every pruning method honours, and the method registry.

A method is a small object the one training engine calls at fixed points
(composer-style): it may change the model before training (wrap blocks with
gates), add terms to the loss, act after backward or at the end of an epoch
(soft pruning, threshold updates), finalize the model after training (physical
channel removal, budget calibration on the validation split) and report how
many MACs each instance really used. It never owns the training loop.

Lifecycle, as the engine calls it::

    method = METHODS.get(name)(options, budget)
    model = method.prepare(model, ctx)            # build the method's model
    method.on_train_start(model, ctx)
    for each epoch:
        for each step:
            loss, logits, logs = method.training_loss(model, images, targets, ctx)
            loss.backward(); method.after_backward(model, ctx); optimizer.step()
        method.on_epoch_end(model, ctx)
    model = method.finalize(model, ctx)           # e.g. calibrate, prune physically
    evaluation: logits = model(x); macs = method.instance_macs(model, counter, batch)

Reloading a saved model in a fresh process: ``model = method.restore(backbone,
state)`` followed by ``load_state_dict`` (static methods rebuild their smaller
architecture from ``state``, dynamic ones re-insert their gates).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from manidp._registry import Registry
from manidp.errors import UserError
from manidp.macs import InstanceMacs

__all__ = ["Method", "RunContext", "METHODS", "register_method", "default_param_groups"]


@dataclass
class RunContext:
    """What the engine shares with a method. ``model`` is the unwrapped module
    (never the DDP wrapper); ``forward_model`` is what to call for training."""

    config: dict
    device: torch.device
    input_size: tuple[int, int, int]
    num_classes: int
    dense_macs: int
    epochs: int
    steps_per_epoch: int
    train_loader: Any = None
    train_eval_loader: Any = None  # training data, eval transform, unshuffled
    val_loader: Any = None
    autocast: Callable = None
    world_size: int = 1
    rank: int = 0
    epoch: int = 0
    step: int = 0
    log: Callable[[str], None] = print
    extras: dict = field(default_factory=dict)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over processes (identity without DDP), in place."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def default_param_groups(model: nn.Module, weight_decay: float, no_decay_modules=()) -> list[dict]:
    """Weight decay on conv/Linear weights; none on biases, norms, and ``no_decay_modules``."""
    skip = {id(p) for m in no_decay_modules for p in m.parameters()}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or id(param) in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Method:
    """Base class: dense training. Subclasses override what they change."""

    name: ClassVar[str] = ""
    dynamic: ClassVar[bool] = False
    #: How close (absolute, in MACs-reduction points) a run must land to its budget.
    budget_tolerance: ClassVar[Optional[float]] = None
    #: Whether the method needs a budget (a requested MACs reduction).
    needs_budget: ClassVar[bool] = False
    #: What tables call the method when its registered name alone would overclaim (e.g. a partial
    #: reproduction); recorded in method_info and shown in the table notes.
    title: ClassVar[Optional[str]] = None
    #: The names the paper's tables (1 and 4) give this method, so that its rows sit beside ours in the
    #: tables; empty for a method the paper does not report.
    paper_names: ClassVar[tuple[str, ...]] = ()
    #: Option names and defaults; unknown options are refused.
    default_options: ClassVar[dict] = {}
    #: DDP must look for parameters without gradients (gates skipped at some steps).
    ddp_find_unused_parameters: ClassVar[bool] = False

    def __init__(self, options: Optional[dict] = None, budget: Optional[float] = None):
        options = dict(options or {})
        unknown = set(options) - set(self.default_options)
        if unknown:
            valid = ", ".join(sorted(self.default_options)) or "(none)"
            raise UserError(
                f"method '{self.name}' has no option(s) {', '.join(sorted(unknown))}; valid options: {valid}"
            )
        if self.needs_budget and budget is None:
            raise UserError(f"method '{self.name}' needs a budget: set 'budget' (a MACs reduction such as 0.55)")
        self.options = {**copy.deepcopy(self.default_options), **options}
        self.budget = budget

    # -- building -----------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return model

    def restore(self, model: nn.Module, state: dict, ctx: RunContext) -> nn.Module:
        """Rebuild the trained architecture from a saved state (default: prepare again)."""
        model = self.prepare(model, ctx)
        self.load_state_dict(state)
        return model

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        return default_param_groups(model, weight_decay)

    # -- training hooks -----------------------------------------------------
    def on_train_start(self, model: nn.Module, ctx: RunContext) -> None:
        pass

    def training_loss(self, model: nn.Module, images, targets, ctx: RunContext):
        """Return (loss, logits, logs). ``model`` may be DDP-wrapped; use ctx.model for attributes."""
        logits = model(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=ctx.config["train"]["label_smoothing"])
        return loss, logits, {}

    def after_backward(self, model: nn.Module, ctx: RunContext) -> None:
        pass

    def after_step(self, model: nn.Module, ctx: RunContext) -> None:
        pass

    def on_epoch_end(self, model: nn.Module, ctx: RunContext) -> dict:
        """May return metrics to record in the epoch history."""
        return {}

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return model

    # -- evaluation ---------------------------------------------------------
    def instance_macs(self, model: nn.Module, counter: InstanceMacs, batch_size: int) -> torch.Tensor:
        """MACs each instance of the last forward really used (static: the traced count)."""
        return torch.full((batch_size,), float(counter.dense), dtype=torch.float64)

    @torch.no_grad()
    def validation_top1(self, model: nn.Module, ctx: RunContext) -> float:
        """Top-1 (%) on the validation split, in eval mode (restores the previous mode)."""
        was_training = model.training
        model.eval()
        correct, seen = 0, 0
        for images, targets in ctx.val_loader:
            with ctx.autocast():
                logits = model(images.to(ctx.device))
            correct += int((logits.argmax(1).cpu() == targets.cpu()).sum())
            seen += len(images)
        model.train(was_training)
        return 100.0 * correct / seen

    def deploy(self, model: nn.Module) -> nn.Module:
        """The form that is timed for latency (static: the model as it is)."""
        return model

    def final_metrics(self) -> dict:
        """Numbers measured in ``finalize`` (e.g. validation top-1 before and after a calibration).

        The engine merges them into metrics.json's top level and logs them to
        MLflow, so a user sees a red flag (a large drop) without opening files.
        """
        return {}

    # -- state --------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> dict:
        """Resolved options and fixed facts, recorded in each run's metrics."""
        info = {"name": self.name, "dynamic": self.dynamic, "options": self.options, "budget": self.budget}
        return {**info, "title": self.title} if self.title else info


METHODS: Registry[type[Method]] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a :class:`Method` subclass under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    return METHODS.register(cls.name)(cls)
