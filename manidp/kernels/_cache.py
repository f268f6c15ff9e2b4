"""The build cache: where built ops are kept, what is trusted there, and one build at a time.

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
  another node may have it mapped).

After loading, :func:`manidp.kernels.load` checks that all four ops are
registered with the source's schemas.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

from manidp.kernels import _toolchain

_BUILD_TIMEOUT_S = 300
_LOCK_TIMEOUT_S = 2 * _BUILD_TIMEOUT_S  # one build by another process, with room to spare
_RECORD_SUFFIX = ".sha256"
_TEMP_PREFIX = ".build-"


class _Refused(Exception):
    """The cache cannot be trusted; the message says why and what to fix."""


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("MANIDP_KERNEL_CACHE"):
        return Path(os.environ["MANIDP_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "manidp" / "kernels"


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
        for command in _toolchain._commands(compiler, Path(tmp) / "gate_scale.o", built, runtime):
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

    compiler = _toolchain._compiler()
    if compiler is None and os.environ.get("CXX", "").strip():
        return None, f"CXX={os.environ['CXX']} is not a program on this machine (fix or unset CXX)"
    if compiler is None:
        return None, "no C++ compiler found (set CXX, or install g++)"
    try:
        source = _toolchain.SOURCE.read_bytes()
    except OSError as err:
        return None, f"the kernel source is missing ({err}); reinstall the package"
    runtime, serial = _toolchain._openmp(compiler)
    try:
        folder = _trusted_folder(cache_dir())
        library = folder / f"gate_scale_{_toolchain._digest(compiler, runtime, source)}.so"
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
