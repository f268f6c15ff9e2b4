"""Compiled CPU kernels for the deployed models: one op per gate and per block glue step.

``gate_scale.cpp`` registers, in the ``torch.ops.manidp`` namespace:

* ``gate_scale_(source, target, w1t, b1, w2t, b2, relu_out, abs_pool,
  clamp_max, cut, topk)``: a whole gate (global pool of ``source``, one or two
  Linear layers, ReLU, clamp, threshold and/or top-k) and the multiply of
  ``target``'s channels by its mask, in place: the dense-then-mask path.
* ``gate_mask(source, ...)``: the same gate's mask ``[B, C]`` (fp32), pool
  included (split between threads on large maps): the gathered path.
* ``scale_pool_(y, index, mask)``: the kept channels ``y`` times their mask
  values, in place, and the ``[1, C, 1, 1]`` pool the next gate reads.
* ``scale_pool_gate(y, index, mask, keep, w1t, ...)``: ``scale_pool_`` and
  the next gate (``gate_mask``'s arguments) in one call, the result
  compacted to its first ``keep`` channels (dropping a padded kept set's
  padding) for a convolution built on the kept channels alone.
* ``add_channels_(out, index, z, mask, relu)``: the residual sum at the kept
  channels (``z`` scaled by its mask values) and the ReLU, in one pass.
* ``gather_slice(weight, rows, cols)``: ``weight[rows][:, cols]`` of an OIHW
  weight, written channels-last in one pass: the kept weights of a slice-cache
  miss, in the layout oneDNN reorders from fastest.

At batch 1 on small feature maps a gate written as ATen ops is about ten
dispatches, each costing more than its arithmetic; each of these ops is one
dispatch and one pass over memory. Arithmetic in fp32 (pools accumulate in
fp64).

Agreement with the ATen form: the same masks up to near-threshold ties (the
ops pool in fp64, ATen in fp32, so a saliency within rounding of its threshold
can fall on the other side). Under bf16 the multiply uses the mask rounded to
bf16, as the ATen form's ``mask.to(dtype)`` does, so equal masks give equal
outputs bit for bit.

The source ships with the package and is built on first use
(:mod:`~manidp.kernels._toolchain`: compiler, flags, threads) into a cache
that is trusted only as far as it must be (:mod:`~manidp.kernels._cache`:
ownership checks, SHA-256 records, one build at a time); this module loads it
and checks that the ops it registered are these.

No compiler, a failed build, a refused cache, ops that did not register, or
``MANIDP_FUSED_GATES=0``: :func:`load` returns False, :func:`status` says why
(and what to fix), and the deployed models run their gates as ATen ops (same
masks; only slower). The latency JSON records the status (``gate_kernel``).
"""
from __future__ import annotations

import functools
import os
import re
from typing import Optional

import torch

from manidp.kernels import _cache, _toolchain
from manidp.kernels._cache import cache_dir
from manidp.kernels._toolchain import SOURCE, _compiler  # noqa: F401  (_compiler: tests skip without one)

__all__ = ["load", "status", "available", "threading", "cache_dir", "SOURCE"]

OPS = ("gate_scale_", "gate_mask", "scale_pool_", "scale_pool_gate", "add_channels_", "gather_slice")

_state: dict[str, Optional[str]] = {"status": None}
# what this process dlopened: it stays loaded when the status is reset, so it is kept apart from it
_loaded: dict[str, Optional[str]] = {"library": None, "threading": None, "runtime": None}


@functools.lru_cache(maxsize=1)
def _schemas() -> dict[str, str]:
    """The ops' schemas as the source declares them (its ``m.def`` strings), normalised by torch."""
    text = SOURCE.read_text()
    schemas = {}
    for call in re.finditer(r"m\.def\(((?:\s*\"[^\"]*\")+)\s*\)", text):
        declared = "".join(re.findall(r"\"([^\"]*)\"", call.group(1)))
        schema = torch._C.parse_schema(f"manidp::{declared}")
        schemas[schema.name.split("::", 1)[1]] = str(schema)
    return schemas


def _ops_problem() -> Optional[str]:
    """None when all of OPS are registered with this source's schemas and a CPU kernel; else what is
    wrong (a library of another version or another project registered the namespace)."""
    try:
        expected = _schemas()
    except (OSError, RuntimeError) as err:
        return f"the kernel source cannot be read ({err}); reinstall the package"
    missing, other = [], []
    for name in OPS:
        try:
            schema = str(getattr(torch.ops.manidp, name).default._schema)
        except (AttributeError, RuntimeError):
            missing.append(name)
            continue
        if schema != expected.get(name) or not torch._C._dispatch_has_kernel_for_dispatch_key(
                f"manidp::{name}", "CPU"):
            other.append(name)
    if not missing and not other:
        return None
    said = [f"{', '.join(missing)} missing"] if missing else []
    said += [f"{', '.join(other)} registered with another schema or no CPU kernel"] if other else []
    return "; ".join(said)


def _registered() -> bool:
    """Whether any op of the ``manidp`` namespace is registered in this process."""
    for name in OPS:
        try:
            getattr(torch.ops.manidp, name)
            return True
        except (AttributeError, RuntimeError):
            continue
    return False


def _threading_now() -> str:
    """How the loaded ops thread, with the OpenMP runtimes this process has mapped by now."""
    runtime = _loaded["runtime"]
    if runtime is None:
        return _loaded["threading"] or ""
    runtimes = _toolchain._openmp_runtimes()
    if runtimes != [runtime]:
        return (f"openmp ({runtime}), but {len(runtimes)} OpenMP runtimes are loaded ({', '.join(runtimes)}): "
                "threads may oversubscribe; results stay race-free")
    return f"openmp ({runtime})"


def load() -> bool:
    """Build (once per machine and torch) and load the kernels; True when all of :data:`OPS` can be called.
    Never raises: :func:`status` says what happened."""
    if _state["status"] is not None:
        return _state["status"].startswith("compiled")
    if os.environ.get("MANIDP_FUSED_GATES", "1").strip().lower() in ("0", "false", "no", "off"):
        _state["status"] = "off (MANIDP_FUSED_GATES=0): gates run as ATen ops"
        return False
    if _registered():  # loaded before (this process, or something else that registered the namespace)
        problem = _ops_problem()
        if problem:
            where = f"{_loaded['library']}" if _loaded["library"] else "a library loaded before manidp.kernels"
            _state["status"] = f"unavailable: {where} registered other manidp ops ({problem}); gates run as ATen ops"
            return False
        _state["status"] = "compiled (already loaded)"
        return True
    built, why = _cache._build()
    if built is None:
        _state["status"] = f"unavailable: {why}; gates run as ATen ops"
        return False
    library, runtime = built.library, built.runtime
    try:
        # through the descriptor that was checked: the bytes loaded are the bytes hashed
        path = f"/proc/self/fd/{built.fd}" if os.path.isdir("/proc/self/fd") else str(library)
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as err:
        _state["status"] = (f"unavailable: loading {library} failed ({str(err).splitlines()[0][:300]}); delete it "
                            "to rebuild; gates run as ATen ops")
        return False
    finally:
        os.close(built.fd)
    _loaded["library"] = str(library)
    problem = _ops_problem()
    if problem:
        _state["status"] = (f"unavailable: {library} loaded but its ops are not these ({problem}); delete it and "
                            f"its {_cache._RECORD_SUFFIX} record to rebuild; gates run as ATen ops")
        return False
    _loaded.update(runtime=runtime, threading=f"openmp ({runtime})" if runtime else f"serial ({built.serial})")
    _state["status"] = f"compiled ({built.how}: {library}; {'openmp' if runtime else 'serial'})"
    return True


def available() -> bool:
    """Whether the fused gate op can be used (loads it on first call)."""
    return load()


def status() -> str:
    """One line: 'compiled (...)', 'unavailable: why' or 'off (...)' (loads the kernels first)."""
    load()
    return _state["status"] or ""


def threading() -> str:
    """How the compiled ops split their work now: 'openmp (runtime), N threads', 'serial (why)', or
    'not loaded (...)' when the gates run as ATen ops (loads the kernels first). For the latency JSON,
    read under the thread count being timed."""
    if not load():
        return f"not loaded ({status()})"
    if _loaded["threading"] is None:
        return "unknown (the ops were loaded before manidp.kernels could see how they were built)"
    mode = _threading_now()
    n = torch.get_num_threads()
    return f"{mode}, {n} thread{'' if n == 1 else 's'}" if mode.startswith("openmp") else mode


def _reset_for_tests() -> None:
    _state["status"] = None
