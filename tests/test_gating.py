"""The shared gating machinery: placement, per-instance MACs, and the deployed batch-1 form."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from manidp.errors import UserError
from manidp.gating import (ChannelGate, SliceCache, cast_deployed, compile_deployed, deploy_model, deployed_blocks,
                           fold_batchnorm, fuse_onednn, gated_layers, insert_gates, kept_channels, plan_deployment,
                           slice_cache)
from manidp.macs import InstanceMacs
from manidp.models import build_backbone

# backbone family -> (input size, gates expected)
FAMILIES = {
    "cifar_resnet20": ((3, 32, 32), 18),
    "resnet18": ((3, 64, 64), 16),
    "resnet50": ((3, 64, 64), 32),
    "mobilenetv2_100": ((3, 64, 64), 16),
}


class PooledGate(nn.Module):
    """A minimal gate following the contract: pooled input -> Linear -> ReLU, zeros below a threshold.

    Not ManiDP's gate, so these tests check the machinery for any gate (FBS's too).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, out_channels)
        self.threshold = 0.0

    def forward(self, x):
        s = 0.5 + torch.sigmoid(self.fc(x.mean((2, 3))))  # bounded scales: no blow-up over 30 gates
        return s.masked_fill(s < self.threshold, 0.0)


def _per_instance_gated(name: str):
    """A gated backbone whose kept sets vary per instance (x: 4 instances): each gate is a random
    projection of its standardised pooled input, each channel cut in the widest gap between the
    batch's values (far from every instance, so the deployed form's other summation orders flip none)."""
    model, gates = _gated(name)
    x = torch.randn(4, *FAMILIES[name][0])
    generator = torch.Generator().manual_seed(0)

    def per_instance(gate, args):
        pooled = args[0].mean((2, 3))
        weight = torch.randn(gate.fc.out_features, gate.fc.in_features, generator=generator)
        weight = weight / pooled.std(0).clamp(min=1e-6)
        gate.fc.weight.copy_(weight)
        ordered = (pooled @ weight.T).sort(0).values
        widest = (ordered[1:] - ordered[:-1]).argmax(0, keepdim=True)  # cut in the widest gap: no near ties
        gate.fc.bias.copy_(-(ordered.gather(0, widest) + ordered.gather(0, widest + 1))[0] / 2)
        gate.threshold = 1.0  # 0.5 + sigmoid(z - cut) >= 1: above the cut

    handles = [site.gate.register_forward_pre_hook(per_instance) for site in gates]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return model, x


@pytest.mark.parametrize("name, kept_blocks", [("cifar_resnet20", (1, 16)), ("mobilenetv2_100", (16,))])
def test_gathered_path_with_per_instance_kept_sets_equals_masked_model(name, kept_blocks):
    """Every instance its own kept set, each a slice-cache miss, with and without the sets padded to
    oneDNN's 16-channel block (padding channels have mask 0: computed, then zeroed; mobilenetv2's
    depthwise conv padded too). One backbone unpadded keeps the test fast: each new depthwise shape is
    a new oneDNN primitive."""
    model, x = _per_instance_gated(name)
    with torch.no_grad():
        masked = model(x)
    assert all(len({tuple((g.mask[i] != 0).tolist()) for i in range(len(x))}) > 1 for g in gated_layers(model))
    for kept_block in kept_blocks:
        deployed = deploy_model(model)
        for block in deployed_blocks(deployed).values():
            block.path, block.kept_block = "gathered", kept_block
        with torch.no_grad():
            out = torch.cat([deployed(x[i:i + 1].clone()) for i in range(len(x))])
        assert _rel_error(out, masked) <= 1e-4
        assert slice_cache(deployed).stats()["hits"] == 0  # no instance found another's slices


def test_planner_times_the_gathered_path_as_timed_instances_meet_the_cache(monkeypatch):
    """Leave-one-out planning: a block whose kept set differs between the planning instances is timed as
    the miss it will be in use and goes dense-then-mask; a block whose instances share a kept set is
    timed on the other instance's cached slices and stays gathered. A fake clock charges each slice
    built on a cache miss and each dense call, so no real timing is involved."""
    from manidp import gating
    from manidp.gating import plan

    model, x = _per_instance_gated("cifar_resnet20")
    deployed = deploy_model(model)
    fake = [0.0]
    monkeypatch.setattr(plan, "_clock", lambda: lambda: fake[0])
    get = gating.SliceCache.get

    def charged_get(self, key, build):
        def charged():
            fake[0] += 1.0  # a miss: gather and pack
            return build()
        return get(self, key, charged)

    monkeypatch.setattr(gating.SliceCache, "get", charged_get)
    dense = gating.DeployedBasicBlock.dense

    def charged_dense(self, x):
        fake[0] += 0.1  # dense-then-mask: dearer than a hit, far cheaper than a miss
        return dense(self, x)

    monkeypatch.setattr(gating.DeployedBasicBlock, "dense", charged_dense)
    with torch.no_grad():
        model(x[:2])
    varies = {}  # block name -> whether a gate of it keeps other channels for instance 0 than for 1
    for site in gated_layers(model):
        block = site.conv_names[0].rpartition(".")[0]
        varies[block] = varies.get(block, False) or bool((site.mask[0] != 0).ne(site.mask[1] != 0).any())
    assert any(varies.values())
    plan = plan_deployment(deployed, [x[0:1], x[1:2]], repeats=1, freeze_dense=False)
    assert {name: entry["path"] for name, entry in plan.items()} == {
        name: "dense" if changes else "gathered" for name, changes in varies.items()}
    # one kept set for both planning instances: the other instance's slices are cached, gathered wins
    plan = plan_deployment(deployed, [x[0:1], x[0:1]], repeats=1, freeze_dense=False)
    assert {entry["path"] for entry in plan.values()} == {"gathered"}


def _gated(name: str, input_size=None, seed: int = 0):
    """A gated backbone in eval mode with real BN statistics and BN outputs near 5 +- 0.2,
    so that no activation map is all zero by accident (the brute-force count needs that)."""
    torch.manual_seed(seed)
    model = build_backbone(name, 10, 3)
    for bn in [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]:
        nn.init.uniform_(bn.weight, 0.1, 0.2)
        nn.init.constant_(bn.bias, 5.0)
        bn.momentum = 1.0
    gates = insert_gates(model, PooledGate)
    with torch.no_grad():
        model.train()(torch.randn(8, *(input_size or FAMILIES[name][0])))
    return model.eval(), gates


def _set_thresholds_between(model, gates, x, quantile: float = 0.5, settled: bool = False) -> None:
    """Thresholds halfway between two observed values near ``quantile``: no instance sits on a tie.

    ``settled`` (for comparisons of the deployed form with the masked model): the two values must be
    at least 1e-4 of their scale apart, and the thresholds are set gate by gate in forward order, each
    from a forward with the earlier ones in place, so the values a threshold was chosen between are
    the values the gate sees. The deployed paths sum in other orders than the masked model, so a
    saliency within ~1e-6 of its threshold may land on either side; settled thresholds have none.
    """
    with torch.no_grad():
        for group in ([g] for g in gates) if settled else [gates]:
            seen = {}
            handles = [g.gate.register_forward_hook(lambda m, a, out, g=g: seen.__setitem__(g, out)) for g in group]
            try:
                model(x)
            finally:
                for h in handles:
                    h.remove()
            for g in group:
                s = seen[g].flatten().sort().values
                centre = int(quantile * (len(s) - 1))
                k = centre
                if settled:
                    margin = 1e-4 * float(s.abs().max())
                    nearest = sorted(range(len(s) - 1), key=lambda i: abs(i - centre))
                    k = next((i for i in nearest if float(s[i + 1] - s[i]) >= margin), centre)
                g.gate.threshold = float((s[k] + s[k + 1]) / 2)


@pytest.mark.parametrize("name", FAMILIES)
def test_gates_sit_where_the_reference_puts_them(name):
    model, gates = _gated(name)
    input_size, expected = FAMILIES[name]
    assert len(gates) == expected
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for g in gates:
        assert set(g.conv_names) | set(g.consumer_names) <= convs
    # the backbone's own names are untouched: a dense checkpoint still loads
    dense = build_backbone(name, 10, 3)
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(".gate" in k for k in missing)


def _masked_and_deployed(name: str, batch: int = 4):
    model, gates = _gated(name)
    x = torch.randn(batch, *FAMILIES[name][0])
    _set_thresholds_between(model, gates, x, settled=True)
    with torch.no_grad():
        masked = model(x)
        kept = torch.stack([(g.mask != 0).float().mean() for g in gates])
    assert 0.2 < kept.mean() < 0.8  # a real mix of kept and skipped channels
    return model, x, masked, deploy_model(model)


def _rel_error(out: torch.Tensor, masked: torch.Tensor) -> float:
    return float((out - masked).abs().max() / masked.abs().max())


@pytest.mark.parametrize("path", ["gathered", "dense"])
@pytest.mark.parametrize("name", FAMILIES)
def test_deployed_form_equals_masked_model(name, path):
    model, x, masked, deployed = _masked_and_deployed(name)
    for block in deployed_blocks(deployed).values():
        block.path = path
    with torch.no_grad():
        out = torch.cat([deployed(x[i:i + 1].clone()) for i in range(len(x))])
        # a second pass hits the slice cache: packed slices, read on the kept input channels alone
        again = torch.cat([deployed(x[i:i + 1].clone()) for i in range(len(x))])
    assert _rel_error(out, masked) <= 1e-4 and _rel_error(again, masked) <= 1e-4
    assert not any(isinstance(m, ChannelGate) for m in deployed.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in deployed.modules())  # every plain BN folded
    assert any(isinstance(m, ChannelGate) for m in model.modules())  # the gated model is untouched


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet50"])
def test_deployed_form_runs_batches_dense_then_mask(name):
    _, x, masked, deployed = _masked_and_deployed(name)
    with torch.no_grad():
        out = deployed(x.clone())
    assert _rel_error(out, masked) <= 1e-4


def test_deployed_form_in_channels_last_equals_masked_model():
    _, x, masked, deployed = _masked_and_deployed("resnet18")
    deployed.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = torch.cat([deployed(x[i:i + 1].contiguous(memory_format=torch.channels_last)) for i in range(len(x))])
    assert _rel_error(out, masked) <= 1e-4


def test_plan_is_recorded_and_the_compiled_form_equals_the_masked_model():
    model, x, masked, deployed = _masked_and_deployed("cifar_resnet20")
    singles = [x[i:i + 1] for i in range(len(x))]
    plan = plan_deployment(deployed, singles[:2], repeats=1)
    assert set(plan) == set(deployed_blocks(deployed))
    for name, entry in plan.items():
        assert entry["path"] in ("gathered", "dense") and entry["path"] == deployed_blocks(deployed)[name].path
        assert entry["gathered_ms"] > 0 and entry["dense_ms"] > 0 and len(entry["kept"]) == 2
    # a mixed plan: the dense blocks are frozen in place, the gathered ones stay eager
    for i, block in enumerate(deployed_blocks(deployed).values()):
        block.path = ("gathered", "dense")[i % 2]
    mixed = compile_deployed(deployed, singles[0])
    with torch.no_grad():
        out = torch.cat([mixed(s.clone()) for s in singles])
    assert _rel_error(out, masked) <= 1e-4
    deployed = deploy_model(model)
    for block in deployed_blocks(deployed).values():
        block.path = "dense"
    whole = compile_deployed(deployed, x)  # every block dense: one frozen graph, any batch shaped like x
    assert isinstance(whole, torch.jit.ScriptModule)
    with torch.no_grad():
        assert _rel_error(whole(x.clone()), masked) <= 1e-4


def test_a_new_thread_count_repacks_what_was_packed_at_the_old_one():
    """oneDNN's AVX2 convolutions reorder a weight packed at another thread count on every call, so after
    ``torch.set_num_threads`` the deployed form must not reuse a slice or full-width convolution packed
    before: it drops them and packs again, and keeps them while the count stays."""
    _, x, masked, deployed = _masked_and_deployed("resnet18")
    blocks = list(deployed_blocks(deployed).values())
    for block in blocks[::2]:  # the dense path's full-width convolutions too
        block.path = "dense"
    cache = slice_cache(deployed)

    def packed_objects() -> list:  # held, so no id is reused by a later object
        return ([v for v, _ in cache.snapshot()[0].values() if hasattr(v, "packed")]
                + [c for block in blocks for c in block.full.values()])

    threads = torch.get_num_threads()
    try:
        outputs = {}
        for count in (1, 2):
            torch.set_num_threads(count)
            with torch.no_grad():
                for _ in range(2):  # a miss, then a hit that packs
                    outputs[count] = deployed(x[:1].clone())
            if count == 1:
                at_one = packed_objects()
        at_two = packed_objects()
        assert at_one and at_two and not {id(o) for o in at_one} & {id(o) for o in at_two}
        assert cache.threads == 2 and all(block.full.threads == 2 for block in blocks)
        with torch.no_grad():
            deployed(x[:1].clone())
        assert [id(o) for o in packed_objects()] == [id(o) for o in at_two]  # same count: nothing repacked
    finally:
        torch.set_num_threads(threads)
    for out in outputs.values():
        assert _rel_error(out, masked[:1]) <= 1e-4


def test_slice_cache_hits_repeated_sets_and_stays_under_its_cap():
    _, x, masked, deployed = _masked_and_deployed("resnet18")
    cache = slice_cache(deployed)
    with torch.no_grad():
        for _ in range(2):
            out = torch.cat([deployed(x[i:i + 1].clone()) for i in range(len(x))])
    assert cache.hits > 0 and cache.hits + cache.misses > 0 and cache.stats()["hit_rate"] > 0.4
    assert _rel_error(out, masked) <= 1e-4
    small = SliceCache(max_bytes=cache.bytes // 4)
    for block in deployed_blocks(deployed).values():
        block.cache = small
    with torch.no_grad():
        out = torch.cat([deployed(x[i:i + 1].clone()) for i in range(len(x))])
    assert 0 < small.bytes <= small.max_bytes and small.evictions > 0
    assert _rel_error(out, masked) <= 1e-4  # evicted slices are rebuilt, outputs unchanged


def test_a_slice_is_packed_on_its_first_reuse_and_a_snapshot_keeps_the_plain_one():
    """A miss runs its slice plain; the first hit replaces it with a packed copy (so kept sets that never
    recur never pay a reorder), and a snapshot taken before that hit still holds the plain slice."""
    from manidp.gating.slices import _PACKED

    model, x, masked, deployed = _masked_and_deployed("resnet18")
    cache = slice_cache(deployed)
    single = x[:1]
    with torch.no_grad():
        first = deployed(single.clone())
        plain = cache.snapshot()
        assert cache.hits == 0 and all(not v.packed for v, _ in plain[0].values() if hasattr(v, "packed"))
        second = deployed(single.clone())
    slices = [v for v, _ in cache.snapshot()[0].values() if hasattr(v, "packed")]
    assert cache.hits > 0 and slices and all(v.packed for v in slices) == _PACKED
    assert all(not v.packed for v, _ in plain[0].values() if hasattr(v, "packed"))
    assert torch.equal(first, second) or _rel_error(second, first) <= 1e-5
    assert _rel_error(first, masked[:1]) <= 1e-4
    eager = deploy_model(model)
    for block in deployed_blocks(eager).values():
        block.pack_on_reuse = False
    with torch.no_grad():
        eager(single.clone())
    assert all(v.packed for v, _ in slice_cache(eager).snapshot()[0].values() if hasattr(v, "packed")) == _PACKED


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_a_recurring_padded_slice_reads_the_kept_input_channels_alone(name):
    """A ResNet block's conv2 slice, once its kept sets recur, is packed on gate 1's kept channels only (the
    padding dropped from its input channels) and still gives the masked model's outputs, here from a
    channels-last input (the kept channels copied out; NCHW takes a view, as the equality test above runs);
    padded reads (``exact_inputs`` False) give the same."""
    memory_format = torch.channels_last
    from manidp.gating.slices import _PACKED

    model, x, masked, deployed = _masked_and_deployed(name)
    padded = deploy_model(model)
    for block in deployed_blocks(padded).values():
        block.exact_inputs = False
    single = x[:1].contiguous(memory_format=memory_format)
    with torch.no_grad():
        outs = [m(single.clone()) for m in (deployed, deployed, padded, padded)]
    for out in outs:
        assert _rel_error(out, masked[:1]) <= 1e-4
    entries = {k: v for k, (v, _) in slice_cache(deployed).snapshot()[0].items() if isinstance(k, tuple)}
    narrowed = 0
    for block in deployed_blocks(deployed).values():
        (_, _, key1, _, _), conv2 = next((k, v) for k, v in entries.items() if k[:2] == (id(block), "conv2"))
        index, count = entries[(id(block), "kept", key1)]
        assert index[:count].tolist() == sorted(index[:count].tolist())  # kept first, ascending, then padding
        assert not set(index[count:].tolist()) & set(index[:count].tolist())
        if _PACKED and count < index.numel():
            assert conv2.packed and conv2.input_shape[1] == count
            narrowed += 1
    assert narrowed > 0 or not _PACKED  # the model has padded kept sets: the path was taken


def test_slice_cache_refuses_a_negative_cap():
    with pytest.raises(UserError, match=">= 0"):
        SliceCache(-1)


def test_cast_to_bf16_keeps_gates_and_thresholds_in_fp32():
    _, x, masked, deployed = _masked_and_deployed("cifar_resnet20")
    cast_deployed(deployed, dtype=torch.bfloat16)
    for block in deployed_blocks(deployed).values():
        assert block.w1.dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for g in (block.gate1, block.gate2) for p in g.parameters())
    with torch.no_grad():
        out = deployed(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and _rel_error(out.float(), masked) < 0.1


@pytest.mark.parametrize("path", ["gathered", "dense"])
def test_bf16_runs_through_aten_on_a_cpu_without_onednn_bf16(monkeypatch, path):
    # An AVX2 CPU has no oneDNN bf16 convolution (torch refuses the call); the deployed form must still run,
    # unpacked, and the prepacked dense reference must say why it is left out. Simulated here on any CPU.
    from manidp.gating import slices
    monkeypatch.setattr(slices, "_BF16", False)
    _, x, masked, deployed = _masked_and_deployed("cifar_resnet20")
    cast_deployed(deployed, dtype=torch.bfloat16)
    for block in deployed_blocks(deployed).values():
        block.path = path
    with torch.no_grad():
        for _ in range(2):  # a miss, then hits (which pack where packing is possible)
            out = torch.cat([deployed(x[i:i + 1].to(torch.bfloat16)) for i in range(len(x))])
    assert out.dtype == torch.bfloat16 and _rel_error(out.float(), masked) < 0.1
    entries = [v for v, _ in slice_cache(deployed).snapshot()[0].values() if hasattr(v, "packed")]
    full = [c for block in deployed_blocks(deployed).values() for c in block.full.values() if hasattr(c, "packed")]
    assert bool(entries) == (path == "gathered") and not any(c.packed for c in entries + full)
    assert slices.packs(torch.zeros(1)) == slices._PACKED and not slices.packs(torch.zeros(1, dtype=torch.bfloat16))
    with pytest.raises(UserError, match="AVX-512"):
        fuse_onednn(fold_batchnorm(build_backbone("cifar_resnet20", 10, 3).eval()),
                    torch.zeros(1, 3, 32, 32, dtype=torch.bfloat16))


def test_fold_batchnorm_keeps_a_dense_model_s_outputs():
    torch.manual_seed(0)
    model = build_backbone("resnet18", 10, 3)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 64, 64))
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        folded = fold_batchnorm(model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        assert _rel_error(folded(x), expected) <= 1e-4


def test_deployed_form_handles_gates_that_skip_everything():
    model, gates = _gated("resnet18")
    x = torch.randn(2, 3, 64, 64)
    for g in gates[::3]:
        g.gate.threshold = float("inf")  # this gate keeps nothing
    with torch.no_grad():
        masked = model(x)
        assert all(int((g.mask != 0).sum()) == 0 for g in gates[::3])
        deployed = deploy_model(model)
        out = torch.cat([deployed(x[i:i + 1].clone()) for i in range(2)])
    assert (out - masked).abs().max() / masked.abs().max() <= 1e-4


def _brute_force_macs(model, gates, x) -> torch.Tensor:
    """MACs per instance from hooks: the channels that are nonzero where a mask was applied.

    A gated conv computes the output channels that survive its mask; a conv
    reading a masked tensor computes the nonzero input channels it receives.
    (Other convs count dense: a zero channel in a block's input, e.g. from
    option-A zero padding, is not skipped by the deployed form.)
    """
    conv_out = {}  # gated conv name -> kept output channels, read where its mask was applied
    reads_masked = {name for g in gates for name in g.consumer_names}
    apply_points = {}
    for g in gates:
        for module in model.modules():
            for hook in module._forward_hooks.values():
                if getattr(hook, "__self__", None) is g:
                    apply_points[module] = g.conv_names
    records, handles = [], []

    def at_apply_point(module, args, out):
        alive = (out.abs().sum((2, 3)) != 0).sum(1)
        for name in apply_points[module]:
            conv_out[name] = alive

    def at_layer(name):
        def record(module, args, out):
            records.append((name, module, args[0], out))
        return record

    for module in apply_points:
        handles.append(module.register_forward_hook(at_apply_point))
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(at_layer(name)))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    total = torch.zeros(len(x), dtype=torch.float64)
    for name, module, inp, out in records:
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
            continue
        n_in = torch.full((len(x),), module.in_channels, dtype=torch.float64)
        if name in reads_masked:
            n_in = (inp.abs().sum((2, 3)) != 0).sum(1).double()
        n_out = conv_out.get(name, torch.full((len(x),), module.out_channels)).double()
        k = module.kernel_size[0] * module.kernel_size[1] * out.shape[2] * out.shape[3]
        if module.groups > 1:  # depthwise: one input channel per output channel
            total += k * n_out
        else:
            total += k * n_in * n_out
    return total


@pytest.mark.parametrize("name, input_size", [("cifar_resnet20", (3, 32, 32)), ("resnet50", (3, 128, 128)),
                                              ("mobilenetv2_100", (3, 128, 128))])
def test_instance_macs_match_a_brute_force_count(name, input_size):
    """(Maps of at least 4x4: an activation map that is zero everywhere by chance would fool the hooks.)"""
    model, gates = _gated(name, input_size)
    x = torch.randn(3, *input_size)
    _set_thresholds_between(model, gates, x, quantile=0.4)
    with torch.no_grad():  # BN statistics of the pruned network: every channel stays near 5 +- 0.2
        model.train()(x)
    model.eval()
    counter = InstanceMacs(model, input_size)
    with torch.no_grad():
        model(x)
    counted = counter(len(x), *kept_channels(gated_layers(model)))
    expected = _brute_force_macs(model, gates, x)
    assert torch.allclose(counted, expected, rtol=1e-9)
    assert counted.max() < counter.dense  # something was skipped
    assert len(set(counted.tolist())) > 1  # and per instance, not once for all


def test_insert_gates_refuses_models_without_gateable_blocks():
    with pytest.raises(UserError, match="no block a gate can be inserted"):
        insert_gates(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), PooledGate)


def test_gates_cannot_be_inserted_twice():
    model, _ = _gated("cifar_resnet20")
    with pytest.raises(UserError, match="already exists"):
        insert_gates(model, PooledGate)


def test_gate_with_a_wrong_mask_shape_is_reported():
    class Broken(PooledGate):
        def forward(self, x):
            return super().forward(x)[:, :-1]

    torch.manual_seed(0)
    model = build_backbone("cifar_resnet20", 10, 3)
    insert_gates(model, Broken)
    with pytest.raises(RuntimeError, match="mask of shape"):
        model(torch.randn(1, 3, 32, 32))


def test_round_to_rounds_kept_counts_and_the_deployed_form_follows():
    torch.manual_seed(0)

    class ScoredGate(PooledGate):  # keeps its pre-threshold scores, as ManiDP's and FBS's gates do
        saliency = None

        def forward(self, x):
            self.saliency = 0.5 + torch.sigmoid(self.fc(x.mean((2, 3))))
            return self.saliency.masked_fill(self.saliency < self.threshold, 0.0)

    model = build_backbone("resnet18", 10, 3).eval()
    gates = insert_gates(model, ScoredGate, round_to=8)
    x = torch.randn(3, 3, 64, 64)
    _set_thresholds_between(model, gates, x, quantile=0.45)
    with torch.no_grad():
        masked = model(x)
        counts = torch.stack([(g.mask != 0).sum(1) for g in gates])
        out = torch.cat([deploy_model(model)(x[i:i + 1].clone()) for i in range(len(x))])
    assert bool((counts % 8 == 0).all()) and bool((counts > 0).all())
    assert _rel_error(out, masked) <= 1e-4


def test_round_to_is_validated():
    with pytest.raises(UserError, match="round_to"):
        insert_gates(build_backbone("cifar_resnet20", 10, 3), PooledGate, round_to=0)
    with pytest.raises(UserError, match="saliency"):
        insert_gates(build_backbone("cifar_resnet20", 10, 3), PooledGate, round_to=8)


@pytest.mark.parametrize("size", [7, 1])
@pytest.mark.parametrize("channels_last", [True, False])
def test_adding_kept_channels_equals_index_add(size, channels_last):
    """The deployed BasicBlock's residual sum (a [N*H*W, C] view on channels_last) is index_add_'s, in place."""
    from manidp.gating.deployed import _add_channels

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.randn(1, 12, size, size).contiguous(memory_format=fmt)
    z = torch.randn(1, 5, size, size).contiguous(memory_format=fmt)
    index = torch.tensor([0, 3, 4, 9, 11])
    expected = out.clone().index_add_(1, index, z)
    result = _add_channels(out, index, z)
    assert result.data_ptr() == out.data_ptr() and torch.equal(out, expected)


def test_manidp_gates_deploy_as_frozen_torchscript():
    """The deployed ManiDP gate (its inference form) is frozen TorchScript on the gathered path, not the eager
    fallback (a gate left in training mode cannot be frozen), and the deployed model equals the masked one."""
    from manidp.methods.manidp import SaliencyGate

    torch.manual_seed(0)
    model = build_backbone("cifar_resnet20", 10, 3)
    gates = insert_gates(model, SaliencyGate)
    for site in gates:
        nn.init.normal_(site.gate.fc2.weight, std=1.0)
        site.gate.threshold.fill_(0.8)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        masked = model(x)
    deployed = deploy_model(model)
    for block in deployed_blocks(deployed).values():
        assert all(isinstance(gate, torch.jit.ScriptModule) for gate in block.fused)
        block.path = "gathered"
    with torch.no_grad():
        out = torch.cat([deployed(x[i:i + 1].clone()) for i in range(len(x))])
    assert _rel_error(out, masked) <= 1e-4
