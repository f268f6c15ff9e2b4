"""The generic ``imagefolder`` dataset, on a tiny tree of 8x8 PNGs; ``imagenet`` is the same builder."""
import pytest
import torch
from PIL import Image

from manidp.data import build_dataset
from manidp.errors import UserError

CLASSES = ("cat", "dog", "owl")  # one folder per class, in train/ and in val/


def _tree(root, train_per_class=4, val_per_class=2):
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (100 * c, 30 * i, 50)).save(folder / f"{i}.png")
    return root


def test_a_tiny_tree_gives_labelled_disjoint_splits(tmp_path):
    cfg = {"image_folder": str(_tree(tmp_path)), "image_size": 8, "val_holdout": 3}
    splits = build_dataset("imagefolder", cfg)
    assert splits.name == "imagefolder" and splits.num_classes == 3 and splits.input_size == (3, 8, 8)
    assert splits.info["sizes"] == {"train": 9, "val": 3, "test": 6}
    # Labels follow the class folders' sorted names, the same in every split.
    samples = splits.test.reader.samples
    assert [(path.split("/")[-2], label) for path, label in samples] == [(c, i) for i, c in enumerate(CLASSES)
                                                                         for _ in range(2)]
    train_labels = [label for _, label in splits.train.base.reader.samples]
    assert sorted(train_labels) == [0] * 4 + [1] * 4 + [2] * 4
    assert not set(splits.train.indices) & set(splits.val.indices)
    assert sorted(splits.train.indices + splits.val.indices) == list(range(12))
    for split in ("train", "val", "test"):
        image, label = getattr(splits, split)[0]
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label in (0, 1, 2)
    assert torch.equal(splits.val[0][0], splits.val[0][0])  # eval transform: no randomness
    again = build_dataset("imagefolder", cfg, seed=7)  # the training seed never moves the holdout
    assert again.val.indices == splits.val.indices
    assert build_dataset("imagefolder", {**cfg, "split_seed": 1}).val.indices != splits.val.indices
    small = build_dataset("imagefolder", {**cfg, "max_train": 2, "max_eval": 1})
    assert small.info["sizes"] == {"train": 2, "val": 1, "test": 1}


def test_the_folder_can_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MANIDP_IMAGE_FOLDER", str(_tree(tmp_path)))
    assert build_dataset("imagefolder", {"image_size": 8, "val_holdout": 2}).info["path"] == str(tmp_path)


def test_imagenet_is_the_same_builder_under_its_own_keys(tmp_path):
    _tree(tmp_path)
    generic = build_dataset("imagefolder", {"image_folder": str(tmp_path), "image_size": 8, "val_holdout": 3})
    preset = build_dataset("imagenet", {"imagenet_path": str(tmp_path), "image_size": 8, "imagenet_val_holdout": 3})
    assert preset.name == "imagenet"
    assert (preset.train.indices, preset.val.indices) == (generic.train.indices, generic.val.indices)
    assert preset.test.reader.samples == generic.test.reader.samples
    assert preset.info == generic.info


def test_a_bad_layout_is_one_message_naming_the_dataset_key_and_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("MANIDP_IMAGE_FOLDER", raising=False)
    with pytest.raises(UserError) as err:
        build_dataset("imagefolder", {})
    assert str(err.value) == ("imagefolder: neither data.image_folder nor MANIDP_IMAGE_FOLDER is set; set "
                              "data.image_folder (or the env var MANIDP_IMAGE_FOLDER) to the dataset folder that "
                              "holds train/ and val/, each with one subfolder per class")
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match=r"^imagefolder: '.*' \(data.image_folder / MANIDP_IMAGE_FOLDER\) has no "
                                        r"val/ \(found: train/\); set data.image_folder"):
        build_dataset("imagefolder", {"image_folder": str(tmp_path)})


def test_the_holdout_must_leave_training_images(tmp_path):
    with pytest.raises(UserError, match=r"data.val_holdout must be an integer in \[1, 11\] \(train/ has 12 "
                                        r"images\), got 10000"):
        build_dataset("imagefolder", {"image_folder": str(_tree(tmp_path)), "image_size": 8})
