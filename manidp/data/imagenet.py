"""``imagenet``: ILSVRC-2012 in ImageFolder layout, loaded with timm's factories.

The folder named by ``data.imagenet_path`` (or the env var ``MANIDP_IMAGENET``)
must hold ``train/`` and ``val/``, each with one subfolder per class (the
official validation images sorted into class folders). Validation is a fixed
holdout of ``data.imagenet_val_holdout`` (default 10,000) training images, drawn
by a permutation seeded by ``data.split_seed`` (default 0) and seen through the
eval transform; the official ``val/`` folder is the test split. Transforms are
timm's standard ones for ``data.image_size`` (default 224).

The layout is checked before timm scans anything, so a wrong path gives one
clear :class:`UserError` instead of a timm stack trace. The class list and its
label map are built here once, from the class folders of ``train/``, and given
to the dataset of every split: a label means the same class in all of them, and
a class folder that holds no image, or a ``val/`` class that ``train/`` lacks,
is an error naming the folder instead of labels that silently shift. An image
that cannot be decoded is an error naming its file (timm would substitute the
next sample, with that sample's label).
"""
from __future__ import annotations

import os
from pathlib import Path

from collections import Counter

import torch
from PIL import Image
from timm.data import ImageDataset, create_transform, resolve_data_config
from timm.data.readers.img_extensions import get_img_extensions
from timm.utils.misc import natural_key
from torch.utils.data import Dataset

from manidp.data._registry import Splits, register_dataset
from manidp.data._subset import limit_splits
from manidp.errors import UserError

ENV_VAR = "MANIDP_IMAGENET"
_HINT = (f"set data.imagenet_path (or the env var {ENV_VAR}) to the ILSVRC-2012 folder "
         "that holds train/ and val/, each with one subfolder per class")


class UnreadableImage(UserError):
    """An image file that cannot be opened or decoded.

    Raised inside a DataLoader worker, torch re-raises it in the training
    process as ``UnreadableImage(text)`` where ``text`` is the worker's whole
    formatted traceback; the message is its last line, so the command line
    still prints one line that names the file.
    """

    def __init__(self, message: str):
        if "\nOriginal Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.partition(": ")[2] or last
        super().__init__(message)


class StrictImageDataset(ImageDataset):
    """timm's folder dataset without its silent substitution of unreadable samples.

    timm logs "Skipped sample" and returns the next image with the next
    image's label instead; a benchmark must not score a different sample than
    it counts, so a file that cannot be read stops the run and is named.
    """

    def __getitem__(self, index: int):
        path = self.reader.filename(index, absolute=True)
        try:
            fileobj, target = self.reader[index][:2]
            with fileobj, Image.open(fileobj) as opened:
                image = opened.convert(self.input_img_mode)
        # Any failure to open or decode (PIL raises OSError, SyntaxError, ValueError,
        # DecompressionBombError depending on the damage) means the same thing here.
        except Exception as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise UnreadableImage(f"imagenet: cannot read image '{path}' ({reason}); replace the file with "
                                  "an intact copy or delete it") from None
        if self.transform is not None:
            image = self.transform(image)
        return image, target


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
        # timm's own order (natural sort), so labels match those of timm's class maps.
        classes[split] = sorted((d.name for d in (path / split).iterdir() if d.is_dir()), key=natural_key)
        if not classes[split]:
            raise UserError(f"imagenet: '{path / split}' (under data.imagenet_path / {ENV_VAR}) "
                            f"has no class subfolders (found: {_found(path / split)}); {_HINT}")
    unknown = [c for c in classes["val"] if c not in set(classes["train"])]
    if unknown:
        more = f" (and {len(unknown) - 1} more: {', '.join(unknown[1:8])})" if len(unknown) > 1 else ""
        raise UserError(f"imagenet: class folder '{path / 'val' / unknown[0]}'{more} has no folder of the same "
                        f"name in '{path / 'train'}', so its images have no label the model learns; remove it "
                        "from val/ or add the class to train/")
    return path, classes["train"]


def _empty_folders(folders: list[Path]) -> UserError:
    more = f" (and {len(folders) - 1} more: {', '.join(f.name for f in folders[1:8])})" if len(folders) > 1 else ""
    return UserError(f"imagenet: class folder '{folders[0]}'{more} holds no image file "
                     f"({', '.join(get_img_extensions())}), so its class would get no samples and the "
                     "labels of the others would shift; remove the folder or put the class's images in it")


def _split_dataset(path: Path, split: str, class_to_idx: dict, transform=None) -> StrictImageDataset:
    """One split's images, labelled with the shared ``class_to_idx``; every class folder must hold images."""
    folder = path / split
    present = sorted((d.name for d in folder.iterdir() if d.is_dir()), key=natural_key)
    try:
        dataset = StrictImageDataset(str(folder), class_map=class_to_idx, transform=transform)
    except RuntimeError:  # timm: no image anywhere under the folder
        raise _empty_folders([folder / name for name in present]) from None
    counts = Counter(target for _, target in dataset.reader.samples)
    empty = [folder / name for name in present if not counts[class_to_idx[name]]]
    if empty:
        raise _empty_folders(empty)
    return dataset


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
    class_to_idx = {name: i for i, name in enumerate(classes)}
    train_all = _split_dataset(path, "train", class_to_idx)  # untransformed images
    test = _split_dataset(path, "val", class_to_idx, transform=eval_tf)
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
