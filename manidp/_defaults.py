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
