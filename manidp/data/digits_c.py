"""``digits-c``: corrupted handwritten digits, the embedded default benchmark.

Clean 8x8 digits are too easy (a small CNN all but saturates them) to separate pruning
methods, and they carry no notion of difficulty. digits-c takes the 1,797 real
digits that ship inside scikit-learn (no download), upsamples them to 16x16 and
makes several corrupted copies of each, every copy with its own severity 0..4
(0 = clean). Accuracy falls as severity rises, so the per-image severity lets
the benchmark ask whether a dynamic method spends less compute on easy images.

Splits are by *source digit*: 20% of the digits (stratified by class) are held
out and only their copies form the test set; 10% of the remaining digits form
validation; no source digit appears in two splits. Everything is drawn from one
``torch.Generator`` seeded by ``data.digits_c_seed`` (default 0), never by the
training seed, so every training seed sees the same data. The generated tensors
are cached in one ``.pt`` file named by a hash of the generation parameters,
holding a SHA-256 checksum of its tensors: a damaged cache (even one that still
loads) is rebuilt.
See ``manidp/data/README.md`` for the dataset card.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from manidp._files import atomic_save
from manidp.data._registry import Option, Splits, register_dataset
from manidp.data._subset import limit_splits
from manidp.errors import UserError

FORMAT_VERSION = 1
IMAGE_SIZE = 16
SOURCE_TEST_FRACTION = 0.2
VAL_FRACTION = 0.1
COPIES = {"train": 4, "val": 4, "test": 4}
SPLITS = ("train", "val", "test")
_AUGMENT = {"type": "number", "minimum": 0}
OPTIONS = {
    "digits_c_seed": Option(0, "seed that generates digits-c (whatever the run's seed)",
                            {"type": "integer", "minimum": 0}),
    "cache_dir": Option(None, "digits-c cache; null: env MANIDP_CACHE, else ~/.cache/manidp",
                        {"type": ["string", "null"], "pattern": "\\S"}),
    "augment_rotation_deg": Option(0, "digits-c training images: random rotation within +-N degrees (0: off)",
                                   _AUGMENT),
    "augment_shift_px": Option(0, "digits-c training images: random shift within +-N pixels per axis (0: off)",
                               _AUGMENT),
}


@dataclass(frozen=True)
class Corruption:
    """Corruption strength at one severity level.

    One affine warp (rotation, zoom, shift), then an occluding patch, then
    additive Gaussian noise, then clamping to [0, 1].
    """

    rotation_deg: float  # |angle| uniform in [rotation/2, rotation], random sign
    zoom: float  # zoom factor uniform in [1 - zoom, 1 + zoom]
    shift_px: float  # shift per axis uniform in [-shift, shift] pixels
    noise_std: float  # std of additive Gaussian pixel noise
    occlusion_px: int  # side of a square patch set to 0 at a random place (0 = none)


CORRUPTIONS = (
    Corruption(rotation_deg=0.0, zoom=0.00, shift_px=0.0, noise_std=0.00, occlusion_px=0),
    Corruption(rotation_deg=8.0, zoom=0.05, shift_px=0.5, noise_std=0.06, occlusion_px=0),
    Corruption(rotation_deg=18.0, zoom=0.10, shift_px=1.0, noise_std=0.13, occlusion_px=3),
    Corruption(rotation_deg=26.0, zoom=0.15, shift_px=1.5, noise_std=0.20, occlusion_px=4),
    Corruption(rotation_deg=36.0, zoom=0.20, shift_px=2.0, noise_std=0.30, occlusion_px=6),
)
SEVERITIES = len(CORRUPTIONS)


def generation_params(digits_c_seed: int) -> dict:
    """Everything that determines the generated tensors (hashed into the cache name)."""
    return {
        "format_version": FORMAT_VERSION,
        "digits_c_seed": digits_c_seed,
        "image_size": IMAGE_SIZE,
        "source_test_fraction": SOURCE_TEST_FRACTION,
        "val_fraction": VAL_FRACTION,
        "copies": dict(COPIES),
        "corruptions": [asdict(c) for c in CORRUPTIONS],
    }


def _stratified_split(indices: torch.Tensor, labels: torch.Tensor, fraction: float,
                      gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``indices`` into (kept, held out), holding out ``fraction`` of each class.

    Like scikit-learn, ``ceil(fraction * n)`` samples are held out in total; they
    are shared among classes by largest remainder of their exact quotas.
    """
    classes = labels[indices]
    quota = fraction * torch.bincount(classes).double()
    n_held = quota.floor().long()
    spare = math.ceil(fraction * len(indices)) - int(n_held.sum())
    n_held[torch.argsort(quota - n_held, descending=True, stable=True)[:spare]] += 1
    kept, held = [], []
    for c, k in enumerate(n_held.tolist()):
        members = indices[classes == c]
        members = members[torch.randperm(len(members), generator=gen)]
        held.append(members[:k])
        kept.append(members[k:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def _corrupt(images: torch.Tensor, severity: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Apply the corruption of each image's severity; images are [N,1,S,S] in [0,1]."""
    n, size = len(images), images.shape[-1]
    table = torch.tensor([[c.rotation_deg, c.zoom, c.shift_px, c.noise_std, c.occlusion_px]
                          for c in CORRUPTIONS], dtype=torch.float32)[severity]
    rotation, zoom, shift, noise_std, patch = table.unbind(1)

    sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    angle = sign * rotation * (0.5 + 0.5 * torch.rand(n, generator=gen)) * (math.pi / 180)
    scale = 1 + zoom * (2 * torch.rand(n, generator=gen) - 1)
    offset = shift[:, None] * (2 * torch.rand(n, 2, generator=gen) - 1) * (2 / size)
    # theta maps output coordinates to input coordinates, so dividing by the
    # zoom factor magnifies (scale > 1) or shrinks (scale < 1) the digit.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1),
                         torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    top = (torch.rand(n, generator=gen) * (size - patch + 1)).floor()
    left = (torch.rand(n, generator=gen) * (size - patch + 1)).floor()
    pos = torch.arange(size, dtype=torch.float32)
    rows = (pos >= top[:, None]) & (pos < (top + patch)[:, None])
    cols = (pos >= left[:, None]) & (pos < (left + patch)[:, None])
    out = out.masked_fill((rows[:, :, None] & cols[:, None, :])[:, None], 0.0)

    out = out + noise_std[:, None, None, None] * torch.randn(out.shape, generator=gen)
    return out.clamp_(0.0, 1.0)


def _generate(params: dict) -> dict:
    """Build all digits-c tensors from scratch (deterministic in ``params``)."""
    from sklearn.datasets import load_digits  # a slow import: only when the cache is (re)built

    digits = load_digits()
    clean = torch.tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    clean = F.interpolate(clean, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                          align_corners=False).clamp_(0.0, 1.0)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(params["digits_c_seed"])

    train_src, test_src = _stratified_split(torch.arange(len(labels)), labels,
                                            SOURCE_TEST_FRACTION, gen)
    train_src, val_src = _stratified_split(train_src, labels, VAL_FRACTION, gen)

    out: dict = {"params": params}
    for split, sources in zip(SPLITS, (train_src, val_src, test_src)):
        source = sources.repeat_interleave(COPIES[split])
        source = source[torch.randperm(len(source), generator=gen)]  # first N is a fair sample
        severity = torch.randint(0, SEVERITIES, (len(source),), generator=gen)
        out[f"{split}_images"] = _corrupt(clean[source], severity, gen)
        out[f"{split}_labels"] = labels[source]
        out[f"{split}_severity"] = severity
        out[f"{split}_source"] = source

    mean, std = out["train_images"].mean().item(), out["train_images"].std().item()
    for split in SPLITS:
        out[f"{split}_images"] = (out[f"{split}_images"] - mean) / std
    out["mean"], out["std"] = mean, std
    return out


def _checksum(data: dict) -> str:
    """SHA-256 over every tensor and the normalization constants, in a fixed order."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for part in ("images", "labels", "severity", "source"):
            tensor = data[f"{split}_{part}"]
            digest.update(f"{split}_{part}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    digest.update(json.dumps([data["mean"], data["std"]]).encode())
    return digest.hexdigest()


def _cache_dir(data_cfg: dict) -> Path:
    root = data_cfg.get("cache_dir") or os.environ.get("MANIDP_CACHE") or "~/.cache/manidp"
    return Path(root).expanduser()


def _read_cache(path: Path, params: dict):
    """The cached tensors, or None when absent or unusable (with a warning)."""
    if not path.exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data["params"] != params:
            raise ValueError("generation parameters differ from the file name's")
        for split in SPLITS:
            for part in ("images", "labels", "severity", "source"):
                if not isinstance(data[f"{split}_{part}"], torch.Tensor):
                    raise ValueError(f"{split}_{part} is not a tensor")
        if data.get("checksum") != _checksum(data):
            raise ValueError("its contents do not match the checksum stored with them")
        return data
    except Exception as exc:  # any unreadable file is simply rebuilt
        warnings.warn(f"digits-c cache {path} is unreadable ({exc}); regenerating it",
                      stacklevel=3)
        return None


def _write_cache(path: Path, data: dict) -> None:
    """Write ``data`` with its checksum atomically; warn if the dir is not writable (the cache is optional)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({**data, "checksum": _checksum(data)}, path)
    except (OSError, UserError) as exc:
        warnings.warn(f"could not write digits-c cache {path} ({exc}); continuing uncached",
                      stacklevel=3)


def digits_c_tensors(data_cfg: dict) -> tuple[dict, Path, bool]:
    """All digits-c tensors for ``data_cfg``, from the cache when possible.

    Returns ``(data, cache_path, cache_hit)``. ``data`` holds, per split,
    ``{split}_images`` (normalized float32 [N,1,16,16]), ``{split}_labels``,
    ``{split}_severity`` and ``{split}_source`` (index of the scikit-learn source
    digit; int64 [N]), plus the train ``mean``/``std`` and the ``params``.
    """
    seed = data_cfg.get("digits_c_seed", OPTIONS["digits_c_seed"].default)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"data.digits_c_seed must be an integer, got {seed!r}")
    params = generation_params(seed)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    path = _cache_dir(data_cfg) / f"digits-c-v{FORMAT_VERSION}-{digest}.pt"
    data = _read_cache(path, params)
    if data is not None:
        return data, path, True
    data = _generate(params)
    _write_cache(path, data)
    return data, path, False


class Augmented(Dataset):
    """Training-time augmentation of normalized digits-c images: a fresh random rotation (uniform in
    +-``rotation_deg``) and shift (uniform in +-``shift_px`` per axis) each time an image is read.

    Drawn from torch's global generator, which the engine seeds with the run's seed (data-loader
    workers get their own seeded copies), so a run is reproducible. The warp acts on the [0, 1]
    image (background 0), then the image is normalized again.
    """

    def __init__(self, base: Dataset, rotation_deg: float, shift_px: float, mean: float, std: float):
        self.base, self.rotation_deg, self.shift_px = base, float(rotation_deg), float(shift_px)
        self.mean, self.std = float(mean), float(std)

    def __len__(self) -> int:
        return len(self.base)

    def _warp(self, images: torch.Tensor) -> torch.Tensor:
        n, size = len(images), images.shape[-1]
        angle = (2 * torch.rand(n) - 1) * self.rotation_deg * (math.pi / 180)
        offset = (2 * torch.rand(n, 2) - 1) * self.shift_px * (2 / size)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
        raw = images * self.std + self.mean
        grid = F.affine_grid(theta, list(raw.shape), align_corners=False)
        warped = F.grid_sample(raw, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return (warped - self.mean) / self.std

    def __getitem__(self, index):
        image, label = self.base[index]
        return self._warp(image[None])[0], label

    def __getitems__(self, indices: list) -> list:
        """A whole batch in one warp (the data loader asks for batches this way): one grid_sample call."""
        samples = [self.base[i] for i in indices]
        images = self._warp(torch.stack([image for image, _ in samples]))
        return [(image, label) for image, (_, label) in zip(images, samples)]


def _augmentation(data_cfg: dict) -> tuple[float, float]:
    values = []
    for key in ("augment_rotation_deg", "augment_shift_px"):
        value = data_cfg.get(key) or 0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise UserError(f"data.{key} must be a number >= 0 (0 = off), got {value!r}")
        values.append(float(value))
    return values[0], values[1]


@register_dataset("digits-c", OPTIONS)
def build_digits_c(data_cfg: dict, seed: int = 0) -> Splits:
    """Build digits-c. ``seed`` (the training seed) is deliberately unused."""
    data, path, hit = digits_c_tensors(data_cfg)
    datasets = {s: TensorDataset(data[f"{s}_images"], data[f"{s}_labels"]) for s in SPLITS}
    rotation, shift = _augmentation(data_cfg)
    if rotation or shift:
        datasets["train"] = Augmented(datasets["train"], rotation, shift, data["mean"], data["std"])
    splits = Splits(
        name="digits-c",
        **datasets,
        num_classes=10,
        input_size=(1, IMAGE_SIZE, IMAGE_SIZE),
        severity={s: data[f"{s}_severity"] for s in SPLITS},
        info={
            "sizes": {s: len(ds) for s, ds in datasets.items()},
            "source_digits": {s: int(data[f"{s}_source"].unique().numel()) for s in SPLITS},
            "normalization": {"mean": data["mean"], "std": data["std"]},
            "generation": data["params"],
            "cache_path": str(path),
            "cache_hit": hit,
            "augment": {"rotation_deg": rotation, "shift_px": shift},
        },
    )
    return limit_splits(splits, data_cfg)
