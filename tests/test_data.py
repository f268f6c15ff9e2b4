"""Dataset builders: digits-c generation, caching and splits; CIFAR / ImageNet errors.

Every test passes its own ``cache_dir`` so nothing touches ``~/.cache``.
"""
from __future__ import annotations

import os
import pickle
import stat
import urllib.error
from pathlib import Path

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset
from torchvision import datasets

from manidp.data import DATASETS, build_dataset
from manidp.data import digits_c
from manidp.errors import UserError

SPLITS = ("train", "val", "test")
EXPECTED_SIZES = {"train": 5172, "val": 576, "test": 1440}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_cache")


@pytest.fixture(scope="module")
def digits(cache_dir):
    return build_dataset("digits-c", {"cache_dir": str(cache_dir)})


@pytest.fixture(scope="module")
def raw(cache_dir, digits):
    data, _, hit = digits_c.digits_c_tensors({"cache_dir": str(cache_dir)})
    assert hit
    return data


def _tensors(splits):
    return {s: getattr(splits, s).tensors + (splits.severity[s],) for s in SPLITS}


def _assert_same(a, b):
    for s in SPLITS:
        for x, y in zip(_tensors(a)[s], _tensors(b)[s]):
            assert torch.equal(x, y)


def test_registry_lists_all_datasets():
    assert DATASETS.names() == ["cifar10", "cifar100", "digits-c", "imagefolder", "imagenet"]


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UserError, match="unknown dataset 'mnist'") as err:
        build_dataset("mnist", {})
    for name in DATASETS.names():
        assert name in str(err.value)


def test_digits_c_shapes_and_dtypes(digits):
    assert digits.name == "digits-c"
    assert digits.num_classes == 10 and digits.input_size == (1, 16, 16)
    assert digits.info["sizes"] == EXPECTED_SIZES
    assert digits.info["source_digits"] == {"train": 1293, "val": 144, "test": 360}
    for s in SPLITS:
        ds = getattr(digits, s)
        images, labels = ds.tensors
        assert isinstance(ds, TensorDataset)
        assert images.shape == (EXPECTED_SIZES[s], 1, 16, 16) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and set(labels.unique().tolist()) == set(range(10))
        assert digits.severity[s].dtype == torch.int64 and len(digits.severity[s]) == len(ds)
        image, label = ds[0]
        assert image.shape == (1, 16, 16) and label.dtype == torch.int64
    train = digits.train.tensors[0]
    assert abs(train.mean().item()) < 1e-4 and abs(train.std().item() - 1) < 1e-4


def test_digits_c_severities_cover_every_level(digits):
    for s in SPLITS:
        assert set(digits.severity[s].unique().tolist()) == {0, 1, 2, 3, 4}


def test_digits_c_severity_zero_is_the_clean_digit(digits, raw):
    clean = torch.tensor(load_digits().images, dtype=torch.float32).div(16).unsqueeze(1)
    clean = F.interpolate(clean, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    norm = digits.info["normalization"]
    expected = (clean[raw["test_source"]] - norm["mean"]) / norm["std"]
    diff = (raw["test_images"] - expected).abs().flatten(1).amax(1)
    zero = raw["test_severity"] == 0
    assert (diff[zero] < 1e-5).all()
    assert (diff[~zero] > 0.1).all()


def test_digits_c_splits_disjoint_by_source_digit(raw):
    sources = {s: set(raw[f"{s}_source"].tolist()) for s in SPLITS}
    assert not sources["train"] & sources["val"]
    assert not sources["train"] & sources["test"]
    assert not sources["val"] & sources["test"]
    assert set().union(*sources.values()) == set(range(1797))
    for s in SPLITS:  # every source digit has exactly its copies in its split
        assert set(torch.bincount(raw[f"{s}_source"]).unique().tolist()) <= {0, digits_c.COPIES[s]}
    # test sources are a stratified 20% of each class
    labels = torch.tensor(load_digits().target)
    held = torch.tensor(sorted(sources["test"]))
    frac = torch.bincount(labels[held], minlength=10) / torch.bincount(labels, minlength=10)
    assert ((frac - 0.2).abs() < 0.01).all()


def test_digits_c_deterministic_and_cached(tmp_path, digits):
    first = build_dataset("digits-c", {"cache_dir": str(tmp_path)})
    assert first.info["cache_hit"] is False
    second = build_dataset("digits-c", {"cache_dir": str(tmp_path)}, seed=7)
    assert second.info["cache_hit"] is True
    assert [p.name for p in tmp_path.iterdir()] == [first.info["cache_path"].split("/")[-1]]
    _assert_same(first, second)
    _assert_same(first, digits)  # regenerated from scratch in another dir: identical


def test_digits_c_seed_changes_the_data(tmp_path, digits):
    other = build_dataset("digits-c", {"cache_dir": str(tmp_path), "digits_c_seed": 1})
    assert other.info["cache_path"] != digits.info["cache_path"]
    assert not torch.equal(other.test.tensors[0], digits.test.tensors[0])


def test_digits_c_corrupt_cache_is_regenerated(tmp_path, digits):
    path = tmp_path / digits.info["cache_path"].split("/")[-1]
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="regenerating"):
        rebuilt = build_dataset("digits-c", {"cache_dir": str(tmp_path)})
    assert rebuilt.info["cache_hit"] is False
    _assert_same(rebuilt, digits)
    assert build_dataset("digits-c", {"cache_dir": str(tmp_path)}).info["cache_hit"] is True


def test_digits_c_bit_flipped_cache_is_rebuilt(tmp_path, digits):
    """16 flipped pixels leave a loadable file: the stored checksum catches them."""
    first = build_dataset("digits-c", {"cache_dir": str(tmp_path)})
    path = Path(first.info["cache_path"])
    data = torch.load(path, weights_only=True)
    flat = data["test_images"].view(-1)
    flat[:16] = -flat[:16] + 1.0
    torch.save(data, path)
    assert torch.load(path, weights_only=True)["checksum"] == data["checksum"]  # still a valid file
    with pytest.warns(UserWarning, match="do not match the checksum"):
        rebuilt = build_dataset("digits-c", {"cache_dir": str(tmp_path)})
    assert rebuilt.info["cache_hit"] is False
    _assert_same(rebuilt, digits)
    assert build_dataset("digits-c", {"cache_dir": str(tmp_path)}).info["cache_hit"] is True


def test_digits_c_cache_file_mode_follows_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        splits = build_dataset("digits-c", {"cache_dir": str(tmp_path), "max_train": 4, "max_eval": 4})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(Path(splits.info["cache_path"]).stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [Path(splits.info["cache_path"]).name]  # no temp file left


def test_digits_c_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MANIDP_CACHE", str(tmp_path))
    splits = build_dataset("digits-c", {"max_train": 4, "max_eval": 4})
    assert splits.info["cache_path"].startswith(str(tmp_path))


def test_max_train_and_max_eval_take_the_first_samples(cache_dir, digits):
    small = build_dataset("digits-c", {"cache_dir": str(cache_dir), "max_train": 100,
                                       "max_eval": 30})
    assert small.info["sizes"] == {"train": 100, "val": 30, "test": 30}
    for s, n in (("train", 100), ("val", 30), ("test", 30)):
        assert len(getattr(small, s)) == n and len(small.severity[s]) == n
        for x, y in zip(_tensors(small)[s], _tensors(digits)[s]):
            assert torch.equal(x, y[:n])
    only_train = build_dataset("digits-c", {"cache_dir": str(cache_dir), "max_train": 10})
    assert len(only_train.train) == 10 and len(only_train.test) == EXPECTED_SIZES["test"]


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True])
def test_bad_limit_is_a_user_error(cache_dir, bad):
    with pytest.raises(UserError, match="data.max_eval"):
        build_dataset("digits-c", {"cache_dir": str(cache_dir), "max_eval": bad})


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_files_names_root_and_download(tmp_path, name):
    with pytest.raises(UserError, match="data.root") as err:
        build_dataset(name, {"root": str(tmp_path / "nowhere")})
    assert "data.download: true" in str(err.value)


def test_cifar_failed_download_is_a_user_error(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(datasets.CIFAR10, "download", offline)
    with pytest.raises(UserError, match="downloading cifar10 .* failed"):
        build_dataset("cifar10", {"root": str(tmp_path), "download": True})


@pytest.mark.parametrize("download, expected", [(False, "cifar100 not found under datasets.cifar100.data.root"),
                                                 (True, "downloading cifar100 into datasets.cifar100.data.root")])
def test_cifar_fetch_names_the_workflow_keys(tmp_path, monkeypatch, download, expected):
    """fetch() is the workflow's one download (rule check_data): its errors name the workflow's config keys."""
    from manidp.data.torchvision_sets import fetch

    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(datasets.CIFAR100, "download", offline)
    with pytest.raises(UserError, match=expected):
        fetch("cifar100", {"root": str(tmp_path), "download": download}, keys="datasets.cifar100.data.")


def test_cifar10_splits_from_fake_files(tmp_path, monkeypatch):
    """The real files cannot be downloaded here: write tiny look-alikes, skip the md5 check."""
    folder = tmp_path / datasets.CIFAR10.base_folder
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f, 1010) for f, _ in datasets.CIFAR10.train_list] + [("test_batch", 20)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(datasets.cifar, "check_integrity", lambda *args: True)

    from manidp.data.torchvision_sets import fetch

    assert fetch("cifar10", {"root": str(tmp_path), "download": True}) == folder  # found: nothing downloaded
    splits = build_dataset("cifar10", {"root": str(tmp_path)})
    assert splits.info["sizes"] == {"train": 50, "val": 5000, "test": 20}
    assert splits.num_classes == 10 and splits.input_size == (3, 32, 32)
    assert not set(splits.train.indices) & set(splits.val.indices)
    assert torch.equal(splits.val[0][0], splits.val[0][0])  # eval transform: no randomness
    assert splits.train[0][0].shape == splits.test[0][0].shape == (3, 32, 32)
    again = build_dataset("cifar10", {"root": str(tmp_path)}, seed=5)
    assert again.val.indices == splits.val.indices
    small = build_dataset("cifar10", {"root": str(tmp_path), "max_train": 7, "max_eval": 3})
    assert small.info["sizes"] == {"train": 7, "val": 3, "test": 3}


def _fake_imagenet(root, classes=("n01", "n02"), train_per_class=3, val_per_class=2):
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40 + 10 * i, 30), (80 * c, 20 * i, 200)).save(folder / f"{i}.png")
    return root


def test_imagenet_without_path_names_key_and_env(monkeypatch):
    monkeypatch.delenv("MANIDP_IMAGENET", raising=False)
    with pytest.raises(UserError, match="data.imagenet_path") as err:
        build_dataset("imagenet", {})
    assert "MANIDP_IMAGENET" in str(err.value)


def test_imagenet_missing_folder(tmp_path):
    with pytest.raises(UserError, match="data.imagenet_path.*not an existing folder"):
        build_dataset("imagenet", {"imagenet_path": str(tmp_path / "absent")})


def test_imagenet_without_train_and_val(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match="has no train/ and no val/ .*found: images/"):
        build_dataset("imagenet", {"imagenet_path": str(tmp_path)})


def test_imagenet_flat_val_folder(tmp_path):
    _fake_imagenet(tmp_path, val_per_class=0)
    for d in (tmp_path / "val").iterdir():
        d.rmdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(UserError, match="no class subfolders .*ILSVRC2012_val_0+1.JPEG") as err:
        build_dataset("imagenet", {"imagenet_path": str(tmp_path)})
    assert "data.imagenet_path" in str(err.value)


def test_imagenet_fake_tree_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("MANIDP_IMAGENET", str(_fake_imagenet(tmp_path)))
    splits = build_dataset("imagenet", {"imagenet_val_holdout": 2})
    assert splits.input_size == (3, 224, 224) and splits.num_classes == 2
    assert splits.info["sizes"] == {"train": 4, "val": 2, "test": 4}
    for s in SPLITS:
        image, label = getattr(splits, s)[0]
        assert image.shape == (3, 224, 224) and image.dtype == torch.float32
        assert label in (0, 1)
    assert sorted(splits.test[i][1] for i in range(4)) == [0, 0, 1, 1]
    again = build_dataset("imagenet", {"imagenet_val_holdout": 2})
    assert again.val.indices == splits.val.indices
    with pytest.raises(UserError, match="data.imagenet_val_holdout"):
        build_dataset("imagenet", {"imagenet_val_holdout": 6})


def _ilsvrc(root, counts=None, fmt="JPEG"):
    """train/ and val/ with class folders n00, n01, n02 of small images; ``counts`` maps
    'split/class' to a number of images other than the default (3 in train, 2 in val)."""
    counts = counts or {}
    for split, default in (("train", 3), ("val", 2)):
        for c in range(3):
            folder = root / split / f"n0{c}"
            folder.mkdir(parents=True)
            for i in range(counts.get(f"{split}/n0{c}", default)):
                Image.new("RGB", (32, 24), (90 * c, 40 * i, 120)).save(folder / f"{i}.{fmt}")
    return root


def test_imagenet_empty_train_class_folder_is_named(tmp_path):
    """An empty train/n00 used to give a 3-output head while timm labelled 2 classes (indices shifted)."""
    _ilsvrc(tmp_path, {"train/n00": 0})
    with pytest.raises(UserError, match="holds no image file") as err:
        build_dataset("imagenet", {"imagenet_path": str(tmp_path), "imagenet_val_holdout": 1})
    assert f"'{tmp_path / 'train' / 'n00'}'" in str(err.value) and "\n" not in str(err.value)


def test_imagenet_empty_val_class_folder_is_named(tmp_path):
    _ilsvrc(tmp_path, {"val/n02": 0})
    with pytest.raises(UserError, match="holds no image file") as err:
        build_dataset("imagenet", {"imagenet_path": str(tmp_path), "imagenet_val_holdout": 1})
    assert f"'{tmp_path / 'val' / 'n02'}'" in str(err.value)


def test_imagenet_val_class_missing_from_train_is_named(tmp_path):
    _ilsvrc(tmp_path)
    (tmp_path / "val" / "n07").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "n07" / "0.JPEG")
    with pytest.raises(UserError, match="no folder of the same name") as err:
        build_dataset("imagenet", {"imagenet_path": str(tmp_path), "imagenet_val_holdout": 1})
    assert f"'{tmp_path / 'val' / 'n07'}'" in str(err.value)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_imagenet_truncated_image_is_an_error_naming_the_file(tmp_path):
    """timm would return the next sample (and its label) in its place, logging only "Skipped sample"."""
    _ilsvrc(tmp_path)
    bad = tmp_path / "val" / "n01" / "1.JPEG"
    _truncate(bad)
    splits = build_dataset("imagenet", {"imagenet_path": str(tmp_path), "imagenet_val_holdout": 2})
    index = next(i for i, (f, _) in enumerate(splits.test.reader.samples) if f == str(bad))
    with pytest.raises(UserError, match="cannot read image") as err:
        splits.test[index]
    assert f"'{bad}'" in str(err.value)


def test_imagenet_unreadable_image_in_a_loader_worker_is_one_line(tmp_path):
    """torch re-raises a worker's error with the worker's whole traceback as its message; still one line."""
    from torch.utils.data import DataLoader

    _ilsvrc(tmp_path)
    bad = tmp_path / "train" / "n02" / "0.JPEG"
    bad.write_bytes(b"not an image")
    splits = build_dataset("imagenet", {"imagenet_path": str(tmp_path), "imagenet_val_holdout": 1})
    with pytest.raises(UserError, match="cannot read image") as err:
        for _ in DataLoader(splits.train, batch_size=2, num_workers=1):
            pass
    message = str(err.value)
    assert f"'{bad}'" in message and "\n" not in message and "Traceback" not in message, message


def test_digits_c_training_augmentation_warps_training_images_only(cache_dir, digits):
    """data.augment_*: a fresh rotation/shift per read of a training image (reproducible under the seed,
    batched through the loader), validation and test untouched; 0 = off; bad values and other datasets
    are refused with the key named."""
    from torch.utils.data import DataLoader

    cfg = {"cache_dir": str(cache_dir), "augment_rotation_deg": 15, "augment_shift_px": 2}
    aug = build_dataset("digits-c", cfg)
    assert isinstance(aug.train, digits_c.Augmented) and aug.info["augment"] == {"rotation_deg": 15.0,
                                                                                 "shift_px": 2.0}
    for split in ("val", "test"):
        assert torch.equal(getattr(aug, split).tensors[0], getattr(digits, split).tensors[0])
    clean, label = digits.train[3]
    torch.manual_seed(0)
    first, first_label = aug.train[3]
    second, _ = aug.train[3]
    torch.manual_seed(0)
    again, _ = aug.train[3]
    assert first_label == label and first.shape == clean.shape
    assert not torch.equal(first, clean) and not torch.equal(first, second) and torch.equal(first, again)
    # The warp acts on the [0, 1] image: the background stays background (no value below it appears).
    background = (0 - digits.info["normalization"]["mean"]) / digits.info["normalization"]["std"]
    assert first.min() >= background - 1e-5
    torch.manual_seed(1)
    images, labels = next(iter(DataLoader(aug.train, batch_size=8)))
    assert images.shape == (8, 1, 16, 16) and torch.equal(labels, digits.train.tensors[1][:8])
    assert isinstance(build_dataset("digits-c", {**cfg, "augment_rotation_deg": 0, "augment_shift_px": 0}).train,
                      TensorDataset)
    with pytest.raises(UserError, match="data.augment_shift_px"):
        build_dataset("digits-c", {**cfg, "augment_shift_px": -1})
    with pytest.raises(UserError, match="digits-c only"):
        build_dataset("cifar10", {"augment_rotation_deg": 10})
