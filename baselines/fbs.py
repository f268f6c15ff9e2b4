"""``fbs``: Feature Boosting and Suppression (Gao et al., "Dynamic Channel
Pruning: Feature Boosting and Suppression", ICLR 2019). Dynamic, per channel.

Per gated conv, a small predictor reads the per-channel mean |x| of the conv's
input; a Linear layer and ReLU give saliencies g >= 0, and only the top
k = ceil(d * C) of them survive (winner-take-all). The survivors scale the
conv's output channels, the rest are skipped, along with the matching input
channels of the next conv. Loss: CE + ``l1_weight`` * sum over gates of
||g||_1 (per instance, averaged over the batch).

The gates sit where ManiDP's do and use the same machinery
(``manidp/gating/``): in a BasicBlock gate 1 reads the block input and masks
conv1's output (so conv2 reads only the kept channels), gate 2 reads that and
masks conv2's output before the residual add; Bottleneck and inverted residual
blocks as documented there. Per-instance MACs come from the masks each
instance produced (a zero saliency among the top k is skipped too) plus the
predictors' own Linear layers; whole channels are skipped, so the shared
deployed batch-1 form (:func:`manidp.gating.deploy_model`) really computes
less.

Where the paper was silent: the predictor's bias starts at 1 and its weights
near 0, so every saliency starts near 1 and the dense network is not rescaled
at the first step; one density d for every gate (the paper's setting), chosen
from the requested reduction on the gated model's MAC count, then checked on
the validation split: if the measured reduction is off by more than a point
(zero saliencies among the survivors save more), d is re-chosen on the
validation split. The test split is never used for it. The predictor reads
mean |x| and says so (``pools_abs``), so the deployed form hands it the
pool of |x|: mobilenetv2's gate reads a block input that is signed (a
linear projection's output), where the pooled mean of x would differ.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from manidp.errors import UserError
from manidp.gating import GateKernel, insert_gates
from manidp.macs import InstanceMacs
from manidp.methods import RunContext
from manidp.methods._gated import GatedMethod, grid_search


class SaliencyPredictor(nn.Module):
    """FBS's gate: g = ReLU(Linear(mean |x|)), then winner-take-all over the top ceil(d * C)."""

    pools_abs = True  # reads mean |x| (manidp.gating's contract, item 2)

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, out_channels)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.ones_(self.fc.bias)
        self.register_buffer("density", torch.ones(()))  # d, saved with the weights
        self.saliency: Optional[torch.Tensor] = None

    @property
    def k(self) -> int:
        # The small slack keeps ceil(j / C * C) == j despite floating-point error.
        return max(1, math.ceil(float(self.density) * self.fc.out_features - 1e-6))

    def kernel_spec(self) -> GateKernel:
        """The same mask as one compiled op (:class:`manidp.gating.GateKernel`): pool |x|, fc, ReLU, top k."""
        return GateKernel(self.fc.weight, self.fc.bias, relu_out=True, abs_pool=True, topk=self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        saliency = F.relu(self.fc(x.abs().mean((2, 3), dtype=torch.float32)))
        winners = torch.zeros_like(saliency).scatter_(1, saliency.topk(self.k, dim=1).indices, 1.0)
        self.saliency = saliency
        return saliency * winners


class FBS(GatedMethod):
    name = "fbs"
    paper_names = ("FBS",)
    budget_tolerance = 0.03
    default_options = {
        "l1_weight": 1.0e-8,  # lambda of the L1 penalty on the saliencies (the paper's value)
        "density": None,  # d; null = chosen from the budget
        "round_to": None,  # kept counts rounded to this multiple (8/16: oneDNN's SIMD block); manidp.gating
    }

    def __init__(self, options: Optional[dict] = None, budget: Optional[float] = None):
        super().__init__(options, budget)
        self.val_reduction: Optional[float] = None

    # -- building ---------------------------------------------------------
    def _set_density(self, density: float) -> None:
        for site in self.gates:
            site.gate.density.fill_(density)

    def _macs_at(self, counter: InstanceMacs, density: float) -> float:
        """MACs of one instance when every gate keeps exactly its k channels."""
        in_kept, out_kept = {}, {}
        for site in self.gates:
            k = torch.tensor([max(1, math.ceil(density * site.out_channels - 1e-6))])
            out_kept.update(dict.fromkeys(site.conv_names, k))
            in_kept.update(dict.fromkeys(site.consumer_names, k))
        return float(counter(1, in_kept, out_kept))

    def _densities(self) -> list[float]:
        """The densities where some gate's k changes (j / C), ascending: the reduction falls along them."""
        return sorted({j / s.out_channels for s in self.gates for j in range(1, s.out_channels + 1)})

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.gates = insert_gates(model, SaliencyPredictor, round_to=self.options["round_to"])
        density = self.options["density"]
        if density is None:
            counter = InstanceMacs(model, ctx.input_size)
            least = 1 - self._macs_at(counter, 0.0) / ctx.dense_macs
            if least < self.budget - self.budget_tolerance:
                raise UserError(f"fbs saves at most {least:.1%} of the MACs on this backbone; lower the budget")
            density = grid_search(lambda d: 1 - self._macs_at(counter, d) / ctx.dense_macs, self.budget,
                                  self._densities())
        self._set_density(density)
        return model

    # -- training ---------------------------------------------------------
    def training_loss(self, model: nn.Module, images, targets, ctx: RunContext):
        loss, logits, _ = super().training_loss(model, images, targets, ctx)
        l1 = sum(site.gate.saliency.sum(1).mean() for site in self.gates)
        kept = torch.stack([(site.mask != 0).float().mean() for site in self.gates]).mean()
        return loss + self.options["l1_weight"] * l1, logits, {"kept": kept.item(), "saliency_l1": float(l1.detach())}

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Check the budget on the validation split; re-choose d there when it is off by over a point."""
        if ctx.val_loader is None or self.options["density"] is not None:
            return model
        was_training = model.training
        counter = InstanceMacs(model, ctx.input_size, ctx.device)
        density = float(self.gates[0].gate.density)
        self.val_reduction, _ = self.validation_pass(model, counter, ctx)
        if abs(self.val_reduction - self.budget) > 0.01:
            density, measured = self.calibrate_budget(model, ctx, self._set_density, points=self._densities(),
                                                      counter=counter)
            self.val_reduction = measured[density][0]
        model.train(was_training)
        ctx.log(f"fbs: density {density:.3f} gives {self.val_reduction:.2%} fewer MACs on val")
        return model

    # -- state ------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"val_reduction": self.val_reduction}

    def load_state_dict(self, state: dict) -> None:
        self.val_reduction = state.get("val_reduction")

    def describe(self) -> dict:
        density = float(self.gates[0].gate.density) if self.gates else None
        return {**super().describe(), "kind": "dynamic (per channel)", "density": density,
                "kept_per_gate": [site.gate.k for site in self.gates],
                "val_macs_reduction_calibrated": self.val_reduction}
