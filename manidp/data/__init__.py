"""Datasets: a registry of builders that each return train/val/test :class:`Splits`.

Importing this package registers every dataset: ``digits-c`` (the embedded
default benchmark), ``cifar10``/``cifar100`` (torchvision) and ``imagenet``
(ImageFolder layout, loaded with timm). Use ``build_dataset(name, data_cfg)``.
"""
from manidp.data._registry import DATASETS, Splits, build_dataset, register_dataset
from manidp.data import digits_c, imagenet, torchvision_sets  # noqa: F401  (registration)

__all__ = ["DATASETS", "Splits", "build_dataset", "register_dataset"]
