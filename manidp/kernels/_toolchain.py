"""How the ops are compiled on this machine: compiler, flags, OpenMP, and the build's identity.

Building: the source ships with the package and is compiled on first use with
the machine's C++ compiler (``$CXX``, a command with arguments allowed, e.g.
``ccache g++``; else ``c++``; a few seconds), for this CPU (``-march=native``),
in the C++ standard the installed torch's headers need, into a cache folder
(``$MANIDP_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/manidp/kernels``, else
``~/.cache/manidp/kernels``) under a name that hashes the source, the torch
version, the CPU's model and flags, the compiler's version, libc, the platform
and the commands, so a torch or compiler upgrade or another kind of CPU
sharing the folder gets its own build.

Threads (:func:`manidp.kernels.threading`): ``at::parallel_for`` in an extension is a serial
loop unless the extension is compiled with OpenMP, so where torch's parallel
backend is OpenMP and the compiler is GCC the ops are built with ``-fopenmp``
and linked against the OpenMP runtime torch itself loaded (its own libgomp),
never a second one: two runtimes in a process each keep their own thread pool
and thread numbers. Elsewhere (clang, macOS, torch's native backend) the ops
are built serial and say so. Either way each reduction has one partial per
fixed chunk of work, so results are race-free and independent of the thread
count.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("gate_scale.cpp")


def _compiler() -> Optional[list[str]]:
    """The compiler command: ``$CXX`` split as a shell would (it may be ``ccache g++``; None when its first
    word names no program: the user asked for that one), else the first of c++, g++, clang++ on the PATH."""
    if os.environ.get("CXX", "").strip():
        try:
            words = shlex.split(os.environ["CXX"])
        except ValueError:
            return None
        program = shutil.which(words[0]) if words else None
        return [program, *words[1:]] if program else None
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return [shutil.which(name)]
    return None


@functools.lru_cache(maxsize=8)
def _compiler_version(command: tuple[str, ...]) -> str:
    """``$CXX --version``: a compiler upgrade (or a switch from GCC to clang) gets its own build."""
    try:
        done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
        return done.stdout.strip() or f"(no version: exit {done.returncode})"
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"(no version: {err})"


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags (a cache folder shared by
    different machines, e.g. a cluster's home, keeps one build per kind of CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(wanted)) or platform.processor() or platform.machine()


def _standard() -> str:
    """The C++ standard the installed torch's headers need: torch 2.14 made C++20 a hard requirement
    (its headers #error under C++17); older ones compile as C++17, which compilers without C++20 accept."""
    try:
        major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    except ValueError:
        return "c++20"
    return "c++20" if (major, minor) >= (2, 14) else "c++17"


def _openmp_runtimes() -> list[str]:
    """The OpenMP runtimes mapped into this process (libgomp, libomp, libiomp5), by real path."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = {fields[5] for fields in (line.split(None, 5) for line in maps.splitlines()) if len(fields) == 6}
    return sorted({os.path.realpath(path) for path in paths
                   if os.path.basename(path).startswith(("libgomp", "libomp", "libiomp"))})


def _openmp(compiler: list[str]) -> tuple[Optional[str], str]:
    """(the OpenMP runtime to link, '') when the ops can use torch's own OpenMP runtime, else (None, why
    they are built serial)."""
    if not torch._C.has_openmp:
        return None, "torch's parallel backend is not OpenMP"
    if not sys.platform.startswith("linux"):
        return None, f"OpenMP builds are set up on Linux only, not {sys.platform}"
    runtimes = _openmp_runtimes()
    # torch's own: the one its wheel ships (torch/lib), else the only one mapped (a torch built against the
    # system's); another package's private copy (e.g. scikit-learn's libgomp-<hash>) is not torch's
    shipped = [path for path in runtimes if Path(path).parent == (Path(torch.__file__).parent / "lib").resolve()]
    candidates = shipped or runtimes
    if len(candidates) != 1:
        return None, f"torch's OpenMP runtime cannot be told apart ({', '.join(runtimes) or 'none mapped'})"
    if not os.path.basename(candidates[0]).startswith("libgomp"):
        return None, f"torch runs {os.path.basename(candidates[0])}, and the ops are built for libgomp only"
    if "clang" in _compiler_version(tuple(compiler)).lower():
        return None, "clang's OpenMP code needs libomp, and torch runs libgomp (set CXX=g++ for threaded ops)"
    return candidates[0], ""


def _commands(compiler: list[str], obj: Path, output: Path, runtime: Optional[str]) -> list[list[str]]:
    """Compile, then link: the link names torch's libraries (and its OpenMP runtime, by path, so the
    library needs the very runtime torch loaded) instead of ``-fopenmp``'s default, the system libgomp."""
    root = Path(torch.__file__).parent  # torch.utils.cpp_extension.include_paths() without its CUDA probing
    lib, include = root / "lib", root / "include"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    compile_ = [*compiler, "-O3", "-march=native", f"-std={_standard()}", "-fPIC",
                *(["-fopenmp"] if runtime else []), f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                f"-isystem{include}", f"-isystem{include / 'torch' / 'csrc' / 'api' / 'include'}",
                "-c", str(SOURCE), "-o", str(obj)]
    link = [*compiler, "-shared", str(obj), "-o", str(output), *([runtime] if runtime else []),
            f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
    if sys.platform.startswith("linux"):
        link.append("-Wl,-z,defs")  # a symbol left unresolved (an OpenMP call no linked runtime has) fails here
    return [compile_, link]


def _digest(compiler: list[str], runtime: Optional[str], source: bytes) -> str:
    parts = [source, torch.__version__, _cpu_identity(), _compiler_version(tuple(compiler)),
             " ".join(platform.libc_ver()), platform.system(), platform.machine(),
             *(" ".join(c) for c in _commands(compiler, Path("out.o"), Path("out.so"), runtime))]
    return hashlib.sha256(b"\0".join(p if isinstance(p, bytes) else p.encode() for p in parts)).hexdigest()[:16]
