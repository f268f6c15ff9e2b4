"""Deterministic truncation of splits for tiny test and smoke configs.

``data.max_train`` keeps the first N training samples and ``data.max_eval`` the
first N samples of both validation and test. "First" is in each dataset's own
fixed order, so a truncated run always sees the same samples. Every dataset
builder passes its finished :class:`Splits` through :func:`limit_splits`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from torch.utils.data import Dataset, Subset, TensorDataset

from manidp.data._registry import Splits
from manidp.errors import UserError


def _limit(data_cfg: dict, key: str) -> Optional[int]:
    value = data_cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"data.{key} must be a positive integer or null, got {value!r}")
    return value


def take_first(dataset: Dataset, n: Optional[int]) -> Dataset:
    """The first ``n`` samples of ``dataset`` (all of them when ``n`` is None).

    A ``TensorDataset`` stays a ``TensorDataset`` (its tensors are sliced);
    anything else is wrapped in a ``Subset``.
    """
    if n is None or n >= len(dataset):
        return dataset
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[:n] for t in dataset.tensors))
    return Subset(dataset, range(n))


def limit_splits(splits: Splits, data_cfg: dict) -> Splits:
    """Apply ``data.max_train`` / ``data.max_eval`` to ``splits`` (severities too)."""
    limits = {"train": _limit(data_cfg, "max_train")}
    limits["val"] = limits["test"] = _limit(data_cfg, "max_eval")
    if all(n is None for n in limits.values()):
        return splits
    datasets = {name: take_first(getattr(splits, name), n) for name, n in limits.items()}
    severity = {name: sev[: len(datasets[name])] for name, sev in splits.severity.items()}
    info = dict(splits.info)
    info["sizes"] = {name: len(ds) for name, ds in datasets.items()}
    info["limits"] = {"max_train": limits["train"], "max_eval": limits["val"]}
    return replace(splits, **datasets, severity=severity, info=info)
