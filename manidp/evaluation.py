"""Evaluation shared by every method: accuracy, per-instance MACs and records.

Per instance it keeps the index (position in the split), label, prediction,
cross-entropy, MACs (from the masks that instance really produced, through the
method's :meth:`instance_macs`) and the severity where the dataset has one.
The summary adds MACs statistics and the Spearman correlation between MACs and
difficulty (severity; the dense model's per-instance CE when known).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from manidp._files import atomic_write_text
from manidp.macs import InstanceMacs

__all__ = ["evaluate", "summarize", "spearman"]


@torch.no_grad()
def evaluate(model, method, loader, counter: Optional[InstanceMacs], device, autocast,
             severity: Optional[torch.Tensor] = None, channels_last: bool = False) -> pd.DataFrame:
    """Run ``model`` over ``loader`` (unshuffled) and return one row per instance."""
    was_training = model.training
    model.eval()
    rows = {"label": [], "prediction": [], "loss": [], "top5": [], "macs": []}
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            with autocast():
                logits = model(images)
            logits = logits.float()
            rows["loss"].append(F.cross_entropy(logits, targets, reduction="none").cpu())
            rows["prediction"].append(logits.argmax(1).cpu())
            k = min(5, logits.shape[1])
            rows["top5"].append((logits.topk(k, 1).indices == targets[:, None]).any(1).cpu())
            rows["label"].append(targets.cpu())
            if counter is not None:
                rows["macs"].append(method.instance_macs(model, counter, len(targets)))
    finally:
        model.train(was_training)
    table = pd.DataFrame({k: torch.cat(v).numpy() for k, v in rows.items() if v})
    table.insert(0, "index", np.arange(len(table)))
    table["correct"] = table["prediction"] == table["label"]
    if severity is not None:
        table["severity"] = severity[: len(table)].numpy()
    return table


def spearman(a, b) -> Optional[float]:
    """Spearman's rho: Pearson's r of the ranks, ties given their average rank (as scipy.stats.spearmanr).

    Ranked with pandas rather than scipy.stats, whose import would cost every training job a visible share
    of its start-up.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None  # undefined for a constant column (e.g. a static model's MACs)
    ranks_a, ranks_b = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    value = float(np.corrcoef(ranks_a, ranks_b)[0, 1])
    return None if math.isnan(value) else value


def summarize(table: pd.DataFrame, dense_macs: int, prefix: str = "test",
              dense_losses: Optional[pd.DataFrame] = None) -> dict:
    out = {
        f"{prefix}_top1": float(table["correct"].mean() * 100),
        f"{prefix}_top5": float(table["top5"].mean() * 100),
        f"{prefix}_loss": float(table["loss"].mean()),
        f"{prefix}_instances": int(len(table)),
    }
    if "macs" in table:
        macs = table["macs"].to_numpy()
        out.update({
            "macs": float(macs.mean()),
            "macs_p10": float(np.percentile(macs, 10)),
            "macs_median": float(np.median(macs)),
            "macs_p90": float(np.percentile(macs, 90)),
            "macs_dense": int(dense_macs),
            "macs_reduction": float(1 - macs.mean() / dense_macs),
        })
        if "severity" in table:
            out["spearman_macs_severity"] = spearman(macs, table["severity"])
            out[f"{prefix}_top1_by_severity"] = {
                int(s): float(g["correct"].mean() * 100) for s, g in table.groupby("severity")
            }
        if dense_losses is not None and len(dense_losses) == len(table):
            out["spearman_macs_dense_loss"] = spearman(macs, dense_losses["loss"])
    return out


def write_instances(table: pd.DataFrame, path: Path) -> None:
    columns = [c for c in ("index", "label", "prediction", "loss", "macs", "severity") if c in table]
    atomic_write_text(path, table[columns].to_csv(index=False))
