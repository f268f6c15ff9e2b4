"""The honest dense reference (issue 18): its candidates, the prepacked oneDNN dense model, the timed regime.

Correctness only (no timing assertions): the fused dense model equals the folded one, every candidate is
recorded or dropped with its reason, a dynamic model is never planned on the timed instances, the slice
cache returns to its warm state between passes, and the compiled and ATen gate forms agree up to
near-threshold ties on real trained gates.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from manidp import kernels, latency
from manidp.errors import UserError
from manidp.gating import (SliceCache, deploy_model, fold_batchnorm, fuse_onednn, gated_layers,
                           insert_gates)
from manidp.methods.manidp import SaliencyGate
from manidp.models import build_backbone
from test_manidp import trained_manidp_run


def _folded_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_backbone("cifar_resnet20", 10, 3).eval()
    for module in model.modules():  # non-trivial BN statistics, so folding them is checked
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.0)
            nn.init.uniform_(module.running_mean, -0.2, 0.2)
            nn.init.uniform_(module.running_var, 0.5, 1.5)
    return model


def test_fuse_onednn_equals_the_model_with_relu_and_residual_sum_fused():
    model = _folded_resnet()
    x = torch.randn(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        fused = fuse_onednn(fold_batchnorm(model).to(memory_format=torch.channels_last), x)
        out = fused(x)
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5)
    calls = [n.target for n in fused.graph.nodes if n.op == "call_function"]
    assert torch.ops.mkldnn._convolution_pointwise.binary in calls  # conv2 + shortcut + ReLU in one call
    assert not any(isinstance(m, nn.Conv2d) for m in fused.modules())  # every convolution prepacked


def test_fuse_onednn_refuses_what_it_cannot_pack():
    with pytest.raises(UserError, match="oneDNN"):
        fuse_onednn(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8, dtype=torch.float64))


def test_optimized_dense_times_every_candidate_and_records_a_dropped_one(monkeypatch):
    def no_compiler(model, example):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(latency.reference, "inductor_compile", no_compiler)  # where optimized_dense looks it up
    inputs = [torch.randn(1, 3, 16, 16) for _ in range(2)]
    model = _folded_resnet()
    reference, info = latency.optimized_dense(model, inputs, repeats=1)
    assert set(info["candidates_ms"]) == {"eager/contiguous", "eager/channels_last", "torchscript/contiguous",
                                          "torchscript/channels_last", "onednn/channels_last"}
    assert info["dropped"] == {"inductor/channels_last": "RuntimeError: no C++ compiler"}
    assert f"{info['mode']}/{info['memory_format']}" == min(info["candidates_ms"], key=info["candidates_ms"].get)
    with torch.no_grad():
        assert torch.allclose(reference(inputs[0]), model(inputs[0]), rtol=1e-4, atol=1e-5)
    _, without = latency.optimized_dense(model, inputs, repeats=1, inductor=False)
    assert "inductor/channels_last" not in without["candidates_ms"]
    assert "left out by the hardware profile" in without["dropped"]["inductor/channels_last"]


def test_a_dynamic_model_is_never_planned_on_the_timed_instances():
    torch.manual_seed(0)
    gated = build_backbone("cifar_resnet20", 10, 3).eval()
    insert_gates(gated, SaliencyGate)
    deployed = deploy_model(gated)
    inputs = [torch.randn(1, 3, 16, 16)]
    with pytest.raises(UserError, match="plan_batches"):
        latency.time_side_by_side(gated, deployed, inputs, gated(inputs[0]), 0, 1)


def test_slice_cache_restore_drops_what_later_passes_added():
    cache = SliceCache(1 << 20)
    cache.get("warm", lambda: ("a", 10))
    state = cache.snapshot()
    cache.get("timed", lambda: ("b", 10))
    cache.restore(state)
    assert len(cache) == 1 and cache.bytes == 10
    cache.reset_counts()
    cache.get("timed", lambda: ("b", 10))
    assert cache.stats()["misses"] == 1  # the second pass misses where the first did


def test_gate_kernel_field_does_not_claim_the_cpu_ops_off_the_cpu():
    assert latency.report._gate_kernel(torch.zeros(1)) == kernels.status()
    assert latency.report._gate_kernel(torch.zeros(1, device="meta")).startswith("ATen (meta")


@pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler on this machine (the ops are needed)")
def test_compiled_and_aten_gates_are_equal_up_to_near_threshold_ties(tmp_path_factory, data_cache, dense_run):
    """On a trained ManiDP run's real gates and test images: the compiled gate op and the ATen gate keep the
    same channels except where a saliency lies within fp32 rounding of the threshold (the two sum the pool
    and the Linear layers in different orders). The flips are counted and each one must be such a tie."""
    from manidp.data import build_dataset
    from manidp.engine import load_model

    run = trained_manidp_run(tmp_path_factory, data_cache, dense_run)
    model, _, cfg, _ = load_model(run, "cpu")
    images = torch.stack([build_dataset(cfg["dataset"], cfg["data"], seed=cfg["seed"]).test[i][0]
                          for i in range(64)])
    sources = []
    hooks = [site.gate.register_forward_pre_hook(lambda m, args: sources.append(args[0])) for site in
             gated_layers(model)]
    with torch.no_grad():
        model.eval()(images)
    for h in hooks:
        h.remove()
    flips = entries = 0
    for site, source in zip(gated_layers(model), sources):
        gate = site.gate.inference_form().eval()
        with torch.no_grad():
            aten = gate(source) != 0
            saliency = torch.clamp(gate.fc2(torch.relu(gate.fc1(source.mean((2, 3))))), max=gate.clamp_max)
        compiled = site.gate.kernel_spec().mask(source) != 0
        differ = aten != compiled
        flips += int(differ.sum())
        entries += differ.numel()
        near = (saliency - float(site.gate.threshold)).abs() <= 1e-5 * saliency.abs().clamp(min=1.0)
        assert bool(near[differ].all()), "a mask flip away from the threshold: the forms disagree for real"
    assert entries > 0 and flips / entries < 0.01
    print(f"mask flips between the compiled and ATen gates: {flips} of {entries}")


def test_the_deployed_form_keeps_the_memory_format_it_runs_fastest_in(monkeypatch):
    """With a block on the gathered path both formats are prepared and timed on the planning instances (a
    fake timer here: NCHW wins), the faster is kept with its own slice cache, and its outputs equal the
    gated model's; a form whose blocks all run dense keeps the reference's format untimed."""
    from manidp.gating import deployed_blocks, slice_cache
    from manidp.latency import plan as latency_plan

    torch.manual_seed(0)
    gated = build_backbone("cifar_resnet20", 10, 3).eval()
    insert_gates(gated, SaliencyGate)
    inputs = [torch.randn(1, 3, 16, 16) for _ in range(2)]
    real_plan = latency_plan.plan_deployment

    def plan_with(path):
        def plan(model, *args, **kwargs):
            entries = real_plan(model, *args, **kwargs)
            for name, block in deployed_blocks(model).items():
                block.path = entries[name]["path"] = path
            return entries
        return plan

    timed = []

    def fake_served_ms(runnable, cache, planning, repeats):
        timed.append(runnable.memory_format)
        with torch.inference_mode():
            runnable(planning[0].clone())  # it runs
        return {"channels_last": 2.0, "contiguous": 1.0}[runnable.memory_format]

    monkeypatch.setattr(latency_plan, "_served_ms", fake_served_ms)
    monkeypatch.setattr(latency_plan, "plan_deployment", plan_with("gathered"))
    deployed = deploy_model(gated)
    runnable, info = latency_plan.prepare_deployed(deployed, inputs, "channels_last", "onednn", plan_repeats=1)
    assert sorted(timed) == ["channels_last", "contiguous"]
    assert info["memory_format"] == runnable.memory_format == "contiguous"
    assert info["memory_format_ms"] == {"channels_last": 2.0, "contiguous": 1.0}
    assert info["cache"] is not slice_cache(deployed)  # the copy prepared in NCHW won
    with torch.no_grad():
        for x in inputs:
            assert torch.allclose(runnable(x.clone()), gated(x), rtol=1e-4, atol=1e-5)
    timed.clear()
    monkeypatch.setattr(latency_plan, "plan_deployment", plan_with("dense"))
    deployed = deploy_model(gated)
    runnable, info = latency_plan.prepare_deployed(deployed, inputs, "channels_last", "onednn", plan_repeats=1)
    assert not timed and info["memory_format"] == "channels_last" and info["memory_format_ms"] is None
    assert info["cache"] is slice_cache(deployed)


def test_served_time_leaves_the_slice_cache_as_it_found_it():
    from manidp.gating import deployed_blocks
    from manidp.latency import plan as latency_plan

    torch.manual_seed(0)
    gated = build_backbone("cifar_resnet20", 10, 3).eval()
    insert_gates(gated, SaliencyGate)
    deployed = deploy_model(gated)
    for block in deployed_blocks(deployed).values():
        block.path = "gathered"
    runnable = latency.InMemoryFormat(deployed, "channels_last")
    inputs = [torch.randn(1, 3, 16, 16) for _ in range(2)]
    cache = deployed_blocks(deployed)["layer1.0"].cache
    with torch.no_grad():
        runnable(inputs[0].clone())
    before = dict(cache.snapshot()[0])
    assert before and latency_plan._served_ms(runnable, cache, inputs, 1) > 0
    after = dict(cache.snapshot()[0])
    assert after.keys() == before.keys() and all(after[k][0] is before[k][0] for k in before)
