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
* ``add_channels_(out, index, z, mask, relu)``: the residual sum at the kept
  channels (``z`` scaled by its mask values) and the ReLU, in one pass.

At batch 1 on small feature maps a gate written as ATen ops is about ten
dispatches of ~1 us each, more than its arithmetic (digits-c: 18 gates
against 0.4 ms of convolutions); each of these is one dispatch and one pass
over memory. Arithmetic in fp32 (pools accumulate in fp64).

The source ships with the package and is compiled on first use with the
machine's C++ compiler (``$CXX``, else ``c++``; about 6 s), for this CPU
(``-march=native``) and against the installed torch's headers, into a cache
folder
(``$MANIDP_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/manidp/kernels``, else
``~/.cache/manidp/kernels``) under a name that hashes the source, the torch
version, the CPU's model and flags and the command, so a torch upgrade or
another kind of CPU sharing the folder gets its own build. Concurrent
processes each write to a temporary file and rename it into place.

No compiler, a failed build or ``MANIDP_FUSED_GATES=0``: :func:`load`
returns False, :func:`status` says why, and the deployed models run their
gates as ATen ops (same masks; only slower). The latency JSON records the
status (``gate_kernel``).
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

__all__ = ["load", "status", "available", "cache_dir", "SOURCE"]

SOURCE = Path(__file__).with_name("gate_scale.cpp")
_BUILD_TIMEOUT_S = 300

_state: dict[str, Optional[str]] = {"status": None}


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("MANIDP_KERNEL_CACHE"):
        return Path(os.environ["MANIDP_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "manidp" / "kernels"


def _compiler() -> Optional[str]:
    """``$CXX`` when set (None when it names no program: the user asked for that one), else the first
    of c++, g++, clang++ on the PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags (a cache folder shared by
    different machines, e.g. a cluster's home, keeps one build per kind of CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(wanted)) or platform.processor() or platform.machine()


def _command(compiler: str, output: Path) -> list[str]:
    root = Path(torch.__file__).parent  # torch.utils.cpp_extension.include_paths() without its CUDA probing
    lib, include = root / "lib", root / "include"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [compiler, "-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-isystem{include}", f"-isystem{include / 'torch' / 'csrc' / 'api' / 'include'}", str(SOURCE),
            "-o", str(output),
            f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


def _build() -> tuple[Optional[Path], str]:
    """The built library (building it when the cache lacks it), or None and why not."""
    compiler = _compiler()
    if compiler is None and os.environ.get("CXX"):
        return None, f"CXX={os.environ['CXX']} is not a program on this machine (fix or unset CXX)"
    if compiler is None:
        return None, "no C++ compiler found (set CXX, or install g++)"
    try:
        source = SOURCE.read_bytes()
    except OSError as err:
        return None, f"the kernel source is missing ({err}); reinstall the package"
    digest = hashlib.sha256(source + torch.__version__.encode() + _cpu_identity().encode()
                            + " ".join(_command(compiler, Path("out.so"))).encode()).hexdigest()[:16]
    folder = cache_dir()
    target = folder / f"gate_scale_{digest}.so"
    if _is_library(target):
        return target, "cached"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            partial = Path(tmp) / target.name
            done = subprocess.run(_command(compiler, partial), capture_output=True, text=True,
                                  timeout=_BUILD_TIMEOUT_S)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                return None, f"the build failed ({Path(compiler).name}: {last[:300]})"
            os.replace(partial, target)  # atomic: a concurrent process sees the whole file or none
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"the build failed ({err})"
    return target, "built"


def _is_library(path: Path) -> bool:
    """A cached build that looks whole (a shared object's magic bytes); anything else is rebuilt."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) in (b"\x7fELF", b"\xcf\xfa\xed\xfe")  # ELF, Mach-O
    except OSError:
        return False


def _registered() -> bool:
    try:
        torch.ops.manidp.gate_scale_  # noqa: B018 (raises when the op is not registered)
        return True
    except (AttributeError, RuntimeError):
        return False


def load() -> bool:
    """Build (once per machine and torch) and load the kernels; True when ``torch.ops.manidp.gate_scale_``
    can be called. Never raises: :func:`status` says what happened."""
    if _state["status"] is not None:
        return _state["status"].startswith("compiled")
    if os.environ.get("MANIDP_FUSED_GATES", "1").strip().lower() in ("0", "false", "no", "off"):
        _state["status"] = "off (MANIDP_FUSED_GATES=0): gates run as ATen ops"
        return False
    if _registered():
        _state["status"] = "compiled (already loaded)"
        return True
    library, how = _build()
    if library is None:
        _state["status"] = f"unavailable: {how}; gates run as ATen ops"
        return False
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as err:
        _state["status"] = (f"unavailable: loading {library} failed ({err}); delete it to rebuild; "
                            "gates run as ATen ops")
        return False
    _state["status"] = f"compiled ({how}: {library})"
    return True


def available() -> bool:
    """Whether the fused gate op can be used (loads it on first call)."""
    return load()


def status() -> str:
    """One line: 'compiled (...)', 'unavailable: why' or 'off (...)' (loads the kernels first)."""
    load()
    return _state["status"] or ""


def _reset_for_tests() -> None:
    _state["status"] = None
