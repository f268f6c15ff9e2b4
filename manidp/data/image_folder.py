"""``imagefolder``: any dataset in ImageFolder layout, loaded with timm's factories; presets such as ImageNet.

The dataset's folder, named by a config key (``data.image_folder``) or an environment variable
(``MANIDP_IMAGE_FOLDER``), must hold ``train/`` and ``val/``, each with one subfolder per class.
Validation is a fixed holdout of ``data.val_holdout`` training images, drawn by a permutation
seeded by ``data.split_seed`` and seen through the eval transform; ``val/`` is the test split.
Transforms are timm's standard ones for ``data.image_size``. A :class:`FolderPreset` gives another
dataset of this layout its own name, path key, variable and holdout key (``imagenet.py``).

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

import functools
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from timm.data import ImageDataset, create_transform, resolve_data_config
from timm.data.readers.img_extensions import get_img_extensions
from timm.utils.misc import natural_key
from torch.utils.data import Dataset

from manidp.data._registry import SPLIT_SEED, Option, Splits, register_dataset
from manidp.data._subset import limit_splits
from manidp.errors import UserError

IMAGE_SIZE = Option(224, "train/eval resolution of a dataset in ImageFolder layout",
                    {"type": "integer", "minimum": 1})


@dataclass(frozen=True)
class FolderPreset:
    """What sets one ImageFolder dataset apart: its name, the config key and the environment variable that
    name its folder (``folder`` says in messages what that folder is), and its validation holdout's key,
    default and help. ``path_help`` is the path key's help text."""

    name: str
    path_key: str
    env_var: str
    folder: str
    path_help: str
    holdout_key: str
    holdout: int
    holdout_help: str

    def options(self) -> dict[str, Option]:
        return {
            self.path_key: Option(None, self.path_help, {"type": ["string", "null"], "pattern": "\\S"}),
            "image_size": IMAGE_SIZE,
            self.holdout_key: Option(self.holdout, self.holdout_help, {"type": "integer", "minimum": 1}),
            "split_seed": SPLIT_SEED,
        }

    def hint(self) -> str:
        return (f"set data.{self.path_key} (or the env var {self.env_var}) to {self.folder} "
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
    it counts, so a file that cannot be read stops the run and is named
    (``dataset`` starts the message).
    """

    def __init__(self, root: str, dataset: str, **kwargs):
        super().__init__(root, **kwargs)
        self.dataset = dataset

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
            raise UnreadableImage(f"{self.dataset}: cannot read image '{path}' ({reason}); replace the file "
                                  "with an intact copy or delete it") from None
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


def _check_layout(preset: FolderPreset, data_cfg: dict) -> tuple[Path, list[str]]:
    """The dataset folder and its class names; one UserError for any bad layout."""
    name, key, env = preset.name, f"data.{preset.path_key}", preset.env_var
    raw = data_cfg.get(preset.path_key) or os.environ.get(env)
    if not raw:
        raise UserError(f"{name}: neither {key} nor {env} is set; {preset.hint()}")
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise UserError(f"{name}: '{path}' ({key} / {env}) is not an existing folder; {preset.hint()}")
    missing = [s + "/" for s in ("train", "val") if not (path / s).is_dir()]
    if missing:
        raise UserError(f"{name}: '{path}' ({key} / {env}) has no "
                        f"{' and no '.join(missing)} (found: {_found(path)}); {preset.hint()}")
    classes = {}
    for split in ("train", "val"):
        # timm's own order (natural sort), so labels match those of timm's class maps.
        classes[split] = sorted((d.name for d in (path / split).iterdir() if d.is_dir()), key=natural_key)
        if not classes[split]:
            raise UserError(f"{name}: '{path / split}' (under {key} / {env}) "
                            f"has no class subfolders (found: {_found(path / split)}); {preset.hint()}")
    unknown = [c for c in classes["val"] if c not in set(classes["train"])]
    if unknown:
        more = f" (and {len(unknown) - 1} more: {', '.join(unknown[1:8])})" if len(unknown) > 1 else ""
        raise UserError(f"{name}: class folder '{path / 'val' / unknown[0]}'{more} has no folder of the same "
                        f"name in '{path / 'train'}', so its images have no label the model learns; remove it "
                        "from val/ or add the class to train/")
    return path, classes["train"]


def _empty_folders(name: str, folders: list[Path]) -> UserError:
    more = f" (and {len(folders) - 1} more: {', '.join(f.name for f in folders[1:8])})" if len(folders) > 1 else ""
    return UserError(f"{name}: class folder '{folders[0]}'{more} holds no image file "
                     f"({', '.join(get_img_extensions())}), so its class would get no samples and the "
                     "labels of the others would shift; remove the folder or put the class's images in it")


def _split_dataset(name: str, path: Path, split: str, class_to_idx: dict, transform=None) -> StrictImageDataset:
    """One split's images, labelled with the shared ``class_to_idx``; every class folder must hold images."""
    folder = path / split
    present = sorted((d.name for d in folder.iterdir() if d.is_dir()), key=natural_key)
    try:
        dataset = StrictImageDataset(str(folder), name, class_map=class_to_idx, transform=transform)
    except RuntimeError:  # timm: no image anywhere under the folder
        raise _empty_folders(name, [folder / c for c in present]) from None
    counts = Counter(target for _, target in dataset.reader.samples)
    empty = [folder / c for c in present if not counts[class_to_idx[c]]]
    if empty:
        raise _empty_folders(name, empty)
    return dataset


def build_image_folder(preset: FolderPreset, data_cfg: dict, seed: int = 0) -> Splits:
    """The dataset ``preset`` describes; ``seed`` (the training seed) does not affect the splits."""
    path, classes = _check_layout(preset, data_cfg)
    size = int(data_cfg["image_size"])
    holdout = data_cfg[preset.holdout_key]
    split_seed = data_cfg["split_seed"]

    timm_cfg = resolve_data_config({"input_size": (3, size, size)})
    train_tf = create_transform(**timm_cfg, is_training=True)
    eval_tf = create_transform(**timm_cfg)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    train_all = _split_dataset(preset.name, path, "train", class_to_idx)  # untransformed images
    test = _split_dataset(preset.name, path, "val", class_to_idx, transform=eval_tf)
    n_train = len(train_all)
    if isinstance(holdout, bool) or not isinstance(holdout, int) or not 0 < holdout < n_train:
        raise UserError(f"data.{preset.holdout_key} must be an integer in [1, {n_train - 1}] "
                        f"(train/ has {n_train} images), got {holdout!r}")

    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = order[:holdout].tolist(), order[holdout:].tolist()
    splits = Splits(
        name=preset.name,
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


def register_image_folder(preset: FolderPreset) -> FolderPreset:
    """Register ``preset`` as a dataset taking its own options."""
    register_dataset(preset.name, preset.options())(functools.partial(build_image_folder, preset))
    return preset


IMAGEFOLDER = register_image_folder(FolderPreset(
    name="imagefolder",
    path_key="image_folder",
    env_var="MANIDP_IMAGE_FOLDER",
    folder="the dataset folder",
    path_help="imagefolder's root (train/, val/, one subfolder per class); null: env MANIDP_IMAGE_FOLDER",
    holdout_key="val_holdout",
    holdout=10000,
    holdout_help="validation images carved from imagefolder's train/",
))
