"""``manidp``: the method object: gates inserted, loss, threshold schedule, budget
calibration on validation (card: README.md, beside this module)."""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from manidp.errors import UserError
from manidp.gating import insert_gates
from manidp.macs import InstanceMacs
from manidp.methods._base import RunContext, default_param_groups
from manidp.methods._gated import GatedMethod
from manidp.methods.manidp.calibration import (GatedBlock, block_chain, first_held_block, saliencies_at,
                                               saliencies_by_block)
from manidp.methods.manidp.gate import SaliencyGate
from manidp.methods.manidp.terms import (instance_weights, keep_rate_schedule, quantile_threshold, rank_threshold,
                                         similarity_loss, sparsity_loss)

__all__ = ["ManiDP"]


class ManiDP(GatedMethod):
    name = "manidp"
    paper_names = ("ManiDP", "ManiDP-A", "ManiDP-B")
    budget_tolerance = 0.02
    default_options = {
        "lam": 0.1,
        "eta": 0.1,
        "tau": 0.5,
        "gamma": 1.0,
        "keep_rate": None,
        "detach_beta": True,
        "detach_features": False,
        "no_complexity": False,
        "threshold_rule": "quantile",
        "quantile_window": 4096,
        "threshold_from_epoch": 1,
        "anneal_epochs": None,
        "threshold_updates_per_epoch": 1,
        "gate_lr_scale": 10.0,
        "grad_clip": 5.0,
        "calibrate": True,
        "freeze_epochs": 0,
        "round_to": None,  # kept counts rounded to this multiple (8/16: oneDNN's SIMD block); manidp.gating
        "fc1_init": "torch",  # the authors': kaiming_normal
        "fc2_init": "near_identity",  # the authors': kaiming_normal
        "norm_decay": False,  # the authors': true (weight decay on the backbone's BN and biases too)
        "keep_rate_index": "update",  # the authors': epoch
    }
    threshold_rules = ("quantile", "mean_rank")
    keep_rate_indices = ("update", "epoch")
    #: Calibration stops when the validation reduction is this close to the budget.
    calibration_tolerance = 0.0025
    calibration_steps = 12
    #: At most this many bytes of held block inputs and outputs while thresholds are set block by block
    #: (:mod:`.calibration`); the gates of blocks over it are set by a validation pass up to each.
    calibration_cache_bytes = 2 << 30

    def __init__(self, options: Optional[dict] = None, budget: Optional[float] = None):
        super().__init__(options, budget)
        keep = self.options["keep_rate"]
        if keep is not None and not 0 < keep <= 1:
            raise UserError(f"method option keep_rate must be in (0, 1], got {keep!r}")
        updates = self.options["threshold_updates_per_epoch"]
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 1:
            raise UserError(f"method option threshold_updates_per_epoch must be an integer >= 1, got {updates!r}")
        if not self.options["gate_lr_scale"] > 0:
            raise UserError("method option gate_lr_scale must be > 0")
        if self.options["threshold_rule"] not in self.threshold_rules:
            raise UserError(f"method option threshold_rule is {self.options['threshold_rule']!r}; valid values: "
                            f"{', '.join(self.threshold_rules)}")
        for key, valid in (("fc1_init", SaliencyGate.fc1_inits), ("fc2_init", SaliencyGate.fc2_inits),
                           ("keep_rate_index", self.keep_rate_indices)):
            if self.options[key] not in valid:
                raise UserError(f"method option {key} is {self.options[key]!r}; valid values: {', '.join(valid)}")
        for key in ("quantile_window", "freeze_epochs", "threshold_from_epoch"):
            value = self.options[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "quantile_window" else 0):
                raise UserError(f"method option {key} must be an integer >= "
                                f"{1 if key == 'quantile_window' else 0}, got {value!r}")
        self.keep_rate_target: Optional[float] = keep
        self.complexity: Optional[float] = None
        self.calibration: dict = {}
        self.keep_rate = 1.0  # the keep rate the current thresholds were set for
        self._base_lr: Optional[float] = None
        self._loss_sums: Optional[torch.Tensor] = None
        self._saliency_sums: Optional[torch.Tensor] = None
        self._saliency_window: list[list[torch.Tensor]] = []
        self.frozen = False  # thresholds fixed by a mid-training calibration (freeze_epochs)

    # -- building -----------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self._base_lr = ctx.config["train"]["lr"]
        if self.options["freeze_epochs"] and self.options["freeze_epochs"] >= ctx.epochs:
            raise UserError(f"method option freeze_epochs ({self.options['freeze_epochs']}) must be smaller than "
                            f"train.epochs ({ctx.epochs}): the thresholds are annealed before they are frozen")
        gate = functools.partial(SaliencyGate, fc1_init=self.options["fc1_init"], fc2_init=self.options["fc2_init"])
        self.gates = insert_gates(model, gate, round_to=self.options["round_to"])
        if self.keep_rate_target is None:
            self.keep_rate_target = self._keep_rate_for_budget(model, ctx)
        return model

    def _keep_rate_for_budget(self, model: nn.Module, ctx: RunContext) -> float:
        """The uniform keep rate whose static MACs count (gates included) meets the budget."""
        counter = InstanceMacs(model, ctx.input_size, next(model.parameters()).device)

        def reduction(rate: float) -> float:
            in_kept, out_kept = {}, {}
            for site in self.gates:
                kept = torch.tensor([rate * site.out_channels])
                out_kept.update({n: kept for n in site.conv_names})
                in_kept.update({n: kept for n in site.consumer_names})
            return 1 - float(counter(1, in_kept, out_kept)[0]) / ctx.dense_macs

        if reduction(0.0) < self.budget:
            raise UserError(f"budget {self.budget} is out of reach for ManiDP on this backbone: pruning every "
                            f"gated channel saves {reduction(0.0):.3f} of the MACs")
        low, high = 0.0, 1.0
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if reduction(mid) > self.budget else (low, mid)
        return (low + high) / 2

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """Backbone and gates apart (the gates' lr scaled, no decay on them, as the authors' ``decay_branch``).

        ``norm_decay``: the authors decay every backbone parameter, BN scales and
        shifts and biases included; the shared recipe (every method, dense too)
        leaves those undecayed, which is the default here.
        """
        gate_params = {id(p) for site in self.gates for p in site.parameters()}
        groups = []
        if self.options["norm_decay"]:
            backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_params]
            gates = [p for p in model.parameters() if p.requires_grad and id(p) in gate_params]
            base = [{"params": backbone, "weight_decay": weight_decay}, {"params": gates, "weight_decay": 0.0}]
        else:
            base = default_param_groups(model, weight_decay, no_decay_modules=self.gates)
        for group in base:
            backbone = [p for p in group["params"] if id(p) not in gate_params]
            gates = [p for p in group["params"] if id(p) in gate_params]
            groups.append({**group, "params": backbone})
            if gates:
                groups.append({**group, "params": gates, "lr": self._base_lr * self.options["gate_lr_scale"]})
        return groups

    # -- training -----------------------------------------------------------
    def _instance_loss(self, logits: torch.Tensor, targets: torch.Tensor, ctx: RunContext) -> torch.Tensor:
        """Per-instance CE without label smoothing: what beta and the complexity threshold measure.

        Smoothing puts a floor under every instance's loss (about 0.5 nats at
        0.1 over 1000 classes), which would mark easy instances as hard.
        """
        return F.cross_entropy(logits.float(), targets, reduction="none")

    def _reset_loss_sums(self, device) -> None:
        """Per-epoch accumulators of the training CE: [sum, count]."""
        self._loss_sums = torch.zeros(2, dtype=torch.float64, device=device)

    def _reset_saliency_sums(self, device) -> None:
        """Per-threshold-period accumulators: [count, saliency sums of every layer...] (one all-reduce),
        and for the quantile rule the latest ``quantile_window`` instances' saliencies per layer."""
        self._saliency_sums = torch.zeros(1 + sum(s.out_channels for s in self.gates), dtype=torch.float64,
                                          device=device)
        self._saliency_window = [[] for _ in self.gates]

    def _accumulate(self, losses: torch.Tensor) -> None:
        self._loss_sums[0] += losses.detach().sum().double()
        self._loss_sums[1] += len(losses)
        self._saliency_sums[0] += len(losses)
        self._saliency_sums[1:] += torch.cat([site.gate.saliency.detach().sum(0) for site in self.gates]).double()
        if self.options["threshold_rule"] == "quantile":
            window = self.options["quantile_window"]
            for kept, site in zip(self._saliency_window, self.gates):
                kept.append(site.gate.saliency.detach().float())
                while sum(len(t) for t in kept) - len(kept[0]) >= window:
                    kept.pop(0)  # keep the most recent instances only

    def _mean_loss(self, ctx: RunContext) -> float:
        """Mean training CE over every process's instances since the last reset (the true count)."""
        total, count = ctx.all_reduce_sum(self._loss_sums.clone()).tolist()
        if count == 0:
            raise UserError("no training instance was seen this epoch")
        return total / count

    def _mean_saliencies(self, ctx: RunContext) -> list[torch.Tensor]:
        """Per-layer mean saliencies over every process's instances since the last reset (the true count)."""
        sums = ctx.all_reduce_sum(self._saliency_sums.clone())
        return list((sums[1:] / sums[0]).float().split([s.out_channels for s in self.gates]))

    @torch.no_grad()
    def on_train_start(self, model: nn.Module, ctx: RunContext) -> None:
        """One eval-mode pass over the training split gives the first complexity threshold."""
        was_training = model.training
        model.eval()
        self._reset_loss_sums(ctx.device)
        self._reset_saliency_sums(ctx.device)
        for images, targets in ctx.train_loader:
            images, targets = images.to(ctx.device), targets.to(ctx.device)
            with ctx.autocast():
                logits = model(images)
            self._accumulate(self._instance_loss(logits, targets, ctx))
        self.complexity = self.options["tau"] * self._mean_loss(ctx)
        self._reset_loss_sums(ctx.device)
        self._reset_saliency_sums(ctx.device)
        model.train(was_training)

    def training_loss(self, model: nn.Module, images, targets, ctx: RunContext):
        logits = model(images)
        losses = self._instance_loss(logits, targets, ctx)
        if self._loss_sums is None:  # a resumed run: on_train_start is not called again
            self._reset_loss_sums(ctx.device)
            self._reset_saliency_sums(ctx.device)
        self._accumulate(losses)
        opts = self.options
        saliencies = [site.gate.saliency for site in self.gates]
        smoothing = ctx.config["train"]["label_smoothing"]
        loss = (F.cross_entropy(logits.float(), targets, label_smoothing=smoothing) if smoothing else losses.mean())
        logs = {}
        if opts["lam"]:
            if opts["no_complexity"]:
                beta = torch.ones_like(losses)
            else:
                beta = instance_weights(losses, self.complexity, opts["gamma"])
                if opts["detach_beta"]:
                    beta = beta.detach()
            sparse = sparsity_loss(saliencies, beta)
            loss = loss + opts["lam"] * sparse
            logs["loss_sparse"] = sparse.detach()
            logs["easy_fraction"] = (beta > 0).float().mean()
        if opts["eta"]:
            sim = sum(similarity_loss(pi, site.features.detach() if opts["detach_features"] else site.features)
                      for pi, site in zip(saliencies, self.gates))
            loss = loss + opts["eta"] * sim
            logs["loss_sim"] = sim.detach()
        with torch.no_grad():
            logs["kept_fraction"] = sum((s.mask != 0).sum() for s in self.gates).float() / (
                len(losses) * sum(s.out_channels for s in self.gates))
        return loss, logits, logs

    def after_backward(self, model: nn.Module, ctx: RunContext) -> None:
        if self.options["grad_clip"]:
            nn.utils.clip_grad_norm_(model.parameters(), self.options["grad_clip"])

    def _update_points(self, ctx: RunContext) -> list[int]:
        """Steps of an epoch after which thresholds are updated (the last is the epoch's end)."""
        per_epoch = self.options["threshold_updates_per_epoch"]
        return sorted({max(0, round((j + 1) * ctx.steps_per_epoch / per_epoch) - 1) for j in range(per_epoch)})

    def after_step(self, model: nn.Module, ctx: RunContext) -> None:
        points = self._update_points(ctx)
        if ctx.step not in points:
            return
        means = self._mean_saliencies(ctx)
        windows = [torch.cat(kept) for kept in self._saliency_window] if self._saliency_window[0] else None
        self._reset_saliency_sums(ctx.device)
        if ctx.epoch < self.options["threshold_from_epoch"] or self.frozen:
            return
        per_epoch = len(points)
        update = (ctx.epoch - self.options["threshold_from_epoch"]) * per_epoch + points.index(ctx.step)
        anneal = (self.options["anneal_epochs"] or ctx.epochs) - self.options["threshold_from_epoch"]
        anneal = max(1, anneal * per_epoch)
        if self.options["keep_rate_index"] == "epoch":  # the authors': r_e of the epoch that just ran
            self.keep_rate = keep_rate_schedule(ctx.epoch, ctx.epochs, self.keep_rate_target)
        else:  # ours: the cosine over the updates that set thresholds, r_T reached by the last one
            self.keep_rate = keep_rate_schedule(min(update, anneal - 1), anneal, self.keep_rate_target)
        for index, (site, mean) in enumerate(zip(self.gates, means)):
            if windows is None:  # the authors' rule: rank the layer's dataset-mean saliencies
                threshold = rank_threshold(mean, self.keep_rate)
            else:  # the (1 - r) quantile of the recent per-instance saliencies, averaged over processes
                threshold = ctx.all_reduce_sum(quantile_threshold(windows[index], self.keep_rate).view(1))
                threshold = threshold / ctx.world_size
            site.gate.threshold.fill_(float(threshold))

    def on_epoch_end(self, model: nn.Module, ctx: RunContext) -> dict:
        self.complexity = self.options["tau"] * self._mean_loss(ctx)
        self._reset_loss_sums(ctx.device)
        row = {"complexity_threshold": self.complexity, "keep_rate": self.keep_rate}
        freeze = self.options["freeze_epochs"]
        if freeze and not self.frozen and ctx.epoch == ctx.epochs - freeze - 1 and ctx.val_loader is not None:
            # anneal, calibrate to the budget on validation, then fine-tune with the thresholds fixed
            was_training = model.training
            self._calibrate(model, ctx, record=False)
            model.train(was_training)
            self.frozen = True
            row["frozen_keep_rate"] = self.calibration.get("keep_rate")
        return row

    # -- budget calibration ---------------------------------------------------
    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        if self.options["calibrate"] and ctx.val_loader is not None:
            self._calibrate(model, ctx)
        return model

    def _layer_saliencies(self, model: nn.Module, ctx: RunContext, index: int) -> torch.Tensor:
        """Every validation instance's saliencies ``[N, C]`` at gate ``index``, with the current upstream
        thresholds in place: a pass from the images that stops at that gate."""
        model.eval()
        return saliencies_at(model, self.gates[index].gate, (images.to(ctx.device) for images, _ in ctx.val_loader),
                             ctx.autocast)

    def _set_keep_rate(self, model: nn.Module, ctx: RunContext, rate: float,
                       held: Optional[tuple[list[GatedBlock], int]] = None) -> None:
        """Thresholds for keep rate ``rate``, set in forward order: each layer's threshold is the
        ``(1 - rate)`` quantile of its validation saliencies *given the thresholds already set upstream*
        (a gate's saliencies depend on every mask before it, so statistics taken once go stale).

        With ``held`` (:meth:`_held_blocks`: the gated blocks and the first whose inputs are held) the
        saliencies of that block's gates and every later one's come from each block run alone on its held
        inputs (:mod:`.calibration`), the same bit for bit; the others' from a validation pass up to each
        gate."""
        for site in self.gates:
            site.gate.threshold.fill_(-math.inf)

        def set_threshold(index: int, saliencies: torch.Tensor) -> None:
            self.gates[index].gate.threshold.fill_(float(quantile_threshold(saliencies, rate)))

        model.eval()
        blocks, start = held or ([], 0)
        for index in range(blocks[start].gates[0] if blocks else len(self.gates)):
            set_threshold(index, self._layer_saliencies(model, ctx, index))
        if blocks:
            saliencies_by_block(model, self.gates, blocks, (images.to(ctx.device) for images, _ in ctx.val_loader),
                                ctx.autocast, set_threshold, start)

    def _held_blocks(self, model: nn.Module, ctx: RunContext) -> Optional[tuple[list[GatedBlock], int]]:
        """The gated blocks and the first of them whose validation inputs calibration holds (the blocks
        from there on chain, :func:`block_chain`, and fit in ``calibration_cache_bytes``); None to set
        every gate by passes from the images. Logs what takes the long way, and why."""
        model.eval()
        images = next(iter(ctx.val_loader))[0].to(ctx.device)
        blocks = block_chain(model, self.gates, images, ctx.autocast)
        if isinstance(blocks, str):
            ctx.log(f"manidp: calibration passes over the validation split up to each gate ({blocks})")
            return None
        loader = ctx.val_loader
        instances = len(loader.dataset) if hasattr(loader, "dataset") else sum(len(b[0]) for b in loader)
        start = first_held_block(blocks, instances, self.calibration_cache_bytes)
        if start is None:
            ctx.log(f"manidp: calibration passes over the validation split up to each gate (every gated "
                    f"block's inputs for {instances} instances are over {self.calibration_cache_bytes} bytes)")
            return None
        if start:
            ctx.log(f"manidp: calibration passes over the validation split up to each of the first "
                    f"{blocks[start].gates[0]} gates (their blocks' inputs for {instances} instances are over "
                    f"{self.calibration_cache_bytes} bytes); the rest block by block")
        return blocks, start

    def _calibrate(self, model: nn.Module, ctx: RunContext, record: bool = True) -> None:
        """Search one keep rate q (the fraction of channel-instances every gated layer keeps on the
        validation split) until the validation MACs reduction meets the budget; record top-1 before/after."""
        counter = InstanceMacs(model, ctx.input_size, ctx.device)
        before_reduction, before_top1 = self.validation_pass(model, counter, ctx)
        # q = 0 prunes everything (reduction above the budget), q = 1 keeps all the ReLU left (below)
        set_rate = functools.partial(self._set_keep_rate, model, ctx, held=self._held_blocks(model, ctx))
        rate, measured = self.calibrate_budget(
            model, ctx, set_rate, above=0.0, below=1.0,
            steps=self.calibration_steps, tolerance=self.calibration_tolerance, secant=True, counter=counter)
        achieved, after_top1 = measured[rate]
        self.calibration = {
            "keep_rate": rate, "val_macs_reduction": achieved, "val_top1_before": before_top1,
            "val_top1_after": after_top1, "val_macs_reduction_before": before_reduction,
            "thresholds": [float(site.gate.threshold) for site in self.gates],
        }
        if record:
            self._final = {"val_top1_before_calibration": before_top1, "val_top1_after_calibration": after_top1,
                           "calibrated_keep_rate": rate}
        ctx.log(f"manidp: calibrated keep rate {rate:.4f} -> validation MACs reduction {achieved:.4f} "
                f"(budget {self.budget}); validation top-1 {before_top1:.2f} % before, {after_top1:.2f} % after "
                f"(trained thresholds: reduction {before_reduction:.4f})")
        if before_top1 - after_top1 > 5:
            ctx.log(f"manidp: WARNING calibration cost {before_top1 - after_top1:.1f} points of validation "
                    "top-1: the trained thresholds were far from the budget")

    def final_metrics(self) -> dict:
        return dict(getattr(self, "_final", {}))

    # -- state ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"keep_rate_target": self.keep_rate_target, "keep_rate": self.keep_rate,
                "complexity": self.complexity, "calibration": self.calibration, "frozen": self.frozen}

    def load_state_dict(self, state: dict) -> None:
        self.keep_rate_target = state.get("keep_rate_target", self.keep_rate_target)
        self.complexity = state.get("complexity")
        self.keep_rate = state.get("keep_rate", 1.0)
        self.calibration = state.get("calibration", {})
        self.frozen = state.get("frozen", False)

    def variant(self) -> str:
        """Which ManiDP ran, in words, for method_info and the table notes: the three choices on which the
        digits-c row departs from the authors' code, and who made them."""
        opts = self.options
        thresholds = "quantile thresholds" if opts["threshold_rule"] == "quantile" else "mean-rank thresholds"
        beta = "detached beta" if opts["detach_beta"] else "undetached beta"
        parts = f"{thresholds}, gate lr x{opts['gate_lr_scale']:g}, {beta}"
        authors = (opts["threshold_rule"] == "mean_rank" and opts["gate_lr_scale"] == 1.0
                   and not opts["detach_beta"])
        ours = (opts["threshold_rule"] == "quantile" and opts["gate_lr_scale"] == 10.0 and opts["detach_beta"])
        if authors:
            return f"{parts} (as the authors' code)"
        if ours:
            return f"{parts} (ours, chosen on validation; the authors': mean-rank, x1, undetached)"
        return f"{parts} (departs from the authors' mean-rank, x1, undetached)"

    def describe(self) -> dict:
        return {**super().describe(), "variant": self.variant(), "keep_rate_target": self.keep_rate_target,
                "complexity_threshold": self.complexity, "calibration": self.calibration,
                "gated_layers": len(self.gates)}
