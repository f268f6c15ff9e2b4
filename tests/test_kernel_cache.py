"""The compiled-ops cache (manidp/kernels) trusts nothing it did not build (issue 17, item 2).

Each case runs the loading in a subprocess, as a user's ``manidp latency`` would: a planted library must
not run, a cut-short one must not kill the process, concurrent first uses must build once, and a library
that registers other ops must leave the gates on the ATen path. One real build (three concurrent first
uses of an empty cache, which also proves the plain build into an empty cache) is shared by the module;
only the cut-short case builds again.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from manidp import kernels
from manidp.kernels import _toolchain

REAL_CXX = next((shutil.which(name) for name in ("c++", "g++", "clang++") if shutil.which(name)), None)
needs_compiler = pytest.mark.skipif(REAL_CXX is None, reason="no C++ compiler on this machine")

LOAD = "from manidp import kernels; kernels.load(); print(kernels.status())"

# A deployed gated model on the dense-then-mask path, against the masked model: the compiled gate op
# when it is usable, the ATen gates otherwise; prints the status and the relative error.
DEPLOYED = """
import torch, torch.nn as nn
from manidp import kernels
from manidp.gating import deploy_model, deployed_blocks, insert_gates
from manidp.methods.manidp import SaliencyGate
from manidp.models import build_backbone
torch.manual_seed(0)
model = build_backbone("cifar_resnet20", 10, 3)
for site in insert_gates(model, SaliencyGate):
    nn.init.normal_(site.gate.fc2.weight, std=1.0)
    site.gate.threshold.fill_(0.8)
model.eval()
x = torch.randn(1, 3, 32, 32)
with torch.no_grad():
    expected = model(x)
    deployed = deploy_model(model)
    for block in deployed_blocks(deployed).values():
        block.path = "dense"
    out = deployed(x.clone())
print(kernels.status())
print(float((out - expected).abs().max() / expected.abs().max()))
"""


def _run(code: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def _compiles(log: Path) -> int:
    """Compiler invocations that compiled the kernel source (the wrapper logs every call)."""
    if not log.exists():
        return 0
    return sum(str(kernels.SOURCE) in line for line in log.read_text().splitlines())


def _record_matches(library: Path) -> bool:
    record = library.with_name(library.name + ".sha256")
    return record.exists() and record.read_text().split()[0] == hashlib.sha256(library.read_bytes()).hexdigest()


def _env(cache: Path, cxx: Path) -> dict:
    env = dict(os.environ, MANIDP_KERNEL_CACHE=str(cache), CXX=str(cxx))
    env.pop("MANIDP_FUSED_GATES", None)
    return env


@pytest.fixture(scope="module")
def first_use(tmp_path_factory):
    """Three processes that load the kernels at once from an empty cache, through a compiler wrapper that
    logs each call: their exit codes, outputs and the cache they left."""
    if REAL_CXX is None:
        pytest.skip("no C++ compiler on this machine")
    root = tmp_path_factory.mktemp("kernel-cache")
    log = root / "cxx.log"
    wrapper = root / "cxx"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{REAL_CXX}" "$@"\n')
    wrapper.chmod(0o755)
    cache = root / "cache"
    env = _env(cache, wrapper)
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        results.append((proc.returncode, out.strip(), err.strip()))
    libraries = sorted(cache.glob("gate_scale_*.so"))
    return SimpleNamespace(root=root, log=log, wrapper=wrapper, cache=cache, env=env, results=results,
                           library=libraries[0] if len(libraries) == 1 else None, libraries=libraries)


def _private_copy(first_use, name: str) -> Path:
    """A copy of the shared build's cache folder (0700, ours), for a case to damage."""
    if first_use.library is None:
        pytest.fail(f"the shared build left {len(first_use.libraries)} libraries, expected one")
    folder = first_use.root / name
    shutil.copytree(first_use.cache, folder)
    folder.chmod(0o700)
    return folder


@needs_compiler
def test_concurrent_first_uses_build_once_and_reuse_it(first_use):
    """The build path on an empty cache: the folder is created 0700, one process builds and records the
    library's SHA-256 beside it, and the others (waiting on the lock, or later) load that build."""
    statuses = []
    for rc, out, err in first_use.results:
        assert rc == 0, err[-2000:]
        statuses.append(out.splitlines()[-1])
    assert _compiles(first_use.log) == 1
    assert sorted(status.split(":")[0] for status in statuses) == ["compiled (built", "compiled (cached",
                                                                   "compiled (cached"], statuses
    assert len(first_use.libraries) == 1 and _record_matches(first_use.library)
    library = first_use.library
    assert all(str(library.resolve()) in status for status in statuses), statuses  # each loaded that build
    assert library.with_name(library.name + ".sha256").read_text().split()[1:] == [library.name]
    assert stat.S_IMODE(first_use.cache.stat().st_mode) == 0o700
    assert not list(first_use.cache.glob(".build-*"))  # no temporary left behind


@needs_compiler
def test_a_cut_short_library_is_rebuilt_not_loaded(first_use):
    """A cached library cut short would kill the process with SIGBUS on dlopen: its SHA-256 no longer matches
    the record, so it is built again (the same bytes: the build is reproducible), never opened."""
    folder = _private_copy(first_use, "cut-short")
    library = folder / first_use.library.name
    recorded = hashlib.sha256(library.read_bytes()).hexdigest()
    with open(library, "r+b") as handle:
        handle.truncate(50_000)
    before = _compiles(first_use.log)
    done = _run(LOAD, _env(folder, first_use.wrapper))
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.strip().splitlines()[-1].startswith("compiled (built: "), done.stdout
    assert _compiles(first_use.log) == before + 1
    assert library.stat().st_size > 50_000 and _record_matches(library)
    assert hashlib.sha256(library.read_bytes()).hexdigest() == recorded


@pytest.fixture(scope="module")
def planted_library(first_use):
    """A library whose constructor writes a marker file: what an attacker would plant."""
    marker = first_use.root / "constructor-ran"
    source = first_use.root / "planted.cpp"
    source.write_text('#include <cstdio>\n__attribute__((constructor)) static void planted() {\n'
                      f'  if (FILE* f = std::fopen("{marker}", "w")) std::fclose(f);\n}}\n')
    built = first_use.root / "planted.so"
    done = subprocess.run([REAL_CXX, "-shared", "-fPIC", str(source), "-o", str(built)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return built, marker


def _plant(library: Path, folder: Path, name: str, owner: int | None = None) -> None:
    """``library`` at ``folder/name`` with a matching SHA-256 record (anyone can compute one)."""
    target = folder / name
    shutil.copyfile(library, target)
    record = target.with_name(name + ".sha256")
    record.write_text(f"{hashlib.sha256(target.read_bytes()).hexdigest()}  {name}\n")
    for path in (target, record):
        path.chmod(0o666)
        if owner is not None:
            os.chown(path, owner, owner)


@needs_compiler
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="planting a file of another owner needs root (os.chown)")
@pytest.mark.parametrize("folder_mode", [0o1777, 0o700], ids=["shared-1777-folder", "own-0700-folder"])
def test_a_library_planted_by_another_user_is_refused_and_never_runs(first_use, planted_library, folder_mode):
    """Another user's library under the expected name, mode 0666: in a shared 1777 folder (the folder is
    refused), or in the user's own folder (the file is refused). Its constructor must never run."""
    planted, marker = planted_library
    if first_use.library is None:
        pytest.fail("the shared build left no single library to take the name of")
    folder = first_use.root / f"planted-{folder_mode:o}"
    folder.mkdir()
    folder.chmod(folder_mode)
    _plant(planted, folder, first_use.library.name, owner=65534)
    done = _run(LOAD, _env(folder, first_use.wrapper))
    assert done.returncode == 0, done.stderr[-2000:]
    status = done.stdout.strip().splitlines()[-1]
    assert not marker.exists(), f"the planted library ran ({status})"
    assert status.startswith("unavailable: "), status
    if folder_mode == 0o1777:
        assert "writable by others (mode 1777)" in status and "chmod 700" in status
    else:
        assert "owned by uid 65534" in status and "delete it" in status


@needs_compiler
def test_a_cache_folder_others_can_write_is_refused(first_use):
    """Group-writable, even if it is the caller's own: nothing is loaded from it or built into it."""
    folder = _private_copy(first_use, "group-writable")
    folder.chmod(0o770)
    before = _compiles(first_use.log)
    done = _run(LOAD, _env(folder, first_use.wrapper))
    status = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0 and status.startswith("unavailable: the kernel cache "), status
    assert "writable by its group (mode 0770)" in status and status.endswith("gates run as ATen ops")
    assert _compiles(first_use.log) == before


def _torch_library(source: Path, output: Path) -> subprocess.CompletedProcess:
    root = Path(torch.__file__).parent
    major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return subprocess.run(
        [REAL_CXX, "-O0", "-shared", "-fPIC", f"-std={'c++20' if (major, minor) >= (2, 14) else 'c++17'}",
         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-isystem{root / 'include'}",
         f"-isystem{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", str(source), "-o", str(output),
         f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{root / 'lib'}"],
        capture_output=True, text=True, timeout=600)


@needs_compiler
def test_a_library_that_registers_other_ops_falls_back_to_aten(first_use):
    """A library that loads (right name, matching record: a build of another version, say) but registers
    other manidp ops: the status says so and the deployed model runs its gates as ATen ops."""
    source = first_use.root / "foreign.cpp"
    source.write_text(
        "#include <torch/library.h>\n"
        "namespace { at::Tensor same(const at::Tensor& x) { return x; } }\n"
        "TORCH_LIBRARY(manidp, m) {\n"
        '  m.def("gate_scale_(Tensor x) -> Tensor");\n  m.def("not_ours(Tensor x) -> Tensor");\n}\n'
        "TORCH_LIBRARY_IMPL(manidp, CPU, m) {\n"
        '  m.impl("gate_scale_", &same);\n  m.impl("not_ours", &same);\n}\n')
    foreign = first_use.root / "foreign.so"
    built = _torch_library(source, foreign)
    assert built.returncode == 0, built.stderr[-2000:]
    folder = _private_copy(first_use, "foreign")
    (folder / first_use.library.name).unlink()
    _plant(foreign, folder, first_use.library.name)
    for path in folder.iterdir():
        path.chmod(0o600)
    done = _run(DEPLOYED, _env(folder, first_use.wrapper))
    assert done.returncode == 0, done.stderr[-2000:]
    status, error = done.stdout.strip().splitlines()[-2:]
    assert status.startswith("unavailable: ") and "its ops are not these" in status, status
    missing = ", ".join(op for op in kernels.OPS if op != "gate_scale_")  # every op the foreign library lacks
    assert f"{missing} missing" in status and "gate_scale_ registered with another" in status, status
    assert status.endswith("gates run as ATen ops"), status
    assert float(error) <= 1e-4


def test_cxx_may_be_a_command_with_arguments(monkeypatch):
    """``CXX="ccache g++"``-style values: the first word is the program, the rest its arguments."""
    env = shutil.which("env")
    if env is None:
        pytest.skip("no env program to stand in for a compiler launcher")
    monkeypatch.setenv("CXX", "env LC_ALL=C c++")
    assert _toolchain._compiler() == [env, "LC_ALL=C", "c++"]
    monkeypatch.setenv("CXX", "'no such launcher' g++")
    assert _toolchain._compiler() is None
