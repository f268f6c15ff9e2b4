"""Dataset registry, the ``data.*`` options each dataset declares, and the split contract every dataset honours.

A dataset is one builder ``(data_cfg, seed) -> Splits`` registered with the options it reads, so the
datasets themselves say which ``data.*`` keys exist: ``build_dataset`` refuses a key the chosen dataset
does not take, ``manidp datasets`` lists them, and a test keeps the run schema's ``data`` block equal to
their union (the schema must stay a plain file: Snakemake's validator reads it too).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch.utils.data import Dataset

from manidp._registry import Registry
from manidp.errors import UserError


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


@dataclass(frozen=True)
class Option:
    """One ``data.*`` key: its default, its help text and the JSON Schema of its value.

    The default is the value ``manidp/configs/defaults.yaml`` gives the key, so a resolved config, which
    carries every key, holds each dataset's foreign keys at their defaults.
    """

    default: Any
    help: str
    schema: Mapping[str, Any]

    def schema_property(self) -> dict:
        """The key's entry in the run schema's ``data`` block."""
        return {**self.schema, "description": self.help}

    def default_text(self) -> str:
        """The default as YAML writes it (null, true, 0, data)."""
        return self.default if isinstance(self.default, str) else json.dumps(self.default)


_LIMIT = {"type": ["integer", "null"], "minimum": 1}
# Every dataset takes these (manidp.data._subset applies them to the finished splits).
SHARED_OPTIONS = {
    "max_train": Option(None, "keep only the first N training images", _LIMIT),
    "max_eval": Option(None, "keep only the first N validation/test images", _LIMIT),
}
# Declared once for the datasets that carve their validation split from their training images.
SPLIT_SEED = Option(0, "seed of the validation holdout carved from the training images",
                    {"type": "integer", "minimum": 0})


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: its builder and the options it takes beyond the shared ones."""

    name: str
    build: Callable[..., Splits]
    own_options: Mapping[str, Option]

    @property
    def options(self) -> dict[str, Option]:
        """Every ``data.*`` key this dataset takes, its own first."""
        return {**self.own_options, **SHARED_OPTIONS}

    def settings(self, data_cfg: dict) -> dict:
        """``data_cfg`` completed with this dataset's defaults; one UserError for a key it does not take.

        Another dataset's key is let through at its default: every resolved config carries it.
        """
        taken, known = self.options, all_options()
        for key, value in data_cfg.items():
            if key in taken or (key in known and value == known[key].default):
                continue
            if key in known:
                owners = " and ".join(n for n in DATASETS if key in DATASETS.get(n).own_options)
                why = (f"data.{key} applies to {owners} only, not to dataset '{self.name}': remove it or set it to "
                       f"its default, {known[key].default_text()}")
            else:
                why = f"data.{key} is not an option of any dataset ('{self.name}' was chosen)"
            raise UserError(f"{why}; {self.name} takes {', '.join('data.' + k for k in taken)}")
        return {key: data_cfg.get(key, option.default) for key, option in taken.items()}


DATASETS: Registry[DatasetEntry] = Registry("dataset")


def register_dataset(name: str, options: Optional[Mapping[str, Option]] = None) -> Callable:
    """Decorator registering a builder ``(data_cfg, seed) -> Splits`` with the ``data.*`` options it reads.

    The builder gets ``data_cfg`` completed with the defaults of exactly those options and the shared
    ones. A key keeps one meaning in the one flat ``data`` block: a dataset that takes a key another
    dataset declares must declare the same :class:`Option`.
    """
    options = dict(options or {})

    def add(build: Callable[..., Splits]) -> Callable[..., Splits]:
        known = all_options()
        for key, option in options.items():
            if key in known and known[key] != option:
                raise ValueError(f"dataset '{name}' declares data.{key} unlike the dataset that declared it first")
        DATASETS.register(name)(DatasetEntry(name, build, options))
        return build

    return add


def all_options() -> dict[str, Option]:
    """Every ``data.*`` key some registered dataset takes (the run schema's ``data`` block)."""
    options = dict(SHARED_OPTIONS)
    for name in DATASETS:
        options.update(DATASETS.get(name).own_options)
    return options


def build_dataset(name: str, data_cfg: Optional[dict] = None, seed: int = 0) -> Splits:
    """Build dataset ``name``; ``data_cfg`` is the config's ``data`` section."""
    entry = DATASETS.get(name)
    return entry.build(entry.settings(data_cfg or {}), seed=seed)
