"""The compiled gate op (manidp/kernels): same masks as the gates' own ATen code, and a clean fallback."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from manidp import kernels
from manidp.kernels import _toolchain
from manidp.gating import GateKernel, compile_deployed, deploy_model, deployed_blocks, insert_gates, plan_deployment
from manidp.models import build_backbone

needs_compiler = pytest.mark.skipif(_toolchain._compiler() is None, reason="no C++ compiler on this machine")


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """Kernel loading state reset around the test; builds go to an empty cache folder."""
    monkeypatch.setenv("MANIDP_KERNEL_CACHE", str(tmp_path / "kernels"))
    kernels._reset_for_tests()
    yield tmp_path / "kernels"
    kernels._reset_for_tests()


def _manidp_gate(cin: int, cout: int, x: torch.Tensor, quantile: float):
    from manidp.methods.manidp import SaliencyGate

    gate = SaliencyGate(cin, cout, clamp_max=2.5).eval()
    nn.init.normal_(gate.fc2.weight, std=1.0)
    nn.init.normal_(gate.fc2.bias, mean=0.5, std=0.5)
    with torch.no_grad():
        gate.threshold.fill_(-1e4)
        pi = gate(x)
        values = pi[pi > 0].sort().values
        k = int(quantile * (len(values) - 1))
        gate.threshold.fill_(float(values[k] + values[k + 1]) / 2)  # between two values: no ties
    return gate


def _apply(gate, x, y):
    with torch.no_grad():
        return y * gate(x).to(y.dtype)[:, :, None, None]


def _layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


@needs_compiler
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("quantile", [0.2, 0.6])
def test_kernel_gives_manidp_s_masks(channels_last, quantile):
    torch.manual_seed(1)
    x = _layout(torch.randn(4, 16, 7, 7).relu(), channels_last)
    y = _layout(torch.randn(4, 24, 5, 5), channels_last)
    gate = _manidp_gate(16, 24, x, quantile)
    expected = _apply(gate, x, y)
    out = gate.kernel_spec()(x, y.clone())
    assert ((out == 0) == (expected == 0)).all()
    assert (expected == 0).any() and (expected != 0).any()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("density", [0.25, 0.5, 1.0])
def test_kernel_gives_fbs_s_top_k_masks_on_signed_inputs(density):
    from baselines.fbs import SaliencyPredictor

    torch.manual_seed(2)
    gate = SaliencyPredictor(12, 20).eval()
    nn.init.normal_(gate.fc.weight, std=1.0)
    gate.density.fill_(density)
    x = _layout(torch.randn(3, 12, 6, 6), True)  # signed: the op must pool |x| as the predictor does
    y = _layout(torch.randn(3, 20, 6, 6), True)
    expected = _apply(gate, x, y)
    out = gate.kernel_spec()(x, y.clone())
    assert ((out != 0).sum((1, 2, 3)) == (expected != 0).sum((1, 2, 3))).all()
    assert ((out == 0) == (expected == 0)).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@needs_compiler
def test_kernel_keeps_gates_in_fp32_under_bf16():
    """bf16 activations: the op pools and thresholds in fp32, as the deployed ATen path does."""
    torch.manual_seed(3)
    x = torch.randn(2, 16, 8, 8).relu().bfloat16()
    y = torch.randn(2, 16, 8, 8).bfloat16()
    gate = _manidp_gate(16, 16, x.float(), 0.5)
    with torch.no_grad():
        mask = gate(x.float())
    out = gate.kernel_spec()(x, y.clone())
    assert ((out == 0) == ((y * mask.bfloat16()[:, :, None, None]) == 0)).all()
    torch.testing.assert_close(out.float(), (y.float() * mask[:, :, None, None]), rtol=1e-2, atol=1e-2)


@needs_compiler
def test_kernel_refuses_mismatched_weights():
    spec = GateKernel(torch.randn(8, 16))  # a gate for 16 input channels
    with pytest.raises(RuntimeError, match="gate_scale_: w1t has 16 input rows, expected 12"):
        spec(torch.randn(1, 12, 4, 4), torch.randn(1, 8, 4, 4))
    with pytest.raises(RuntimeError, match="gate_scale_: w1t has 8 outputs, target 6 channels"):
        spec(torch.randn(1, 16, 4, 4), torch.randn(1, 6, 4, 4))
    assert not spec.runs_on(torch.randn(1, 16, 4, 4, dtype=torch.float64), torch.randn(1, 8, 4, 4))


def _deployed_manidp(seed: int = 0):
    from manidp.methods.manidp import SaliencyGate

    torch.manual_seed(seed)
    model = build_backbone("cifar_resnet20", 10, 3)
    gates = insert_gates(model, SaliencyGate)
    for site in gates:
        nn.init.normal_(site.gate.fc2.weight, std=1.0)
        site.gate.threshold.fill_(0.8)
    return model.eval()


@needs_compiler
def test_deployed_dense_path_runs_one_op_per_gate_and_equals_the_masked_model():
    model = _deployed_manidp()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        masked = model(x)
        deployed = deploy_model(model)
        plan_deployment(deployed, [x[:1].clone()], repeats=1)
        for block in deployed_blocks(deployed).values():
            block.path = "dense"
        frozen = compile_deployed(deployed, x[:1].clone())
        out = torch.cat([frozen(x[i:i + 1].clone()) for i in range(3)])
    graph = str(frozen.inlined_graph if hasattr(frozen, "inlined_graph") else frozen.graph)
    assert graph.count("manidp::gate_scale_") == 18  # 9 blocks x 2 gates, each one call
    assert "aten::threshold" not in graph
    assert (out - masked).abs().max() <= 1e-4 * masked.abs().max()


@needs_compiler
def test_switched_off_kernel_falls_back_to_aten_with_the_same_outputs(monkeypatch, fresh_state):
    monkeypatch.setenv("MANIDP_FUSED_GATES", "0")
    assert not kernels.available()
    assert kernels.status().startswith("off (MANIDP_FUSED_GATES=0)")
    model = _deployed_manidp()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        deployed = deploy_model(model)
        for block in deployed_blocks(deployed).values():
            block.path = "dense"
        frozen = compile_deployed(deployed, x.clone())
        out = frozen(x.clone())
        expected = model(x)
    assert "manidp::gate_scale_" not in str(frozen.inlined_graph)
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_without_a_compiler_the_status_says_why(monkeypatch, fresh_state):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(_toolchain, "_compiler", lambda: None)
    monkeypatch.setattr(kernels, "_registered", lambda: False)
    assert kernels.load() is False
    assert kernels.status() == "unavailable: no C++ compiler found (set CXX, or install g++); gates run as ATen ops"


def test_a_cxx_that_is_no_program_is_named(monkeypatch, fresh_state):
    monkeypatch.setattr(kernels, "_registered", lambda: False)
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    assert kernels.load() is False
    assert kernels.status().startswith("unavailable: CXX=/nonexistent/g++ is not a program on this machine")


def test_a_failed_build_is_reported_not_raised(monkeypatch, fresh_state):
    monkeypatch.setattr(kernels, "_registered", lambda: False)
    monkeypatch.setattr(_toolchain, "_compiler", lambda: [shutil.which("false") or "/bin/false"])
    assert kernels.load() is False
    assert kernels.status().startswith("unavailable: the build failed (false:")
    assert not list(fresh_state.glob("*.so"))  # nothing half-written left in the cache


def _gathered_case(seed: int = 4, channels: int = 24, kept: int = 9, size: int = 7):
    torch.manual_seed(seed)
    index = torch.randperm(channels)[:kept].sort().values
    mask = torch.zeros(1, channels)
    mask[0, index] = torch.rand(kept) + 0.5
    z = torch.randn(1, kept, size, size).contiguous(memory_format=torch.channels_last)
    out = torch.randn(1, channels, size, size).contiguous(memory_format=torch.channels_last)
    return index, mask, z, out


@needs_compiler
def test_scale_pool_equals_scale_then_scattered_pool():
    from manidp.gating.deployed import _scale, _scatter_pooled

    index, mask, y, _ = _gathered_case()
    expected_y = _scale(y.clone(), mask, index)
    expected_pool = _scatter_pooled(expected_y, index, mask.shape[1])
    assert kernels.available()
    got_y = y.clone()
    pooled = torch.ops.manidp.scale_pool_(got_y, index, mask)
    torch.testing.assert_close(got_y, expected_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pooled, expected_pool, rtol=1e-5, atol=1e-6)
    assert pooled.shape == (1, mask.shape[1], 1, 1) and (pooled.flatten()[~(mask[0] != 0)] == 0).all()


@needs_compiler
@pytest.mark.parametrize("padding", [0, 3])
def test_scale_pool_gate_equals_scale_pool_then_the_gate(padding):
    """The fused glue of a gathered block: scale, pool and the next gate's mask give what scale_pool_ and
    gate_mask give, bit for bit; with ``keep`` the map comes back as its first ``keep`` channels (a padded
    kept set's padding, mask 0, dropped), in place otherwise."""
    index, mask, y, _ = _gathered_case(kept=12)
    kept = index.numel() - padding
    mask[0, index[kept:]] = 0  # the padding of a padded kept set has mask 0
    gate = _manidp_gate(24, 24, torch.randn(8, 24, 1, 1).relu(), 0.5)
    spec = gate.kernel_spec()
    expected_y = y.clone()
    expected_mask = spec.mask(torch.ops.manidp.scale_pool_(expected_y, index, mask))
    assert kernels.available()
    got_y = y.clone()
    out, got_mask = spec.scale_pool_mask(got_y, index, mask, kept)
    assert torch.equal(got_mask, expected_mask) and (got_mask != 0).any() and (got_mask == 0).any()
    assert out.is_contiguous(memory_format=torch.channels_last) and out.shape[1] == kept
    assert torch.equal(out, expected_y[:, :kept])
    assert (out.data_ptr() == got_y.data_ptr()) == (padding == 0)  # in place unless compacted
    with pytest.raises(RuntimeError, match="keep must be in"):
        spec.scale_pool_mask(y.clone(), index, mask, index.numel() + 1)
    if padding:
        with pytest.raises(RuntimeError, match="beyond keep has a nonzero mask value"):
            spec.scale_pool_mask(y.clone(), index, mask, kept - 1)


@needs_compiler
@pytest.mark.parametrize("order", ["ascending", "padded", "shuffled"])
@pytest.mark.parametrize("channels", [24, 64])
@pytest.mark.parametrize("relu", [True, False])
def test_add_channels_equals_scale_index_add_and_relu(relu, channels, order):
    """Any channel count and index order; 64 channels take the 16-channel-block path where the CPU has
    AVX-512 (its ascending head expand-loaded, the rest channel by channel), 24 the per-channel loop."""
    from manidp.gating.deployed import _add_channels, _scale, padded_kept

    index, mask, z, out = _gathered_case(channels=channels, kept=channels // 2 - 3)
    if order == "padded":  # as the deployed form pads a kept set: kept ascending, then skipped ones (mask 0)
        index, _ = padded_kept(mask[0] != 0, 16)
        z = torch.randn(1, index.numel(), *z.shape[2:]).contiguous(memory_format=torch.channels_last)
        assert index.numel() > (mask[0] != 0).sum() and index[:-1].gt(index[1:]).any()
    elif order == "shuffled":
        index = index[torch.randperm(index.numel())]
    expected = _add_channels(out.clone(), index, _scale(z.clone(), mask, index))
    if relu:
        expected = expected.relu()
    assert kernels.available()
    got = torch.ops.manidp.add_channels_(out.clone(), index, z, mask, relu)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@needs_compiler
def test_gathered_ops_refuse_what_they_cannot_take():
    index, mask, z, out = _gathered_case()
    assert kernels.available()
    with pytest.raises(RuntimeError, match="channels_last"):
        torch.ops.manidp.add_channels_(out.contiguous(), index, z, mask, True)
    with pytest.raises(RuntimeError, match="out of range for 24 channels"):
        torch.ops.manidp.add_channels_(out, index + 100, z, mask, True)
    with pytest.raises(RuntimeError, match=r"mask must be a \[1, 24\]"):
        torch.ops.manidp.scale_pool_(z.clone(), index, mask.expand(2, -1))


@needs_compiler
@pytest.mark.parametrize("channels_last", [True, False])
def test_gate_mask_equals_the_gate_on_maps_and_on_pools(channels_last):
    """The gathered path's gate op: the mask of a full map (pool included, split between threads on
    large maps) and of a [B, C, 1, 1] pool equal the gate's own."""
    from baselines.fbs import SaliencyPredictor

    torch.manual_seed(5)
    x = _layout(torch.randn(2, 16, 40, 40).relu(), channels_last)  # 25,600 values per map: a threaded pool
    manidp = _manidp_gate(16, 24, x, 0.5)
    fbs = SaliencyPredictor(16, 24).eval()
    nn.init.normal_(fbs.fc.weight, std=1.0)
    fbs.density.fill_(0.5)
    for gate in (manidp, fbs):
        with torch.no_grad():
            expected = gate(x)
        spec = gate.kernel_spec()
        for source in (x, x.mean((2, 3), keepdim=True)):
            got = spec.mask(source)
            assert got.dtype == torch.float32 and got.shape == expected.shape
            assert ((got == 0) == (expected == 0)).all()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("multiple", [8, 16])
def test_rounded_gates_round_in_the_kernel_as_round_kept_does(multiple):
    """round_to: the kernel's masks equal the rounding gate's (kept counts multiples of 8 / 16)."""
    from baselines.fbs import SaliencyPredictor
    from manidp.gating.deployed import _RoundedGate

    torch.manual_seed(6)
    x = _layout(torch.randn(5, 16, 6, 6).relu(), True)
    fbs = SaliencyPredictor(16, 40).eval()
    nn.init.normal_(fbs.fc.weight, std=1.0)
    fbs.density.fill_(0.3)
    for gate in (_manidp_gate(16, 40, x, 0.55), fbs):
        rounded = _RoundedGate(gate, multiple).eval()
        with torch.no_grad():
            expected = rounded(x)
        counts = (expected != 0).sum(1)
        assert ((counts % multiple == 0) | (counts == 40)).all()
        got = rounded.kernel_spec().mask(x)
        assert ((got == 0) == (expected == 0)).all()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@needs_compiler
@pytest.mark.parametrize("channels_last", [True, False])
def test_ops_at_batch_1_on_two_threads_equal_the_aten_form(two_threads, channels_last):
    """Maps large enough that every reduction is split between the two threads: masks, scaled maps and
    pools equal the ATen form's, and equal the ops' own results on one thread bit for bit (partials by
    chunk, never by thread)."""
    from baselines.fbs import SaliencyPredictor
    from manidp.gating.deployed import _add_channels, _scale, _scatter_pooled

    torch.manual_seed(7)
    x = _layout(torch.randn(1, 32, 96, 96).relu(), channels_last)  # 9,216 rows of 32: 9 chunks of the pool
    y = _layout(torch.randn(1, 48, 96, 96), channels_last)
    fbs = SaliencyPredictor(32, 48).eval()
    nn.init.normal_(fbs.fc.weight, std=1.0)
    fbs.density.fill_(0.5)
    gates = (_manidp_gate(32, 48, x, 0.5), fbs)
    assert kernels.available()
    results = {}
    for threads in (2, 1):
        torch.set_num_threads(threads)
        for gate in gates:
            with torch.no_grad():
                expected = gate(x)
            spec = gate.kernel_spec()
            mask = spec.mask(x)
            assert ((mask == 0) == (expected == 0)).all() and (mask != 0).any() and (mask == 0).any()
            torch.testing.assert_close(mask, expected, rtol=1e-5, atol=1e-6)
            scaled = spec(x, y.clone())
            torch.testing.assert_close(scaled, _apply(gate, x, y), rtol=1e-5, atol=1e-6)
            results.setdefault(type(gate).__name__, []).append((mask, scaled))
        index, gmask, z, out = _gathered_case(seed=8, channels=48, kept=20, size=96)  # 9,216 rows: 36 chunks
        expected_z = _scale(z.clone(), gmask, index)
        got_z = z.clone()
        pooled = torch.ops.manidp.scale_pool_(got_z, index, gmask)
        torch.testing.assert_close(got_z, expected_z, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(pooled, _scatter_pooled(expected_z, index, 48), rtol=1e-5, atol=1e-6)
        added = torch.ops.manidp.add_channels_(out.clone(), index, z, gmask, True)
        torch.testing.assert_close(added, _add_channels(out.clone(), index, _scale(z.clone(), gmask, index)).relu(),
                                   rtol=1e-6, atol=1e-6)
        results.setdefault("gathered", []).append((pooled, added))
    for name, (two, one) in results.items():
        assert all(torch.equal(a, b) for a, b in zip(two, one)), f"{name}: 2 threads differ from 1"
    if torch._C.has_openmp and sys.platform.startswith("linux") and kernels.threading().startswith("openmp"):
        torch.set_num_threads(2)
        assert kernels.threading().endswith(", 2 threads")


@needs_compiler
@pytest.mark.skipif(not (torch._C.has_openmp and sys.platform.startswith("linux")),
                    reason="threaded ops are built on Linux with torch's OpenMP backend only")
def test_ops_are_threaded_with_torch_s_own_openmp_runtime():
    """Built with OpenMP (at::parallel_for is a serial loop otherwise) and linked to the runtime torch
    loaded, not to another package's copy (scikit-learn maps its own libgomp once imported, as the
    digits-c data builder does)."""
    assert kernels.available()
    compiler = _toolchain._compiler()
    if "clang" in _toolchain._compiler_version(tuple(compiler)).lower():
        assert kernels.threading().startswith("serial (clang")
        return
    threading = kernels.threading()
    torch_lib = Path(torch.__file__).parent / "lib"
    runtimes = _toolchain._openmp_runtimes()
    torch_runtime = [r for r in runtimes if Path(r).parent == torch_lib.resolve()]
    assert len(torch_runtime) == 1, runtimes
    assert threading.startswith(f"openmp ({torch_runtime[0]})"), threading
    assert threading.endswith(f", {torch.get_num_threads()} thread" + ("" if torch.get_num_threads() == 1 else "s"))
    library = Path(kernels._loaded["library"])
    if shutil.which("ldd"):
        linked = [line for line in subprocess.run(["ldd", str(library)], capture_output=True, text=True).stdout
                  .splitlines() if "gomp" in line]
        assert linked and all(str(torch_lib) in line or torch_runtime[0] in line for line in linked), linked
    if shutil.which("nm"):
        imported = subprocess.run(["nm", "-D", "--undefined-only", str(library)], capture_output=True,
                                  text=True).stdout
        assert "GOMP_parallel" in imported


@needs_compiler
def test_kernel_scales_bf16_maps_as_the_aten_form_bit_for_bit():
    """Under bf16 the ATen form multiplies by mask.to(bf16); the op rounds its mask the same way, so equal
    masks give equal outputs, not outputs within bf16 rounding."""
    torch.manual_seed(3)
    x = torch.randn(2, 16, 8, 8).relu().bfloat16()
    y = torch.randn(2, 16, 8, 8).bfloat16()
    gate = _manidp_gate(16, 16, x.float(), 0.5)
    for layout in (True, False):
        xs, ys = _layout(x, layout), _layout(y, layout)
        with torch.no_grad():
            mask = gate(xs.float())
        assert torch.equal(gate.kernel_spec().mask(xs) != 0, mask != 0)
        out = gate.kernel_spec()(xs, ys.clone())
        assert torch.equal(out, ys * mask.to(torch.bfloat16)[:, :, None, None])


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_slice_equals_index_select_and_writes_channels_last(two_threads, dtype):
    """The kept weights of a slice-cache miss: weight[rows][:, cols] in one pass, channels-last, the same on
    one and two threads (rows of 3x3 and 1x1 weights, rows or cols left out)."""
    generator = torch.Generator().manual_seed(3)
    assert kernels.available()
    for shape in ((96, 80, 3, 3), (64, 48, 1, 1)):
        weight = torch.randn(*shape, generator=generator).to(dtype)
        rows = torch.randperm(shape[0], generator=generator)[:37].sort().values
        cols = torch.randperm(shape[1], generator=generator)[:29].sort().values
        for r, c in ((rows, cols), (rows, None), (None, cols)):
            expected = weight if r is None else weight.index_select(0, r)
            expected = expected if c is None else expected.index_select(1, c)
            runs = []
            for threads in (2, 1):
                torch.set_num_threads(threads)
                runs.append(torch.ops.manidp.gather_slice(weight, r, c))
            got = runs[0]
            assert torch.equal(got, expected) and torch.equal(runs[0], runs[1]) and got.dtype == dtype
            assert got.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="out of range for 80 channels"):
        torch.ops.manidp.gather_slice(torch.randn(96, 80, 3, 3), rows, cols + 80)
    with pytest.raises(RuntimeError, match="contiguous 4-D fp32 or bf16"):
        torch.ops.manidp.gather_slice(torch.randn(96, 80, 3, 3).contiguous(memory_format=torch.channels_last),
                                      rows, cols)


@needs_compiler
def test_a_recurring_kept_set_reaches_conv2_compacted_in_one_call(monkeypatch):
    """Once conv1's kept set recurs, scale, pool, gate 2 and the dropping of the padding are one compiled call
    (``manidp::scale_pool_gate``) and conv2's recurring slice reads its result whole: no channel copy is
    left. Outputs equal the masked model's and the three-call glue's (``fused_glue`` False)."""
    from unittest import mock

    import manidp.gating.deployed as deployed_module
    from manidp.gating.slices import _PACKED

    model = _deployed_manidp()
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    copies = []
    leading = deployed_module._leading_channels
    monkeypatch.setattr(deployed_module, "_leading_channels",
                        lambda y, count: copies.append(count < y.shape[1]) or leading(y, count))
    with torch.no_grad():
        masked = model(x)
        outs = {}
        for fused in (True, False):
            deployed = deploy_model(model)
            for block in deployed_blocks(deployed).values():
                block.path, block.fused_glue = "gathered", fused
            for _ in range(2):  # a miss, then the first reuse: the kept sets recur from here on
                deployed(x.clone())
            copies.clear()
            with mock.patch.object(torch.ops.manidp, "scale_pool_gate", wraps=torch.ops.manidp.scale_pool_gate) as op:
                outs[fused] = deployed(x.clone())
            calls = [(c.args[3], c.args[1].numel()) for c in op.call_args_list]
            blocks = len(deployed_blocks(deployed))
            if fused:
                assert len(calls) == blocks and not any(copies)  # one call a block; nothing copied
                assert any(keep < padded for keep, padded in calls) == _PACKED  # padded kept sets, compacted
            else:
                assert not calls and any(copies) == _PACKED
    assert torch.equal(outs[True], outs[False])
    assert (outs[True] - masked).abs().max() <= 1e-4 * masked.abs().max()


@needs_compiler
def test_gathered_blocks_equal_the_masked_model_with_and_without_the_gather_op():
    """A miss gathers through manidp::gather_slice (channels-last slices, reordered as they are) or through
    ATen (OIHW): the deployed outputs equal the masked model's either way, and the op is what runs."""
    from unittest import mock

    model = _deployed_manidp()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        masked = model(x)
        outs = {}
        for use_op in (True, False):
            deployed = deploy_model(model)
            for block in deployed_blocks(deployed).values():
                block.path, block.gather_kernel = "gathered", use_op
            with mock.patch.object(torch.ops.manidp, "gather_slice",
                                   wraps=torch.ops.manidp.gather_slice) as op:
                outs[use_op] = torch.cat([deployed(x[i:i + 1].clone().contiguous(
                    memory_format=torch.channels_last)) for i in range(2)])
            assert (op.call_count > 0) == use_op
    for out in outs.values():
        assert (out - masked).abs().max() <= 1e-4 * masked.abs().max()
