"""Datasets: a registry of builders that each return train/val/test :class:`Splits` and declare their options.

Importing this package registers every dataset: ``digits-c`` (the embedded
default benchmark), ``cifar10``/``cifar100`` (torchvision), ``imagefolder`` (any
folder in ImageFolder layout, loaded with timm) and ``imagenet`` (a preset of it).
Use ``build_dataset(name, data_cfg)``; ``DATASETS.get(name).options`` lists the
``data.*`` keys a dataset takes.
"""
from manidp.data._registry import (DATASETS, SHARED_OPTIONS, Option, Splits, all_options, build_dataset,
                                   register_dataset)
from manidp.data import digits_c, image_folder, imagenet, torchvision_sets  # noqa: F401  (registration)

__all__ = ["DATASETS", "SHARED_OPTIONS", "Option", "Splits", "all_options", "build_dataset", "register_dataset"]
