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

Agreement with the ATen form: the same masks up to near-threshold ties (the
ops pool in fp64, ATen in fp32, so a saliency within rounding of its threshold
can fall on the other side). Under bf16 the multiply uses the mask rounded to
bf16, as the ATen form's ``mask.to(dtype)`` does, so equal masks give equal
outputs bit for bit.

Threads (:func:`threading`): ``at::parallel_for`` in an extension is a serial
loop unless the extension is compiled with OpenMP, so where torch's parallel
backend is OpenMP and the compiler is GCC the ops are built with ``-fopenmp``
and linked against the OpenMP runtime torch itself loaded (its own libgomp),
never a second one: two runtimes in a process each keep their own thread pool
and thread numbers. Elsewhere (clang, macOS, torch's native backend) the ops
are built serial and say so. Either way each reduction has one partial per
fixed chunk of work, so results are race-free and independent of the thread
count.

Building: the source ships with the package and is compiled on first use with
the machine's C++ compiler (``$CXX``, a command with arguments allowed, e.g.
``ccache g++``; else ``c++``; a few seconds), for this CPU (``-march=native``),
in the C++ standard the installed torch's headers need, into a cache folder
(``$MANIDP_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/manidp/kernels``, else
``~/.cache/manidp/kernels``) under a name that hashes the source, the torch
version, the CPU's model and flags, the compiler's version, libc, the platform
and the commands, so a torch or compiler upgrade or another kind of CPU
sharing the folder gets its own build.

The cache is trusted only as far as it must be, because loading a library
runs its code as the caller:

* the folder must be owned by the caller and writable by no one else (it is
  created 0700), and no folder above it may be world-writable without the
  sticky bit; a library or record owned by someone else, writable by others
  or a symbolic link is refused, never loaded (as ssh refuses such keys);
* each build's SHA-256 is recorded beside it (``<name>.so.sha256``) and
  checked before loading; a library that does not match (cut short, replaced)
  is rebuilt, never opened;
* one build at a time per folder (a file lock in it); the build is written
  to a temporary file, synced and renamed into place, and a process that
  waited reuses it; a verified library is never replaced (a process on
  another node may have it mapped);
* after loading, all four ops must be registered with the schemas above.

No compiler, a failed build, a refused cache, ops that did not register, or
``MANIDP_FUSED_GATES=0``: :func:`load` returns False, :func:`status` says why
(and what to fix), and the deployed models run their gates as ATen ops (same
masks; only slower). The latency JSON records the status (``gate_kernel``).
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

import torch

__all__ = ["load", "status", "available", "threading", "cache_dir", "SOURCE"]

SOURCE = Path(__file__).with_name("gate_scale.cpp")
OPS = ("gate_scale_", "gate_mask", "scale_pool_", "add_channels_")
_BUILD_TIMEOUT_S = 300
_LOCK_TIMEOUT_S = 2 * _BUILD_TIMEOUT_S  # one build by another process, with room to spare
_RECORD_SUFFIX = ".sha256"
_TEMP_PREFIX = ".build-"

_state: dict[str, Optional[str]] = {"status": None}
# what this process dlopened: it stays loaded when the status is reset, so it is kept apart from it
_loaded: dict[str, Optional[str]] = {"library": None, "threading": None, "runtime": None}


class _Refused(Exception):
    """The cache cannot be trusted; the message says why and what to fix."""


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("MANIDP_KERNEL_CACHE"):
        return Path(os.environ["MANIDP_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "manidp" / "kernels"


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


# ------------------------------------------------------------------------------------------- trust

def _owner_problem(path: Path, st: os.stat_result) -> Optional[str]:
    if st.st_uid != os.geteuid():
        return f"{path} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} " \
               f"(mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _trusted_folder(folder: Path) -> Path:
    """The cache folder, created 0700 when missing; raises _Refused when someone else could have put a
    library in it (its owner or mode, or a world-writable folder above it without the sticky bit)."""
    fix = "; chmod 700 it, or set MANIDP_KERNEL_CACHE to a folder of your own"
    if not folder.exists():
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass  # another process made it: checked below like any folder
        except OSError as err:
            raise _Refused(f"cannot create the kernel cache {folder} ({err.strerror}); set MANIDP_KERNEL_CACHE "
                           "to a folder you can write") from None
    real = folder.resolve()
    try:
        st = real.stat()
    except OSError as err:
        raise _Refused(f"cannot read the kernel cache {folder} ({err.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise _Refused(f"the kernel cache {folder} is not a folder; set MANIDP_KERNEL_CACHE to a folder")
    problem = _owner_problem(real, st)
    if problem:
        raise _Refused(f"the kernel cache {problem}{fix}")
    for above in real.parents:
        mode = above.stat().st_mode
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise _Refused(f"the kernel cache {real} lies under {above}, which anyone can write (mode "
                           f"{stat.S_IMODE(mode):04o}, no sticky bit){fix}")
    return real


def _open_trusted(path: Path) -> Optional[int]:
    """A read-only descriptor of ``path`` (None when it is absent); raises _Refused for a link, a
    non-file, or a file someone else owns or can write. Checked on the descriptor, so the bytes later
    hashed and loaded are the ones checked."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as err:
        if path.is_symlink():
            raise _Refused(f"{path} is a symbolic link; delete it") from None
        raise _Refused(f"cannot read {path} ({err.strerror}); delete it") from None
    st = os.fstat(fd)
    problem = None if stat.S_ISREG(st.st_mode) else f"{path} is not a regular file"
    problem = problem or _owner_problem(path, st)
    if problem:
        os.close(fd)
        raise _Refused(f"{problem}; delete it to rebuild")
    return fd


def _sha256(fd: int) -> str:
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while block := os.read(fd, 1 << 20):
        digest.update(block)
    return digest.hexdigest()


def _verified(library: Path) -> tuple[Optional[int], str]:
    """(descriptor of the library, '') when it is whole and ours: trusted (see _open_trusted) and equal to
    its recorded SHA-256; else (None, why it must be built). Raises _Refused for an untrusted file."""
    fd = _open_trusted(library)
    if fd is None:
        return None, "absent"
    why = "unchecked"
    try:
        why = _record_mismatch(library, fd)
    finally:
        if why is not None:
            os.close(fd)
    return (fd, "") if why is None else (None, why)


def _record_mismatch(library: Path, fd: int) -> Optional[str]:
    """None when the library behind ``fd`` has the SHA-256 recorded beside it, else what differs."""
    record = library.with_name(library.name + _RECORD_SUFFIX)
    record_fd = _open_trusted(record)
    if record_fd is None:
        return "no SHA-256 record"
    try:
        words = os.read(record_fd, 4096).decode("ascii", "replace").split()
    finally:
        os.close(record_fd)
    if not words or not re.fullmatch(r"[0-9a-f]{64}", words[0]):
        return "an unreadable SHA-256 record"
    if _sha256(fd) != words[0]:
        return "a SHA-256 that differs from its record (cut short or replaced)"
    return None


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the renames are still atomic
    finally:
        os.close(fd)


def _publish(built: Path, library: Path) -> None:
    """Put ``built`` at ``library`` with its SHA-256 record, each synced and renamed into place (a reader
    sees a whole file or none; a record that does not match yet sends it to the lock, to wait)."""
    record = library.with_name(library.name + _RECORD_SUFFIX)
    os.chmod(built, 0o700)
    fd = os.open(built, os.O_RDONLY)
    try:
        os.fsync(fd)
        sha = _sha256(fd)
    finally:
        os.close(fd)
    partial = built.with_name(record.name)
    with open(partial, "w", encoding="ascii") as handle:
        handle.write(f"{sha}  {library.name}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(partial, 0o600)
    os.replace(built, library)
    os.replace(partial, record)
    _fsync_folder(library.parent)


def _compile(compiler: list[str], runtime: Optional[str], folder: Path, library: Path) -> Optional[str]:
    """Build into a private temporary folder in the cache and publish; None, or why it failed."""
    for stale in folder.glob(f"{_TEMP_PREFIX}*"):  # left by a killed build: under the lock none is running
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=_TEMP_PREFIX) as tmp:
        built = Path(tmp) / library.name
        for command in _commands(compiler, Path(tmp) / "gate_scale.o", built, runtime):
            done = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
            if done.returncode != 0:
                lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
                errors = [line for line in lines if "error" in line.lower()] or lines or ["(no output)"]
                return f"{Path(compiler[0]).name}: {errors[0].strip()[:300]}"
        _publish(built, library)
    return None


class _Built(NamedTuple):
    library: Path
    how: str  # "cached" or "built"
    fd: int  # a descriptor of the bytes that were checked: the ones to load
    runtime: Optional[str]  # the OpenMP runtime it links (None: serial)
    serial: str  # why it is serial


def _build() -> tuple[Optional[_Built], str]:
    """(the verified library, '') building it under the folder's lock when the cache lacks a good one; or
    (None, why not)."""
    from filelock import FileLock, Timeout

    compiler = _compiler()
    if compiler is None and os.environ.get("CXX", "").strip():
        return None, f"CXX={os.environ['CXX']} is not a program on this machine (fix or unset CXX)"
    if compiler is None:
        return None, "no C++ compiler found (set CXX, or install g++)"
    try:
        source = SOURCE.read_bytes()
    except OSError as err:
        return None, f"the kernel source is missing ({err}); reinstall the package"
    runtime, serial = _openmp(compiler)
    try:
        folder = _trusted_folder(cache_dir())
        library = folder / f"gate_scale_{_digest(compiler, runtime, source)}.so"
        fd, _ = _verified(library)
        if fd is not None:
            return _Built(library, "cached", fd, runtime, serial), ""
        lock = folder / "build.lock"
        try:
            with FileLock(lock, timeout=_LOCK_TIMEOUT_S, mode=0o600):
                fd, _ = _verified(library)  # built by the process we waited for
                if fd is not None:
                    return _Built(library, "cached", fd, runtime, serial), ""
                failed = _compile(compiler, runtime, folder, library)
                if failed:
                    return None, f"the build failed ({failed})"
                fd, why = _verified(library)
                if fd is None:
                    return None, f"the build in {folder} left {why}"
                return _Built(library, "built", fd, runtime, serial), ""
        except Timeout:
            return None, (f"another process has held {lock} for {_LOCK_TIMEOUT_S} s (a build that hangs?); "
                          "stop it, or set MANIDP_KERNEL_CACHE to another folder")
    except _Refused as err:
        return None, str(err)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"the build failed ({err})"


# ---------------------------------------------------------------------------------------- the ops

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
    runtimes = _openmp_runtimes()
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
    built, why = _build()
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
                            f"its {_RECORD_SUFFIX} record to rebuild; gates run as ATen ops")
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
