"""``imagenet``: ILSVRC-2012 in ImageFolder layout, loaded with timm's factories.

The folder named by ``data.imagenet_path`` (or the env var ``MANIDP_IMAGENET``)
must hold ``train/`` and ``val/``, each with one subfolder per class (the
official validation images sorted into class folders). Validation is a fixed
holdout of ``data.imagenet_val_holdout`` (default 10,000) training images, drawn
by a permutation seeded by ``data.split_seed`` (default 0) and seen through the
eval transform; the official ``val/`` folder is the test split. Transforms are
timm's standard ones for ``data.image_size`` (default 224).

The layout is checked before timm scans anything, so a wrong path gives one
clear :class:`UserError` instead of a timm stack trace.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from timm.data import create_dataset, create_transform, resolve_data_config
from torch.utils.data import Dataset

from manidp.data._registry import Splits, register_dataset
from manidp.data._subset import limit_splits
from manidp.errors import UserError

ENV_VAR = "MANIDP_IMAGENET"
_HINT = (f"set data.imagenet_path (or the env var {ENV_VAR}) to the ILSVRC-2012 folder "
         "that holds train/ and val/, each with one subfolder per class")


class HoldoutView(Dataset):
    """``base[indices[i]]`` with ``transform`` applied to the image.

    Lets train and validation share one scan of ``train/`` while using
    different transforms (``base`` must return untransformed images).
    """

    def __init__(self, base: Dataset, indices: list[int], transform):
        self.base, self.indices, self.transform = base, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, target = self.base[self.indices[i]]
        return self.transform(image), target


def _found(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} entries)" if len(names) > 8 else "")
    return shown or "nothing"


def _check_layout(data_cfg: dict) -> tuple[Path, list[str]]:
    """The dataset folder and its class names; one UserError for any bad layout."""
    raw = data_cfg.get("imagenet_path") or os.environ.get(ENV_VAR)
    if not raw:
        raise UserError(f"imagenet: neither data.imagenet_path nor {ENV_VAR} is set; {_HINT}")
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise UserError(f"imagenet: '{path}' (data.imagenet_path / {ENV_VAR}) is not an "
                        f"existing folder; {_HINT}")
    missing = [s + "/" for s in ("train", "val") if not (path / s).is_dir()]
    if missing:
        raise UserError(f"imagenet: '{path}' (data.imagenet_path / {ENV_VAR}) has no "
                        f"{' and no '.join(missing)} (found: {_found(path)}); {_HINT}")
    classes = {}
    for split in ("train", "val"):
        classes[split] = sorted(d.name for d in (path / split).iterdir() if d.is_dir())
        if not classes[split]:
            raise UserError(f"imagenet: '{path / split}' (under data.imagenet_path / {ENV_VAR}) "
                            f"has no class subfolders (found: {_found(path / split)}); {_HINT}")
    unknown = sorted(set(classes["val"]) - set(classes["train"]))
    if unknown:
        raise UserError(f"imagenet: val/ under '{path}' (data.imagenet_path / {ENV_VAR}) has "
                        f"class folders missing from train/: {', '.join(unknown[:8])}; {_HINT}")
    return path, classes["train"]


@register_dataset("imagenet")
def build_imagenet(data_cfg: dict, seed: int = 0) -> Splits:
    """ImageNet; ``seed`` (the training seed) does not affect the splits."""
    path, classes = _check_layout(data_cfg)
    size = int(data_cfg.get("image_size", 224))
    holdout = data_cfg.get("imagenet_val_holdout", 10000)
    split_seed = data_cfg.get("split_seed", 0)

    timm_cfg = resolve_data_config({"input_size": (3, size, size)})
    train_tf = create_transform(**timm_cfg, is_training=True)
    eval_tf = create_transform(**timm_cfg)
    train_all = create_dataset("", root=str(path), split="train")  # untransformed images
    test = create_dataset("", root=str(path), split="val", transform=eval_tf,
                          class_map=train_all.reader.class_to_idx)
    n_train = len(train_all)
    if isinstance(holdout, bool) or not isinstance(holdout, int) or not 0 < holdout < n_train:
        raise UserError(f"data.imagenet_val_holdout must be an integer in [1, {n_train - 1}] "
                        f"(train/ has {n_train} images), got {holdout!r}")

    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = order[:holdout].tolist(), order[holdout:].tolist()
    splits = Splits(
        name="imagenet",
        train=HoldoutView(train_all, train_idx, train_tf),
        val=HoldoutView(train_all, val_idx, eval_tf),
        test=test,
        num_classes=len(classes),
        input_size=(3, size, size),
        info={
            "sizes": {"train": len(train_idx), "val": len(val_idx), "test": len(test)},
            "path": str(path),
            "split_seed": split_seed,
            "timm_data_config": timm_cfg,
        },
    )
    return limit_splits(splits, data_cfg)
