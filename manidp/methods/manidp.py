"""``manidp``: Manifold Regularized Dynamic Network Pruning (method card).

Paper: Tang, Wang, Xu, Deng, Xu, Tao, Xu, "Manifold Regularized Dynamic Network
Pruning", CVPR 2021 (arXiv 2103.05861); read together with the authors' PyTorch
code (huawei-noah/Efficient-Computing, Pruning/ManiDP). Pinned down in
``shared/reference/manidp.md``; this card records what we chose where the
paper and code are silent.

**Dynamic**: every instance gets its own channel subset. Per gated conv, a
saliency gate ``pi = clamp(ReLU(W2 ReLU(W1 GAP(x)) + b2), max=1000)`` (``W1``:
``c_in -> c_out/s`` without bias, ``s = 1`` if ``c_out < 80`` else 2, ``b2``
initialised to 1) and one threshold ``xi`` per layer (a buffer, starting at
-1e4) give the mask ``m = pi * 1[pi >= xi]``: kept channels are scaled by
``pi``, the others are exactly zero (the indicator has no gradient). Gates sit
where :mod:`manidp.gating` puts them (two per BasicBlock / Bottleneck, one per
MobileNetV2 inverted residual); the deployed batch-1 form skips pruned channels.

**Loss** per mini-batch of B instances, gated layers l = 1..L:
``mean_i CE_i + lam * sum_l mean_i(beta_i * mean_k pi_ik) + eta * sum_l ||R_l - T_l||_F^2 / B^2``,
with ``beta_i = 1[CE_i < C] * ((C - CE_i) / C) ** gamma``, ``C = tau *`` the mean
per-instance training CE of the previous epoch (one eval-mode pass over the
training split gives it before the first epoch), ``T_l`` / ``R_l`` the cosine
similarity matrices of the saliencies / of the pooled unmasked features.

**Thresholds** (``threshold_rule``): one scalar ``xi_l`` per layer, set at
every update from the saliencies seen since the previous one, with the keep
rate ``r`` annealed from 1 to the target ``r_T`` as
``r_u = r_T + (1 - r_T) * (1 + cos(pi * (u + 1) / U)) / 2`` over the updates
u = 0..U-1 (the authors' per-epoch cosine, one update per period).

* ``quantile`` (default, ours): ``xi_l`` is the ``(1 - r)`` quantile of the
  per-instance saliencies of the latest ``quantile_window`` (4096) training
  instances, so a fraction ``r`` of the (instance, channel) pairs is kept and
  instances still differ in what they keep (under DDP the processes' quantiles
  are averaged).
* ``mean_rank`` (the authors'): ``xi_l`` is the ``ceil(r * c_l)``-th largest
  *dataset-mean* saliency of layer l (the true instance count: ``drop_last``
  batches excluded, sums and counts all-reduced under DDP). With gates that
  start near-uniform (pi = 1 +- 0.02) a threshold at one channel's mean cuts
  many instances of its neighbours: in digits-c's first epoch the kept
  fraction was 0.62-0.66 where the schedule said >= 0.89.

**Which variant runs** (``method_info.variant``, shown in the table notes):
the default, and the digits-c row, is *quantile thresholds, gates at 10x the
backbone's lr, detached beta*: three departures from the authors' code
(mean-rank thresholds, gate lr x1, beta not detached). The first two were
chosen on the validation split of digits-c before the recipe sweep, among 8
configurations (threshold rule x gate lr, two budgets, and two further
options; figures in ``results/reference/digits-c_manidp_variants.csv``); the
third follows from the paper (below). ``manidp_authors`` registers the
authors' three choices with everything else equal; the ablations table runs
it beside ``manidp`` at the same budgets, with its own sweep. An
importance-shaped gate initialisation was not tried: the mask scales kept
channels by pi, so a pi away from 1 rescales the pretrained network at step 0
(what the near-identity init avoids).

**Departures from the authors' code, each one option away** (default ours,
the authors' value in brackets; the CIFAR-10 section of config/config.yaml
sets every authors' value):

* ``fc1_init`` (``kaiming_normal``): our first gate layer keeps
  ``nn.Linear``'s own initialisation (``torch``, a third of Kaiming's std);
  ``fc2_init`` (``kaiming_normal``): ours ``near_identity`` (see Stability).
* ``norm_decay`` (true): the authors decay every backbone parameter, BN
  scales and shifts and biases included; the shared recipe of every method
  (dense too) leaves those undecayed (false). Gates get none either way.
* ``keep_rate_index`` (``epoch``): the authors set the threshold after epoch
  e with ``r_e`` of that epoch, so with updates from epoch 1 the last one is
  at ``r_{E-1} = r_T`` and the first at ``r_1``; ours (``update``) runs the
  same cosine over the updates actually made (``r_u``, u = 0..U-1, above),
  which differs most in short runs.
* Shortcuts (labelled, not an option of this method): the authors' CIFAR
  ResNets use 1x1-conv projection shortcuts where shapes change (their
  ``resnet_cifar.py``; 40.81 M MACs for ResNet-20); our ``cifar_resnet*``
  use He et al.'s option A (zero-pad, no weights), as the FPGM tables do. The
  paper's ResNet-20 MACs and ours therefore count different dense networks.

Knobs (``method_options``) and the choices behind their defaults:

* ``lam`` (0.1), ``eta`` (0.1), ``tau`` (0.5), ``gamma`` (1.0): the authors'
  code defaults (their ResNet-56 example used lam 5e-3, eta 1.0, which the
  CIFAR-10 section of config/config.yaml uses).
* ``keep_rate`` (null): target keep rate ``r_T``; null derives it from the
  budget as the uniform keep rate whose *static* MACs count meets the budget
  (gates included). The final calibration below then makes the budget exact.
* ``threshold_rule`` (``quantile``; the authors': ``mean_rank``), see above;
  ``quantile_window`` (4096 instances).
* ``gate_lr_scale`` (10.0; the authors': 1.0): the gates' learning rate
  relative to ``train.lr``. Near-identity gates at the backbone's rate barely
  move in a short fine-tune (their spread across instances stayed far smaller
  than across channels); see "Which variant runs" above.
* ``detach_beta`` (true): the authors' code does not detach beta; then the
  sparsity term's gradient through beta *raises* easy instances' CE (a higher
  CE lowers beta and with it the penalty), which works against accuracy and is
  not part of the method as written in the paper. Set false for the authors'
  behaviour.
* ``detach_features`` (false, the authors'): the manifold term's gradient also
  moves the backbone features. True (saliencies follow the features, features
  untouched) is an ablation; it did worse on validation
  (``results/reference/digits-c_manidp_variants.csv``), no reason to depart.
* ``no_complexity`` (false): beta = 1 for every instance. Beta and the
  complexity threshold use the *unsmoothed* CE (label smoothing, when on, only
  enters the CE term): smoothing puts a floor under every instance's loss.
* ``threshold_updates_per_epoch`` (1, the authors'), ``threshold_from_epoch``
  (1, the authors': epoch 0 only collects saliencies), ``anneal_epochs`` (null
  = all epochs, the authors'): the schedule for long runs. The digits-c
  section of config/config.yaml shortens it for its 4-epoch budget to 4
  updates per epoch from epoch 0, annealed over 3 epochs: in a fine-tune of a
  handful of epochs the saliencies move so much within an epoch that a
  threshold set once per epoch lands on stale statistics, and the authors'
  schedule reaches r_T with the very last update, which no step trains with.
* ``freeze_epochs`` (0): >0 anneals, calibrates on validation at the end of
  epoch ``epochs - freeze_epochs`` and trains the last epochs with those
  thresholds fixed. Worse on digits-c validation (the variants CSV above), so off.
* ``grad_clip`` (5.0, null = off): max global gradient norm, applied in
  ``after_backward`` (before ``train.grad_clip``, if that is set too).
* ``calibrate`` (true): budget calibration on the validation split (below).
* ``round_to`` (null): round every instance's kept-channel count to a multiple
  of this (8 or 16: oneDNN's channel blocks) so the deployed convolutions run
  on whole SIMD blocks (:func:`manidp.gating.insert_gates`). Measured on one
  seed only, with no difference beyond noise; off by default until repeated.

**Stability** (authors' issues #15/#19: NaN losses): the gates' second Linear
starts with tiny weights (std 0.01/sqrt(hidden)) and bias 1, so ``pi = 1 +-
0.02`` and the gated network starts as the dense checkpoint (the authors'
Kaiming init rescales every channel of a pretrained net at step 0); the
weights are not exactly zero so that the first Linear gets a gradient from
the first step. The gate path runs in fp32 with autocast disabled; gradients
are clipped by default; the engine stops a run on a non-finite loss. Gates get
no weight decay (authors: ``decay_branch = 0``).

**Budget** (a requested MACs reduction, met within 2 points on the test
split): the authors have no MACs target. We (1) derive ``r_T`` from the budget
as above, then (2) in ``finalize`` calibrate on the *validation* split only:
one keep rate ``q`` sets every layer's threshold to the ``(1 - q)`` quantile
of that layer's validation saliencies, **in forward order**: each layer's
saliencies are collected with the thresholds of every layer before it already
set (the forward stops at the layer being set), because a gate's saliencies
depend on every mask upstream of it. A regula-falsi search over q (3-6
settings) stops when the validation mean per-instance MACs reduction (gates
counted) is within 0.25 points of the budget. Every layer then keeps a
fraction q of its (instance, channel) pairs on validation. The test split is
never looked at. The previous calibration collected its statistics once, with
the trained thresholds in place, and reused them for every q: the budget was
met but later layers were pruned far below q (one run kept at most a quarter
of some layers' channels at q = 0.99) and validation top-1 fell from 68 to
23 %; ``tests/test_manidp.py`` holds the regression test. Validation top-1
before and after the calibration (``val_top1_before_calibration`` /
``val_top1_after_calibration`` in metrics.json and MLflow) shows what the
calibration cost; a drop over 5 points is logged as a warning.

**Recipe**: the lr and lam come from the workflow's recipe sweep on
validation (``results/digits-c_tuning.csv``, cited in config/config.yaml).
The digits-c training budget is 4 epochs where the paper trains gates and
backbone jointly for 400: the on-request training-budget curve
(``results/digits-c_training_budget.csv``: 4, 8 and 16 epochs, every main
method at its recipe) shows whether the ranking at 4 epochs holds as
training grows; its figures belong in that file and the results README.

**Evaluation**: the final model (no selection on the test set; the authors
reported the best test epoch). MACs per instance from the masks that instance
produced (gates included), through :class:`~manidp.macs.InstanceMacs`.

Variants registered here (subclasses with other defaults, for the ablations):
``manidp_no_manifold`` (eta = 0), ``manidp_no_complexity`` (beta = 1),
``manidp_plain`` (both: plain dynamic gating with a sparsity penalty),
``manidp_authors`` (the authors' threshold rule, gate lr and beta).
With beta = 1 for every instance the sparsity term weighs more than
ManiDP's (mean beta about 0.4 on digits-c), so at ManiDP's lam the beta = 1
variants pruned past the budget through their ReLU zeros alone (51-62 % of
the MACs at budgets 0.40 / 0.55; the calibration can only prune more, never
revive a zero saliency). Each variant therefore gets its own lam from the
same recipe sweep as every method (config/config.yaml, ``tuning``; figures in
``results/digits-c_tuning.csv``, committed under ``results/reference/``).

**Deployment**: the deployed model runs :meth:`SaliencyGate.inference_form`,
the same mask bit for bit in fewer ops (ReLU, clamp and the threshold's
compare-and-fill folded into clamp + one ``threshold``); on the CPU's
dense-then-mask path each gate and its mask multiply are one compiled op
(:meth:`SaliencyGate.kernel_spec`, :mod:`manidp.kernels`; masks equal to fp32
rounding of the sums).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from manidp.errors import UserError
from manidp.gating import GateKernel, insert_gates
from manidp.macs import InstanceMacs
from manidp.methods._base import RunContext, default_param_groups
from manidp.methods._gated import GatedMethod

__all__ = ["SaliencyGate", "ManiDP", "ManiDPAuthors", "instance_weights", "sparsity_loss", "similarity_loss", "keep_rate_schedule",
           "rank_threshold", "quantile_threshold"]


# ---------------------------------------------------------------- gate
class SaliencyGate(nn.Module):
    """ManiDP's saliency gate: ``pi`` from the pooled input, mask ``pi * 1[pi >= threshold]``.

    Keeps the last forward's pre-threshold saliency ``pi`` (``[B, C_out]``,
    fp32, with gradient) in :attr:`saliency` for the losses.
    """

    #: Weight initialisations: ours and the authors' (``kaiming_normal_`` on both Linear layers).
    fc1_inits = ("torch", "kaiming_normal")
    fc2_inits = ("near_identity", "kaiming_normal")

    def __init__(self, in_channels: int, out_channels: int, clamp_max: float = 1000.0,
                 threshold_init: float = -1e4, fc1_init: str = "torch", fc2_init: str = "near_identity"):
        super().__init__()
        hidden = out_channels if out_channels < 80 else out_channels // 2
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, out_channels)
        if fc1_init == "kaiming_normal":  # the authors'; "torch" keeps nn.Linear's own (a third of its std)
            nn.init.kaiming_normal_(self.fc1.weight)
        if fc2_init == "kaiming_normal":  # the authors': every channel of a pretrained net rescaled at step 0
            nn.init.kaiming_normal_(self.fc2.weight)
        else:
            # pi = 1 +- about 0.02 at the start: the gated net starts as the dense one, and the small
            # random weights (not zeros) let the first Linear learn from the first step
            nn.init.normal_(self.fc2.weight, std=0.01 / math.sqrt(hidden))
        nn.init.ones_(self.fc2.bias)
        self.clamp_max = clamp_max
        self.register_buffer("threshold", torch.tensor(float(threshold_init)))
        self.saliency: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._mask(x)
        return self._mask(x)

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.fc1.weight.dtype
        pooled = x.mean((2, 3)) if x.dtype == dtype else x.mean((2, 3), dtype=dtype)
        pi = F.relu(self.fc2(F.relu(self.fc1(pooled)))).clamp(max=self.clamp_max)
        self.saliency = pi
        return pi.masked_fill(pi < self.threshold, 0.0)  # pi * 1[pi >= threshold], no gradient through 1[.]

    def extra_repr(self) -> str:
        return f"threshold={self.threshold.item():.4g}"

    def inference_form(self) -> nn.Module:
        """The same mask in fewer ops, for the deployed model (:class:`_InferenceSaliencyGate`)."""
        return _InferenceSaliencyGate(self).train(self.training)

    def kernel_spec(self) -> GateKernel:
        """This gate as one compiled op (:class:`manidp.gating.GateKernel`), for the deployed model."""
        return _InferenceSaliencyGate(self).kernel_spec()


class _InferenceSaliencyGate(nn.Module):
    """:class:`SaliencyGate`'s mask with the threshold folded into one op: what the deployed form runs.

    ``pi = clamp(relu(z), max=M)`` masked by ``pi >= t`` equals
    ``threshold(clamp(z, max=M), t', 0)`` with ``t'`` the float just below ``t``
    (``threshold`` keeps values ``> t'``, i.e. ``>= t``, in float32), and when ``t > 0`` a
    negative ``z`` falls below ``t'`` anyway, so the ReLU goes too: two ops
    instead of four (relu, clamp, lt, masked_fill). At batch 1 on small
    feature maps each op costs microseconds of dispatch, more than its
    arithmetic. Equal outputs, bit for bit (tested).
    """

    def __init__(self, gate: SaliencyGate):
        super().__init__()
        self.fc1, self.fc2 = gate.fc1, gate.fc2
        self.clamp_max = float(gate.clamp_max)
        threshold = gate.threshold.detach().float()
        self.relu = not float(threshold) > 0
        # The float32 just below t (what the comparison sees): the float64 neighbour would round back to t.
        self.cut = float(torch.nextafter(threshold, torch.tensor(-math.inf)))

    def kernel_spec(self) -> GateKernel:
        """pool -> fc1 -> ReLU -> fc2 -> ReLU -> clamp -> keep ``> cut``: the same mask as one op."""
        return GateKernel(self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, relu_out=True,
                          clamp_max=self.clamp_max, cut=self.cut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.fc1.weight.dtype
        pooled = x.mean((2, 3)) if x.dtype == dtype else x.mean((2, 3), dtype=dtype)
        z = self.fc2(F.relu(self.fc1(pooled)))
        if self.relu:
            z = F.relu(z)
        return F.threshold(z.clamp(max=self.clamp_max), self.cut, 0.0)


# ---------------------------------------------------------------- loss terms
def instance_weights(losses: torch.Tensor, complexity: float, gamma: float = 1.0) -> torch.Tensor:
    """beta_i = 1[L_i < C] * ((C - L_i) / C) ** gamma: easy instances near 1, hard ones 0."""
    if complexity <= 0:
        return torch.zeros_like(losses)
    easy = (losses < complexity).to(losses.dtype)
    return easy * ((complexity - losses) / complexity).clamp(min=0).pow(gamma)


def sparsity_loss(saliencies: Sequence[torch.Tensor], beta: torch.Tensor) -> torch.Tensor:
    """sum_l mean_i(beta_i * mean_k pi_ik^l)."""
    return sum((beta * pi.mean(1)).mean() for pi in saliencies)


def similarity_loss(saliency: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """||R - T||_F^2 / B^2 for one layer: T, R the cosine-similarity matrices of saliencies and features."""
    s = F.normalize(saliency.flatten(1), dim=1)
    f = F.normalize(features.flatten(1), dim=1)
    diff = f @ f.t() - s @ s.t()
    return diff.pow(2).sum() / saliency.shape[0] ** 2


def keep_rate_schedule(epoch: int, epochs: int, target: float) -> float:
    """r_e = r_T + (1 - r_T) * (1 + cos(pi * (e + 1) / E)) / 2 (1 -> r_T over the run)."""
    return target + (1 - target) * (1 + math.cos(math.pi * (epoch + 1) / max(1, epochs))) / 2


def rank_threshold(mean_saliency: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """The ceil(keep_rate * c)-th largest mean saliency (the authors' threshold rule)."""
    k = min(len(mean_saliency), max(1, math.ceil(keep_rate * len(mean_saliency))))
    return torch.topk(mean_saliency, k, sorted=True).values[-1]


def quantile_threshold(saliencies: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """The threshold that keeps a ``keep_rate`` fraction of the (instance, channel) saliencies given.

    The ``(1 - keep_rate)`` quantile of every entry: one scalar per layer, so
    instances with low saliencies still lose more channels than others. 0
    keeps nothing (the threshold sits above the largest saliency).
    """
    values = saliencies.detach().flatten().float().sort().values
    drop = int(round((1 - keep_rate) * len(values)))
    if drop >= len(values):
        return values[-1] * (1 + 1e-6) + 1e-12
    return values[drop]


class _StopForward(Exception):
    """Ends a calibration forward at the gate whose statistics are being collected."""


# ---------------------------------------------------------------- method
class ManiDP(GatedMethod):
    name = "manidp"
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

    @torch.no_grad()
    def _layer_saliencies(self, model: nn.Module, ctx: RunContext, index: int) -> torch.Tensor:
        """Every validation instance's saliencies ``[N, C]`` at gate ``index``, with the current upstream
        thresholds in place; the forward stops at that gate (what follows cannot change it)."""
        model.eval()
        collected = []

        def stop(module, args, output):
            collected.append(module.saliency.detach().float())
            raise _StopForward

        handle = self.gates[index].gate.register_forward_hook(stop)
        try:
            for images, _ in ctx.val_loader:
                try:
                    with ctx.autocast():
                        model(images.to(ctx.device))
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return torch.cat(collected)

    def _set_keep_rate(self, model: nn.Module, ctx: RunContext, rate: float) -> None:
        """Thresholds for keep rate ``rate``, set in forward order: each layer's threshold is the
        ``(1 - rate)`` quantile of its validation saliencies *given the thresholds already set upstream*
        (a gate's saliencies depend on every mask before it, so statistics taken once go stale)."""
        for site in self.gates:
            site.gate.threshold.fill_(-math.inf)
        for index, site in enumerate(self.gates):
            site.gate.threshold.fill_(float(quantile_threshold(self._layer_saliencies(model, ctx, index), rate)))

    def _calibrate(self, model: nn.Module, ctx: RunContext, record: bool = True) -> None:
        """Search one keep rate q (the fraction of channel-instances every gated layer keeps on the
        validation split) until the validation MACs reduction meets the budget; record top-1 before/after."""
        counter = InstanceMacs(model, ctx.input_size, ctx.device)
        before_reduction, before_top1 = self.validation_pass(model, counter, ctx)
        # q = 0 prunes everything (reduction above the budget), q = 1 keeps all the ReLU left (below)
        rate, measured = self.calibrate_budget(
            model, ctx, functools.partial(self._set_keep_rate, model, ctx), above=0.0, below=1.0,
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


class ManiDPNoManifold(ManiDP):
    """Ablation: no manifold alignment term (eta = 0)."""

    name = "manidp_no_manifold"
    default_options = {**ManiDP.default_options, "eta": 0.0}


class ManiDPNoComplexity(ManiDP):
    """Ablation: no complexity weighting (beta = 1 for every instance)."""

    name = "manidp_no_complexity"
    default_options = {**ManiDP.default_options, "no_complexity": True}


class ManiDPAuthors(ManiDP):
    """The authors' variant: mean-rank thresholds, gates at the backbone's lr, beta not detached.

    Everything else as :class:`ManiDP` (the schedule a dataset sets, gradient
    clipping, the budget calibration), so beside the ``manidp`` row it shows
    what the three departures of our default buy.
    """

    name = "manidp_authors"
    default_options = {**ManiDP.default_options, "threshold_rule": "mean_rank", "gate_lr_scale": 1.0,
                       "detach_beta": False}


class ManiDPPlain(ManiDP):
    """Ablation: plain dynamic gating with a uniform sparsity penalty (eta = 0, beta = 1)."""

    name = "manidp_plain"
    default_options = {**ManiDP.default_options, "eta": 0.0, "no_complexity": True}
