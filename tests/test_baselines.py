"""The baselines: paper criteria, budgets, physical removal, reloading, gates."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import subprocess
import sys

import pytest
import timm
import torch

from conftest import small_run_config
from baselines._structured import (channel_groups, group_scores, plan_removal, remove_channels, select_removed,
                                   silence_channels, zero_filters)
from manidp.engine import train
from manidp.errors import UserError
from manidp.gating import kept_channels
from manidp.macs import InstanceMacs, count_macs
from manidp.methods import METHODS, RunContext, load_all

load_all()

BASELINES = ("l1", "fpgm", "sfp", "channel_gating", "fbs")
CIFAR = (1, 16, 16)


def _context(model, input_size, val_loader=None) -> RunContext:
    return RunContext(config={"train": {"label_smoothing": 0.0}}, device=torch.device("cpu"), input_size=input_size,
                      num_classes=10, dense_macs=count_macs(model, input_size), epochs=1, steps_per_epoch=1,
                      val_loader=val_loader, autocast=contextlib.nullcontext, log=lambda message: None)


def _resnet20():
    torch.manual_seed(0)
    return timm.create_model("cifar_resnet20", num_classes=10, in_chans=1).eval()


# ---------------------------------------------------------------- scores on hand-made weights
def test_l1_removes_the_smallest_l1_norm():
    filters = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.5], [-2.0, 2.0]])  # L1: 3, 2, 1.5, 4
    scores = METHODS.get("l1").filter_scores(filters)
    assert scores.tolist() == [3.0, 2.0, 1.5, 4.0]
    assert select_removed({"conv": scores}, {"conv": 1}) == {"conv": [2]}


def test_sfp_removes_the_smallest_l2_norm():
    filters = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.5], [-2.0, 2.0]])  # L2: 3, 1.41, 1.5, 2.83
    assert select_removed({"conv": METHODS.get("sfp").filter_scores(filters)}, {"conv": 1}) == {"conv": [1]}


def test_fpgm_removes_the_filter_nearest_the_others():
    # Filter 2 sits in the middle of the others though its norm is the largest but one:
    # a norm criterion would keep it, the geometric median criterion removes it.
    filters = torch.tensor([[0.0, 0.0], [4.0, 0.0], [2.0, 1.0], [2.0, 4.0], [0.2, 0.1]])
    scores = METHODS.get("fpgm").filter_scores(filters)
    expected = torch.cdist(filters, filters).sum(1)
    assert torch.allclose(scores, expected)
    assert select_removed({"conv": scores}, {"conv": 1}) == {"conv": [2]}


# ---------------------------------------------------------------- layers, budgets, surgery
def test_first_conv_mode_prunes_the_first_conv_of_each_block():
    groups = channel_groups(_resnet20(), CIFAR, "first_conv")
    assert [g.key for g in groups] == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert all(g.in_layers[-1].endswith("conv2") for g in groups)


def test_all_mode_is_refused_on_zero_pad_shortcuts():
    with pytest.raises(UserError, match="zero-pad"):
        channel_groups(_resnet20(), CIFAR, "all")


@pytest.mark.parametrize("budget", [0.40, 0.55])
def test_budget_is_met_on_the_physically_pruned_model(budget):
    model = _resnet20()
    groups = channel_groups(model, CIFAR, "first_conv")
    counts, achieved = plan_removal(model, CIFAR, groups, budget)
    pruned = remove_channels(copy.deepcopy(model), CIFAR, select_removed(
        group_scores(model, groups, METHODS.get("l1").filter_scores), counts))
    measured = 1 - count_macs(pruned, CIFAR) / count_macs(model, CIFAR)
    assert measured == pytest.approx(achieved)
    assert abs(measured - budget) <= METHODS.get("l1").budget_tolerance
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("silence", [silence_channels, zero_filters], ids=["static", "soft-step"])
@pytest.mark.parametrize("backbone, input_size, layers", [
    ("cifar_resnet20", CIFAR, "first_conv"),
    ("resnet18", (3, 32, 32), "auto"),
])
def test_masked_and_physically_pruned_models_agree(backbone, input_size, layers, silence):
    """Both the static silencing and the soft schedule's zeroing step make removal exact (eval mode)."""
    torch.manual_seed(0)
    model = timm.create_model(backbone, num_classes=10, in_chans=input_size[0])
    with torch.no_grad():  # non-trivial BN statistics, so a silenced channel really must output 0
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    model.eval()
    groups = channel_groups(model, input_size, layers)
    counts, _ = plan_removal(model, input_size, groups, 0.5)
    removed = select_removed(group_scores(model, groups, METHODS.get("fpgm").filter_scores), counts)
    masked = copy.deepcopy(model)
    silence(masked, groups, removed)
    pruned = remove_channels(copy.deepcopy(model), input_size, removed)
    x = torch.randn(4, *input_size)
    with torch.no_grad():
        assert not torch.allclose(model(x), masked(x), atol=1e-4)
        torch.testing.assert_close(pruned(x), masked(x), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- runs: budget, save and reload
RUN_BUDGET = 0.55

# Reloads each run from its model.pt alone and re-evaluates it on the test split. The
# static methods' pruning criterion and budget planning are made to fail: a reload
# must replay the saved removal, never prune again.
_RELOAD = """
import json, sys
from pathlib import Path
import baselines._structured as structured
from manidp.engine import evaluate_run, load_model

def refuse(*args, **kwargs):
    raise AssertionError("pruning re-run on reload")

structured.StructuredPruning.select = structured.StructuredPruning.plan = refuse
out = {}
for path in sys.argv[1:]:
    model, _, _, _ = load_model(path)
    summary = evaluate_run(path, "test", out_file=Path(path) / "reloaded.csv")
    out[path] = {"params": sum(p.numel() for p in model.parameters()), **summary}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def baseline_runs(dense_run, data_cache, tmp_path_factory):
    """Each baseline fine-tuned briefly at RUN_BUDGET, then reloaded in one fresh process."""
    root = tmp_path_factory.mktemp("baseline-runs")
    runs = {}
    for name in BASELINES:
        overrides = {"method": name, "budget": RUN_BUDGET, "init_from": str(dense_run), "train.epochs": 1,
                     "data.max_train": 128, "data.max_eval": 128}
        out = train(small_run_config(root / name, data_cache, **overrides))
        runs[name] = (out, json.loads((out / "metrics.json").read_text()))
    result = subprocess.run([sys.executable, "-c", _RELOAD, *(str(out) for out, _ in runs.values())],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    reloaded = json.loads(result.stdout.splitlines()[-1])
    return {name: (metrics, reloaded[str(out)]) for name, (out, metrics) in runs.items()}


@pytest.mark.parametrize("name", BASELINES)
def test_run_meets_its_budget(name, baseline_runs):
    metrics, _ = baseline_runs[name]
    method = METHODS.get(name)
    assert abs(metrics["macs_reduction"] - RUN_BUDGET) <= method.budget_tolerance
    if method.dynamic:  # calibrated on validation, measured on test
        assert abs(metrics["val_macs_reduction"] - RUN_BUDGET) <= method.budget_tolerance
    else:  # counted on the physically pruned model: really smaller
        assert metrics["params"] < metrics["params_dense"]
        assert sum(metrics["method_info"]["removed_channels"].values()) > 0


@pytest.mark.parametrize("name", BASELINES)
def test_run_reloads_from_its_file_in_a_fresh_process(name, baseline_runs):
    metrics, reloaded = baseline_runs[name]
    assert reloaded["params"] == metrics["params"]
    assert reloaded["test_top1"] == metrics["test_top1"]
    assert reloaded["macs"] == pytest.approx(metrics["macs"])


def _soft_steps(method, model, ctx, steps=3, select_at=0):
    """A few SGD steps through the method's hooks; the first selection is made before step ``select_at``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        if step == select_at:
            method.on_train_start(model, ctx)
        loss, _, _ = method.training_loss(model, torch.randn(8, *CIFAR), torch.randint(0, 10, (8,)), ctx)
        optimizer.zero_grad()
        loss.backward()
        method.after_backward(model, ctx)
        optimizer.step()
        method.after_step(model, ctx)


def test_fpgm_zero_grad_variant_keeps_selected_filters_at_zero():
    model = _resnet20().train()
    method = METHODS.get("fpgm")({"zero_grad": True}, 0.4)
    ctx = _context(model, CIFAR)
    method.prepare(model, ctx)
    _soft_steps(method, model, ctx, select_at=1)  # the first step gathers momentum on filters selected afterwards
    for key, idxs in method.selection.items():
        conv = model.get_submodule(key)
        assert conv.weight[idxs].abs().sum() == 0 and conv.weight.grad[idxs].abs().sum() == 0
        kept = [i for i in range(conv.out_channels) if i not in idxs]
        assert conv.weight.grad[kept].abs().sum() > 0
    assert "authors' code" in method.describe()["variant"]
    assert "paper" in METHODS.get("fpgm")({"zero_grad": False}, 0.4).describe()["variant"]


# ---------------------------------------------------------------- dynamic methods
def test_channel_gating_straight_through_gradients_reach_the_thresholds():
    model = _resnet20().train()
    method = METHODS.get("channel_gating")({}, 0.4)
    ctx = _context(model, CIFAR)
    method.prepare(model, ctx)
    loss, _, logs = method.training_loss(model, torch.randn(8, *CIFAR), torch.randint(0, 10, (8,)), ctx)
    loss.backward()
    assert 0 < logs["gate_on"] < 1
    for gate in method.gates.values():
        assert gate.delta.grad is not None and gate.delta.grad.abs().sum() > 0
    assert method.describe()["macs_theoretical"] is True


def test_channel_gating_counts_base_path_plus_gated_rest():
    model = _resnet20().eval()
    method = METHODS.get("channel_gating")({"partitions": 4}, 0.4)
    ctx = _context(model, CIFAR)
    method.prepare(model, ctx)
    counter = InstanceMacs(model, CIFAR)
    for gate in method.gates.values():  # every gate off: only the 1/4 base path is left in gated convs
        gate.shift.fill_(1e6)
    with torch.no_grad():
        model(torch.randn(2, *CIFAR))
    gated = sum(counter.layers[name].macs for name in method.gates)
    assert method.instance_macs(model, counter, 2).tolist() == pytest.approx([counter.dense - 0.75 * gated] * 2)


def test_fbs_keeps_exactly_k_channels_and_counts_them_in_the_next_conv():
    model = _resnet20().eval()
    method = METHODS.get("fbs")({}, 0.4)
    ctx = _context(model, CIFAR)
    method.prepare(model, ctx)
    counter = InstanceMacs(model, CIFAR)
    with torch.no_grad():
        model(torch.randn(3, *CIFAR))
    for site in method.gates:
        k = math.ceil(float(site.gate.density) * site.out_channels - 1e-6)
        assert site.gate.k == k
        assert ((site.mask != 0).sum(1) == k).all()  # fresh predictors: every saliency near 1, none zero
    in_kept, out_kept = kept_channels(method.gates)
    first = method.gates[0]
    assert first.consumer_names == ("layer1.0.conv2",) and in_kept["layer1.0.conv2"].tolist() == [first.gate.k] * 3
    reduction = 1 - method.instance_macs(model, counter, 3) / ctx.dense_macs
    assert (abs(reduction - 0.4) <= METHODS.get("fbs").budget_tolerance).all()


def test_fbs_deployed_batch1_form_matches_the_masked_model():
    model = _resnet20().eval()
    method = METHODS.get("fbs")({}, 0.55)
    method.prepare(model, _context(model, CIFAR))
    x = torch.randn(3, *CIFAR)
    deployed = method.deploy(model)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([deployed(x[i:i + 1]) for i in range(3)]), model(x),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("path", ["gathered", "dense"])
def test_fbs_deployed_mobilenetv2_pools_magnitudes_of_signed_block_inputs(path, compiled):
    """mobilenetv2's gate reads the block input, the output of a linear projection (signed): FBS's
    predictor reads mean |x|, so the deployed form must pool |x| there (compiled op or ATen), not x."""
    from manidp.gating import deployed_blocks
    from manidp.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone("mobilenetv2_100", 10, 3)
    method = METHODS.get("fbs")({"density": 0.5}, 0.3)
    method.prepare(model, _context(model, (3, 64, 64)))
    for site in method.gates:
        torch.nn.init.normal_(site.gate.fc.weight, std=1.0)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    deployed = method.deploy(model)
    for block in deployed_blocks(deployed).values():
        block.path, block.use_kernels = path, compiled
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([deployed(x[i:i + 1].clone()) for i in range(2)]), model(x),
                                   atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- timm resnet18 smoke
@pytest.mark.parametrize("name", BASELINES)
def test_resnet18_forward_backward_smoke(name):
    torch.manual_seed(0)
    input_size = (3, 64, 64)
    model = timm.create_model("resnet18", num_classes=10)
    val = [(torch.randn(2, *input_size), torch.tensor([0, 1]))]
    ctx = _context(model, input_size, val_loader=val)
    method = METHODS.get(name)({}, 0.4)
    model = method.prepare(model, ctx).train()
    method.on_train_start(model, ctx)
    loss, logits, _ = method.training_loss(model, *val[0], ctx)
    loss.backward()
    method.after_backward(model, ctx)
    assert logits.shape == (2, 10) and torch.isfinite(loss)
    method.on_epoch_end(model, ctx)
    model = method.finalize(model, ctx).eval()
    counter = InstanceMacs(model, input_size)
    with torch.no_grad():
        model(val[0][0])
    macs = method.instance_macs(model, counter, 2)
    assert (macs < ctx.dense_macs).all()


def test_auto_layers_prune_every_conv_where_the_graph_allows_it():
    bottleneck = timm.create_model("resnet50", num_classes=10)
    auto = channel_groups(bottleneck, (3, 32, 32), "auto")
    pruned_convs = {conv for g in auto for conv in g.convs}
    assert {"layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3", "layer1.0.downsample.0"} <= pruned_convs
    assert len(auto) == len(channel_groups(bottleneck, (3, 32, 32), "all"))
    option_a = _resnet20()  # zero-pad shortcuts: auto falls back to the first conv of each block
    assert channel_groups(option_a, CIFAR, "auto") == channel_groups(option_a, CIFAR, "first_conv")
    for name in ("fpgm", "sfp"):
        assert METHODS.get(name).default_options["layers"] == "auto"


def test_sfp_default_is_its_authors_schedule_zeroed_filters_are_not_held():
    assert METHODS.get("sfp")(budget=0.4).options["zero_grad"] is False
    assert "SFP authors' code" in METHODS.get("sfp")(budget=0.4).describe()["variant"]
    model = _resnet20().train()
    with torch.no_grad():  # a trained net's BN shifts: ReLU(shift) > 0 carries the gradient back
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.uniform_(0.1, 0.5)
    method = METHODS.get("sfp")({"silence_bn": False}, budget=0.4)  # the authors' forward
    ctx = _context(model, CIFAR)
    method.prepare(model, ctx)
    _soft_steps(method, model, ctx)
    moved = [float(model.get_submodule(key).weight[idxs].detach().abs().sum())
             for key, idxs in method.selection.items()]
    assert all(m > 0 for m in moved)  # no gradient mask: the zeroed filters keep updating
    method.on_epoch_end(model, ctx)  # the next soft step zeroes the new selection again
    for key, idxs in method.selection.items():
        assert model.get_submodule(key).weight[idxs].abs().sum() == 0


def test_soft_fraction_ends_the_soft_phase_with_the_selection_silenced_and_held():
    """The sweep's knob for fpgm/sfp: after round(fraction x epochs) soft epochs the authors' forward stops,
    the last selection is silenced and no longer moves, so the remaining epochs train what removal keeps."""
    model = _resnet20().train()
    with torch.no_grad():  # a trained net's BN shifts: ReLU(shift) > 0 carries the gradient back
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.uniform_(0.1, 0.5)
    method = METHODS.get("sfp")({"silence_bn": False, "soft_fraction": 0.5}, budget=0.4)
    ctx = _context(model, CIFAR)
    ctx.epochs = 2
    method.prepare(model, ctx)
    _soft_steps(method, model, ctx)
    assert not method.held and any(float(model.get_submodule(k).weight[i].detach().abs().sum()) > 0
                                   for k, i in method.selection.items())  # soft phase: zeroed filters regrow
    assert "held_filters" in method.on_epoch_end(model, ctx)  # end of epoch 1 of 2: the soft phase is over
    held = {key: list(idxs) for key, idxs in method.selection.items()}
    ctx.epoch = 1
    for _ in range(2):
        loss, _, _ = method.training_loss(model, torch.randn(8, *CIFAR), torch.randint(0, 10, (8,)), ctx)
        loss.backward()
        method.after_backward(model, ctx)
        method.after_step(model, ctx)
    assert method.on_epoch_end(model, ctx) == {} and method.selection == held
    for key, idxs in held.items():
        bn = model.get_submodule(key.replace("conv", "bn"))
        assert model.get_submodule(key).weight[idxs].abs().sum() == 0 and bn.bias[idxs].abs().sum() == 0
    with pytest.raises(UserError, match="soft_fraction"):
        METHODS.get("fpgm")({"soft_fraction": 1.5}, budget=0.4)


@pytest.mark.parametrize("name", ["fpgm", "sfp"])
def test_soft_pruning_records_equal_masked_and_pruned_validation_accuracy(name):
    model = _resnet20().train()
    generator = torch.Generator().manual_seed(0)
    val = [(torch.randn(16, *CIFAR, generator=generator), torch.randint(0, 10, (16,), generator=generator))]
    method = METHODS.get(name)(budget=0.4)
    ctx = _context(model, CIFAR, val_loader=val)
    method.prepare(model, ctx)
    _soft_steps(method, model, ctx)
    method.on_epoch_end(model, ctx)
    model.eval()
    with torch.no_grad():
        masked_logits = model(val[0][0])
    pruned = method.finalize(model, ctx)
    with torch.no_grad():
        torch.testing.assert_close(pruned(val[0][0]), masked_logits, atol=1e-5, rtol=1e-4)
    final = method.final_metrics()
    assert final["val_top1_masked"] == final["val_top1_pruned"]


def test_channel_gating_sparse_backprop_only_where_the_gate_is_on():
    """The authors train with --sparse_bp: no gradient through the gate step where the gate is off."""
    from baselines.channel_gating import GatedConv2d, _StraightThroughStep

    x = torch.tensor([-1.0, -0.1, 0.2, 1.0], requires_grad=True)
    for sparse, expected_zero in ((True, [True, True, False, False]), (False, [False] * 4)):
        x.grad = None
        _StraightThroughStep.apply(x, 2.0, sparse).sum().backward()
        assert (x.grad == 0).tolist() == expected_zero
    assert METHODS.get("channel_gating").default_options["sparse_bp"] is True
    assert METHODS.get("channel_gating")(budget=0.5).describe()["title"] == (
        "CGNet-style channel gating (budget-calibrated)")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
    x = torch.randn(4, 8, 6, 6)
    grads = {}
    for sparse in (True, False):
        gate = GatedConv2d(copy.deepcopy(conv), 4, 0.5, sparse_bp=sparse).train()
        gate(x).sum().backward()
        grads[sparse] = gate.delta.grad.abs().sum()
    assert grads[True] < grads[False]  # the off activations no longer pull on the thresholds
