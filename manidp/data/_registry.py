"""Dataset registry and the split contract every dataset honours."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.utils.data import Dataset

from manidp._registry import Registry
from manidp.errors import UserError

DATASETS: Registry[Callable[..., "Splits"]] = Registry("dataset")
register_dataset = DATASETS.register


@dataclass
class Splits:
    """Train / validation / test splits of one dataset.

    ``val`` is carved deterministically from the training data and is the only
    split model selection or calibration may use; ``test`` is only evaluated.
    ``severity`` maps a split name to a per-sample difficulty tensor aligned with
    that split's indices, for datasets that have one (digits-c).
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_size: tuple[int, int, int]
    severity: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def build_dataset(name: str, data_cfg: Optional[dict] = None, seed: int = 0) -> Splits:
    """Build dataset ``name``; ``data_cfg`` is the config's ``data`` section."""
    builder = DATASETS.get(name)
    data_cfg = data_cfg or {}
    if name != "digits-c":
        for key in ("augment_rotation_deg", "augment_shift_px"):
            if data_cfg.get(key):
                raise UserError(f"data.{key} applies to digits-c only ({name} trains with its own standard "
                                f"augmentation); set it to 0")
    return builder(data_cfg, seed=seed)
