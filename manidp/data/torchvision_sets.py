"""``cifar10`` and ``cifar100`` from torchvision, with a held-out validation split.

The files live under ``data.root`` (default ``data``); they are downloaded
only when ``data.download: true``. :func:`fetch` gets or checks them once, before
any training: the workflow's ``check_data`` rule calls it, and its jobs only read
the files (one download per job would race on the same folder). Validation is a fixed 5,000-image holdout of
the 50,000 training images (a permutation seeded by ``data.split_seed``,
default 0, never by the training seed) and uses the eval transform; training
uses the other 45,000 with the standard random crop + flip; the official
10,000-image test set is the test split.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Subset
from torchvision import datasets, transforms

from manidp.data._registry import SPLIT_SEED, Option, Splits, register_dataset
from manidp.data._subset import limit_splits
from manidp.errors import UserError

VAL_HOLDOUT = 5000

# Per-channel mean / std of the training images.
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CLASSES = {"cifar10": (datasets.CIFAR10, 10), "cifar100": (datasets.CIFAR100, 100)}
OPTIONS = {
    "root": Option("data", "cifar10/cifar100 folder (torchvision layout)", {"type": "string", "pattern": "\\S"}),
    "download": Option(False, "let torchvision download CIFAR (needs network)", {"type": "boolean"}),
    "split_seed": SPLIT_SEED,
}


def _transforms(name: str) -> tuple[transforms.Compose, transforms.Compose]:
    normalize = transforms.Normalize(*_STATS[name])
    train = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])
    return train, transforms.Compose([transforms.ToTensor(), normalize])


def _open(name: str, root: str, download: bool, transform=None, train: bool = True, keys: str = "data."):
    """One split's dataset object: downloads if asked, turns failures into UserError.

    torchvision checks every file of both splits before opening either, so a
    split that opens means the whole dataset is there. ``keys`` prefixes the
    config keys the messages name (the workflow's are ``datasets.NAME.data.``).
    """
    cls, _ = _CLASSES[name]
    try:
        return cls(root, train=train, transform=transform, download=download)
    except RuntimeError as exc:  # torchvision: files missing or failing their checksum
        if download:
            raise UserError(f"{name} under {keys}root = '{root}' is corrupted even after "
                            f"{keys}download: true ({exc}); delete {root}/{cls.base_folder} "
                            "and try again") from None
        raise UserError(f"{name} not found under {keys}root = '{root}' (expected "
                        f"{root}/{cls.base_folder}); set {keys}root to the folder that holds "
                        f"it, or set {keys}download: true to download it") from None
    except OSError as exc:  # urllib / socket errors while downloading
        reason = " ".join(str(exc).split())
        raise UserError(f"downloading {name} into {keys}root = '{root}' failed ({reason}); "
                        "is there network access? Otherwise copy the files there by hand "
                        f"and set {keys}download: false") from None


def fetch(name: str, data_cfg: dict, keys: str = "data.") -> Path:
    """Download ``name`` into ``data.root`` when ``data.download`` is true and it is missing, else check it is
    there; the folder holding it. One :class:`UserError` (naming ``keys``-prefixed config keys) otherwise."""
    root = str(data_cfg.get("root", OPTIONS["root"].default))
    _open(name, root, bool(data_cfg.get("download", OPTIONS["download"].default)), train=False, keys=keys)
    return Path(root) / _CLASSES[name][0].base_folder


def _build(name: str, data_cfg: dict) -> Splits:
    root, split_seed = str(data_cfg["root"]), data_cfg["split_seed"]
    cls, num_classes = _CLASSES[name]
    train_tf, eval_tf = _transforms(name)

    train_full = _open(name, root, bool(data_cfg["download"]), train_tf)
    eval_full = cls(root, train=True, transform=eval_tf)  # same images, eval transform
    test = cls(root, train=False, transform=eval_tf)

    order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = order[:VAL_HOLDOUT].tolist(), order[VAL_HOLDOUT:].tolist()
    splits = Splits(
        name=name,
        train=Subset(train_full, train_idx),
        val=Subset(eval_full, val_idx),
        test=test,
        num_classes=num_classes,
        input_size=(3, 32, 32),
        info={
            "sizes": {"train": len(train_idx), "val": len(val_idx), "test": len(test)},
            "root": root,
            "split_seed": split_seed,
            "normalization": {"mean": _STATS[name][0], "std": _STATS[name][1]},
        },
    )
    return limit_splits(splits, data_cfg)


@register_dataset("cifar10", OPTIONS)
def build_cifar10(data_cfg: dict, seed: int = 0) -> Splits:
    """CIFAR-10; ``seed`` (the training seed) does not affect the splits."""
    return _build("cifar10", data_cfg)


@register_dataset("cifar100", OPTIONS)
def build_cifar100(data_cfg: dict, seed: int = 0) -> Splits:
    """CIFAR-100; ``seed`` (the training seed) does not affect the splits."""
    return _build("cifar100", data_cfg)
