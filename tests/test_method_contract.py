"""The contract every registered method honours, parametrized over the registry.

A method is tested the moment it is registered (an entry point in the
``manidp.methods`` group): on a tiny CIFAR-style ResNet and random data, run
through the hooks in the engine's order, it meets its budget within its
tolerance on held-out data, its saved model reloads in a fresh process to
the same outputs, and a dynamic method's deployed form computes what its
masked model does. In-process and small, so the whole file stays fast;
``tests/test_methods.py`` trains every method through the engine.
"""
from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import sys

import pytest
import timm
import torch

from manidp.engine import MODEL_FORMAT
from manidp.macs import InstanceMacs, count_macs
from manidp.methods import METHODS, RunContext, load_all

load_all()

INPUT = (1, 16, 16)
BACKBONE = "cifar_resnet20"
BUDGET = 0.4
NAMES = METHODS.names()


def _batches(seed: int, count: int, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *INPUT, generator=generator), torch.randint(0, 10, (size,), generator=generator))
            for _ in range(count)]


def _backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(BACKBONE, num_classes=10, in_chans=INPUT[0])


def _budget(name: str):
    return BUDGET if METHODS.get(name).needs_budget else None


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second thread only waits on the first (and spins on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _run(name: str):
    """Prepare, one training step, the epoch's end and finalize, as the engine calls them (once per method)."""
    model = _backbone()
    dense = count_macs(model, INPUT)
    config = {"train": {"label_smoothing": 0.0, "lr": 0.01}}
    ctx = RunContext(config=config, device=torch.device("cpu"), input_size=INPUT, num_classes=10, dense_macs=dense,
                     epochs=1, steps_per_epoch=2, train_loader=_batches(1, 2), val_loader=_batches(2, 3),
                     autocast=contextlib.nullcontext, log=lambda message: None)
    method = METHODS.get(name)({}, _budget(name))
    model = method.prepare(model, ctx)
    optimizer = torch.optim.SGD(method.param_groups(model, 1e-4), lr=0.01, momentum=0.9)
    model.train()
    method.on_train_start(model, ctx)
    for step, (images, targets) in enumerate(ctx.train_loader):
        ctx.step = step
        loss, _, _ = method.training_loss(model, images, targets, ctx)
        optimizer.zero_grad()
        loss.backward()
        method.after_backward(model, ctx)
        optimizer.step()
        method.after_step(model, ctx)
    method.on_epoch_end(model, ctx)
    model = method.finalize(model, ctx).eval()
    return model, method, ctx


@torch.no_grad()
def _test_reduction(model, method, ctx) -> float:
    """Mean MACs reduction per instance on data the method never saw (static: the model's own count)."""
    counter = InstanceMacs(model, INPUT)
    total, seen = 0.0, 0
    for images, _ in _batches(3, 4):
        model(images)
        total += float(method.instance_macs(model, counter, len(images)).sum())
        seen += len(images)
    return 1 - total / seen / ctx.dense_macs


@pytest.mark.parametrize("name", NAMES)
def test_budget_is_met(name):
    model, method, ctx = _run(name)
    if method.budget is None:
        assert _test_reduction(model, method, ctx) == 0
    else:
        assert abs(_test_reduction(model, method, ctx) - BUDGET) <= method.budget_tolerance


@pytest.mark.parametrize("name", [n for n in NAMES if METHODS.get(n).dynamic])
@torch.no_grad()
def test_deployed_model_equals_the_masked_one(name):
    model, method, _ = _run(name)
    deployed = method.deploy(model).eval()
    for images, _ in _batches(4, 1, size=4):
        for image in images:  # the deployed form serves one instance at a time
            expected = model(image[None])
            assert torch.allclose(deployed(image[None]), expected, rtol=1e-4, atol=1e-4), name


_RELOAD = """
import json, sys, torch
from manidp.engine import load_model
torch.set_num_threads(1)
inputs = torch.load(sys.argv[1])
out = {}
for path in sys.argv[2:]:
    model, method, cfg, _ = load_model(path)
    with torch.no_grad():
        out[cfg["method"]] = model(inputs).tolist()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Every method's saved model, reloaded in one fresh process: its outputs on a fixed batch."""
    folder = tmp_path_factory.mktemp("contract")
    inputs = _batches(5, 1, size=8)[0][0]
    torch.save(inputs, folder / "inputs.pt")
    paths, expected = [], {}
    for name in NAMES:
        model, method, ctx = _run(name)
        cfg = {"method": name, "method_options": method.options, "budget": _budget(name), "backbone": BACKBONE,
               **ctx.config}
        torch.save({"format": MODEL_FORMAT, "config": cfg, "model": model.state_dict(),
                    "method_state": method.state_dict(), "num_classes": 10, "input_size": list(INPUT),
                    "dense_macs": ctx.dense_macs}, folder / f"{name}.pt")
        paths.append(str(folder / f"{name}.pt"))
        with torch.no_grad():
            expected[name] = model(inputs)
    done = subprocess.run([sys.executable, "-c", _RELOAD, str(folder / "inputs.pt"), *paths], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: (expected[name], torch.tensor(got[name])) for name in got}


@pytest.mark.parametrize("name", NAMES)
def test_saved_model_reloads_in_a_fresh_process(name, reloaded):
    expected, got = reloaded[name]
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
