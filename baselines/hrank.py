"""``hrank``: filter pruning by feature-map rank (Lin, Ji, Wang, Zhang, Zhang,
Tian, Shao, "HRank: Filter Pruning using High-Rank Feature Map", CVPR 2020).
Static.

Score of a channel: the average rank of its feature maps (each an H x W
matrix, after BN and ReLU) over the instances of a few training batches; low
rank carries little information, so the lowest-ranked channels of each group
go, once, before fine-tuning. Through the one importance hook of
:class:`~baselines._structured.StructuredPruning`. See ``baselines/README.md``
for the card.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines._structured import StructuredPruning, scoring_batches
from manidp.methods import RunContext


class HRank(StructuredPruning):
    name = "hrank"
    paper_names = ("HRank",)
    data_driven = True
    default_options = {**StructuredPruning.default_options, "layers": "auto",
                       "batches": 5}  # training batches whose feature maps are ranked (the authors': 5 of 128)

    @torch.no_grad()
    def channel_scores(self, model: nn.Module, ctx: RunContext) -> dict[str, torch.Tensor]:
        """Per group, the mean rank of ReLU(BN output) of every BN its channels leave through
        (of the convs' outputs where a group has no BN), summed over those layers."""
        totals = {g.key: torch.zeros(g.channels, dtype=torch.float64) for g in self.groups}

        def rank_into(key: str):
            def hook(module, args, output):
                totals[key] += torch.linalg.matrix_rank(F.relu(output.detach().float())).double().sum(0).cpu()
            return hook

        handles = []
        for g in self.groups:
            norms = [n for n in g.out_layers if isinstance(model.get_submodule(n), nn.BatchNorm2d)]
            handles += [model.get_submodule(n).register_forward_hook(rank_into(g.key)) for n in norms or g.convs]
        was_training = model.training
        model.eval()  # the dense model's running statistics stay as they are
        seen = 0
        try:
            for images, _ in scoring_batches(ctx, self.options["batches"]):
                model(images)
                seen += len(images)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        return {key: total / max(1, seen) for key, total in totals.items()}
