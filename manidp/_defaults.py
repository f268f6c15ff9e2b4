"""User-facing defaults that the command line shows before any heavy import.

They live here, not beside the code that uses them, so that ``manidp --help``
and the commands that never touch a model (tables, plots, tracking) start
without importing torch and timm.
"""
from __future__ import annotations

# Memory cap of the deployed form's weight-slice cache (manidp.gating.slices).
DEFAULT_SLICE_CACHE_MB = 256.0
# The dtypes `manidp latency` times (manidp.latency.DTYPES maps them to torch dtypes).
DTYPE_NAMES = ("fp32", "bf16")

# The registries' built-in names, for the workflow's parse-time check (manidp.plan), which runs at every
# `snakemake` call and would otherwise import torch and timm to build the registries.
# tests/test_plan.py (test_the_parse_time_names_are_the_registries) holds them equal to the registries.
DATASET_NAMES = ("cifar10", "cifar100", "digits-c", "imagefolder", "imagenet")
# The entry-point group methods register through (manidp.methods.load_all reads it).
METHODS_ENTRY_POINT_GROUP = "manidp.methods"
# The backbones this benchmark tests (manidp.models re-exports them); any other timm name works too.
BENCHMARK_BACKBONES = (
    "cifar_resnet20", "cifar_resnet32", "cifar_resnet56", "cifar_resnet110",
    "resnet18", "resnet34", "resnet50", "mobilenetv2_100",
)
