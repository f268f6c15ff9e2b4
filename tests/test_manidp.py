"""ManiDP: loss terms, thresholds (single process and DDP), budget, and a short digits-c run."""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket

import pandas as pd
import pytest
import torch
import torch.nn as nn

from conftest import small_run_config
from manidp.errors import UserError
from manidp.macs import InstanceMacs, count_macs
from manidp.methods import METHODS, RunContext, load_all
from manidp.methods.manidp import (ManiDP, SaliencyGate, instance_weights, keep_rate_schedule, quantile_threshold,
                                   rank_threshold, similarity_loss, sparsity_loss)
from manidp.models import build_backbone

load_all()


# ---------------------------------------------------------------- loss terms
def test_instance_weights_by_hand():
    losses = torch.tensor([0.2, 0.5, 1.0, 2.0])
    assert torch.allclose(instance_weights(losses, 1.0), torch.tensor([0.8, 0.5, 0.0, 0.0]))
    assert torch.allclose(instance_weights(losses, 1.0, gamma=2.0), torch.tensor([0.64, 0.25, 0.0, 0.0]))


def test_beta_weights_easy_instances_and_zeroes_hard_ones_and_detaching_matters():
    losses = torch.tensor([0.1, 0.4, 0.9, 3.0], requires_grad=True)
    beta = instance_weights(losses, complexity=1.0)
    assert (beta[:3] > 0).all() and beta[3] == 0
    assert beta[0] > beta[1] > beta[2]  # the easier, the heavier the sparsity weight
    beta.sum().backward()
    # undetached, the sparsity term pays an instance for a *higher* CE: hence detach_beta=True
    assert (losses.grad[:3] < 0).all() and losses.grad[3] == 0


def test_sparsity_loss_by_hand():
    layer1 = torch.tensor([[1.0, 3.0], [2.0, 2.0]])  # per-instance channel means 2, 2
    layer2 = torch.tensor([[0.0, 4.0, 2.0], [3.0, 0.0, 0.0]])  # 2, 1
    beta = torch.tensor([0.5, 1.0])
    # layer1: (0.5*2 + 1*2)/2 = 1.5; layer2: (0.5*2 + 1*1)/2 = 1.0
    assert sparsity_loss([layer1, layer2], beta).item() == pytest.approx(2.5)


def test_similarity_loss_by_hand():
    saliency = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # T = identity
    features = torch.tensor([[1.0, 1.0], [3.0, 3.0]])  # R = all ones
    assert similarity_loss(saliency, features).item() == pytest.approx(2 / 4)  # two off-diagonal 1s / B^2
    assert similarity_loss(features, features).item() == pytest.approx(0.0, abs=1e-7)


def test_keep_rate_anneals_from_one_to_the_target():
    rates = [keep_rate_schedule(e, 10, 0.4) for e in range(10)]
    assert 0.98 < rates[0] < 1 and rates[-1] == pytest.approx(0.4)
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_rank_threshold_is_the_ceil_rank_largest_mean():
    means = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.7])
    assert rank_threshold(means, 0.6).item() == pytest.approx(0.5)  # ceil(3.0) = 3rd largest
    assert rank_threshold(means, 0.5).item() == pytest.approx(0.5)  # ceil(2.5) = 3rd largest
    assert rank_threshold(means, 1.0).item() == pytest.approx(0.1)


# ---------------------------------------------------------------- gate
def test_gate_starts_near_identity_and_stays_fp32_under_autocast():
    gate = SaliencyGate(16, 32)
    x = torch.randn(4, 16, 8, 8)
    mask = gate(x)
    assert torch.allclose(mask, torch.ones_like(mask), atol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gate(x.bfloat16())
    assert gate.saliency.dtype == torch.float32
    gate.threshold.fill_(float(gate.saliency.detach().median()))
    mask = gate(x)
    kept = gate.saliency >= gate.threshold
    assert torch.equal(mask, gate.saliency * kept)  # kept channels scaled by pi, the others exactly 0


def test_hidden_width_follows_the_reference():
    assert SaliencyGate(16, 64).fc1.out_features == 64
    assert SaliencyGate(64, 128).fc1.out_features == 64
    assert SaliencyGate(64, 128).fc1.bias is None


# ---------------------------------------------------------------- method object
def test_variants_are_registered_with_their_defaults():
    assert METHODS.get("manidp_no_manifold")(budget=0.5).options["eta"] == 0
    assert METHODS.get("manidp_no_complexity")(budget=0.5).options["no_complexity"] is True
    plain = METHODS.get("manidp_plain")(budget=0.5).options
    assert plain["eta"] == 0 and plain["no_complexity"] is True
    assert ManiDP(budget=0.5).options["detach_beta"] is True
    assert all(issubclass(METHODS.get(n), ManiDP) and METHODS.get(n).dynamic
               for n in ("manidp", "manidp_no_manifold", "manidp_no_complexity", "manidp_plain"))


def test_user_mistakes_are_reported():
    with pytest.raises(UserError, match="needs a budget"):
        ManiDP()
    with pytest.raises(UserError, match="no option"):
        ManiDP({"lambda": 0.1}, budget=0.5)
    method = ManiDP(budget=0.999)
    model, ctx = _model_and_context(method)
    with pytest.raises(UserError, match="out of reach"):
        method.prepare(model, ctx)


def _model_and_context(method, world_size=1, rank=0, steps=4, train_loader=None):
    torch.manual_seed(0)
    model = build_backbone("cifar_resnet20", 10, 1)
    config = {"train": {"label_smoothing": 0.0, "lr": 0.01}}
    ctx = RunContext(config=config, device=torch.device("cpu"), input_size=(1, 16, 16), num_classes=10,
                     dense_macs=count_macs(model, (1, 16, 16)), epochs=2, steps_per_epoch=steps,
                     train_loader=train_loader, autocast=contextlib.nullcontext, world_size=world_size, rank=rank,
                     log=lambda _: None)
    return model, ctx


def test_gates_get_no_weight_decay_and_their_own_learning_rate():
    method = ManiDP({"gate_lr_scale": 3.0}, budget=0.5)
    model, ctx = _model_and_context(method)
    model = method.prepare(model, ctx)
    gate_params = {id(p) for g in method.gates for p in g.parameters()}
    groups = method.param_groups(model, 5e-4)
    for group in groups:
        if any(id(p) in gate_params for p in group["params"]):
            assert all(id(p) in gate_params for p in group["params"])
            assert group["weight_decay"] == 0 and group["lr"] == pytest.approx(0.03)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_the_authors_variant_is_registered_and_every_run_names_its_variant():
    authors = METHODS.get("manidp_authors")(budget=0.5)
    assert authors.options["threshold_rule"] == "mean_rank" and authors.options["gate_lr_scale"] == 1.0
    assert authors.options["detach_beta"] is False and authors.dynamic
    assert "authors' code" in authors.describe()["variant"]
    ours = ManiDP(budget=0.5).describe()["variant"]
    assert "quantile thresholds, gate lr x10, detached beta" in ours and "chosen on validation" in ours


def test_the_authors_gate_init_weight_decay_and_keep_rate_index_are_one_option_away():
    torch.manual_seed(0)
    ours, theirs = SaliencyGate(64, 64), SaliencyGate(64, 64, fc1_init="kaiming_normal", fc2_init="kaiming_normal")
    assert theirs.fc1.weight.std() > 2 * ours.fc1.weight.std()  # kaiming_normal: std sqrt(2 / fan_in)
    assert theirs.fc2.weight.std() > 100 * ours.fc2.weight.std() and (theirs.fc2.bias == 1).all()
    method = ManiDP({"norm_decay": True, "fc1_init": "kaiming_normal"}, budget=0.5)
    model, ctx = _model_and_context(method)
    model = method.prepare(model, ctx)
    assert method.gates[0].gate.fc1.weight.std() > 0.15  # the option reaches the gates
    decayed = {id(p) for g in method.param_groups(model, 5e-4) if g["weight_decay"] for p in g["params"]}
    assert id(model.bn1.weight) in decayed and id(model.bn1.bias) in decayed
    assert not decayed & {id(p) for g in method.gates for p in g.parameters()}
    rates = {}
    for index in ("update", "epoch"):
        method = ManiDP({"keep_rate_index": index, "threshold_rule": "mean_rank"}, budget=0.5)
        model, ctx = _model_and_context(method)
        model = method.prepare(model, ctx)
        method.complexity = 1.0
        method.training_loss(model, torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,)), ctx)
        ctx.epochs, ctx.epoch, ctx.step = 4, 1, ctx.steps_per_epoch - 1  # the end of epoch 1 of 4
        method.after_step(model, ctx)
        rates[index] = method.keep_rate
    target = method.keep_rate_target
    assert rates["epoch"] == pytest.approx(keep_rate_schedule(1, 4, target))  # the authors' r_e, e = 1
    assert rates["update"] == pytest.approx(keep_rate_schedule(0, 3, target))  # first of 3 updates
    with pytest.raises(UserError, match="keep_rate_index"):
        ManiDP({"keep_rate_index": "step"}, budget=0.5)


def test_keep_rate_target_meets_the_budget_statically():
    method = ManiDP(budget=0.4)
    model, ctx = _model_and_context(method)
    method.prepare(model, ctx)
    assert 0.3 < method.keep_rate_target < 0.9


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "mobilenetv2_100"])
def test_a_training_step_runs_on_every_backbone_family_under_bf16_autocast(backbone):
    """A synthetic-shape smoke: losses finite, gradients reach the gates, the gate path stays fp32."""
    torch.manual_seed(0)
    method = ManiDP(budget=0.4)
    model = build_backbone(backbone, 10, 3)
    ctx = RunContext(config={"train": {"label_smoothing": 0.1, "lr": 0.01}}, device=torch.device("cpu"),
                     input_size=(3, 32, 32), num_classes=10, dense_macs=count_macs(model, (3, 32, 32)), epochs=1,
                     steps_per_epoch=1, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    model = method.prepare(model, ctx).train()
    method.complexity = 5.0  # every instance easy: the sparsity term is active
    with ctx.autocast():
        loss, logits, logs = method.training_loss(model, torch.randn(4, 3, 32, 32), torch.arange(4), ctx)
    loss.backward()
    assert torch.isfinite(loss) and logs["loss_sparse"] > 0 and logs["loss_sim"] >= 0
    assert all(g.gate.saliency.dtype == torch.float32 and g.features.dtype == torch.float32 for g in method.gates)
    assert all(g.gate.fc2.bias.grad is not None and g.gate.fc2.bias.grad.abs().sum() > 0 for g in method.gates)


def _batches(sizes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 16, 16, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for n in sizes]


def _run_statistics_epoch(method, model, ctx, batches):
    """Feed batches through training_loss/after_step (no optimizer: weights stay fixed) and end the epoch."""
    model.eval()  # per-instance saliencies, independent of how instances are batched
    method.on_train_start(model, ctx)
    ctx.epoch = 1  # the last epoch of two: thresholds land on the target keep rate
    seen, losses = [], []
    with torch.no_grad():
        for step, (images, targets) in enumerate(batches):
            ctx.step = step
            _, logits, _ = method.training_loss(model, images, targets, ctx)
            seen.append([g.gate.saliency.clone() for g in method.gates])
            losses.append(nn.functional.cross_entropy(logits, targets, reduction="none"))
            method.after_step(model, ctx)
    row = method.on_epoch_end(model, ctx)
    return seen, torch.cat(losses), row


AUTHORS_RULE = {"threshold_rule": "mean_rank", "threshold_updates_per_epoch": 1, "threshold_from_epoch": 0}


def test_threshold_update_matches_a_brute_force_ranking():
    batches = _batches([8, 8, 5])
    method = METHODS.get("manidp_no_manifold")(AUTHORS_RULE, budget=0.5)
    model, ctx = _model_and_context(method, steps=len(batches), train_loader=batches)
    model = method.prepare(model, ctx)
    for g in method.gates:  # instance-dependent saliencies
        nn.init.normal_(g.gate.fc2.weight, std=0.3)
    seen, losses, row = _run_statistics_epoch(method, model, ctx, batches)
    rate = method.keep_rate_target
    assert row["keep_rate"] == pytest.approx(rate)
    for layer, g in enumerate(method.gates):
        means = torch.cat([s[layer] for s in seen]).mean(0)  # over all 21 instances, not the batch means
        ranked = sorted(means.tolist(), reverse=True)
        assert g.gate.threshold.item() == pytest.approx(ranked[math.ceil(rate * len(ranked)) - 1], rel=1e-5)
    assert method.complexity == pytest.approx(0.5 * losses.mean().item(), rel=1e-5)


def _ddp_worker(rank, world_size, port, batches_per_rank, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    batches = batches_per_rank[rank]
    method = METHODS.get("manidp_no_manifold")(AUTHORS_RULE, budget=0.5)
    model, ctx = _model_and_context(method, world_size, rank, steps=len(batches), train_loader=batches)
    model = method.prepare(model, ctx)
    for g in method.gates:
        nn.init.normal_(g.gate.fc2.weight, std=0.3, generator=torch.Generator().manual_seed(7))
    _run_statistics_epoch(method, model, ctx, batches)
    torch.save({"thresholds": [g.gate.threshold.item() for g in method.gates], "complexity": method.complexity},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_threshold_statistics_equal_single_process(tmp_path):
    import torch.multiprocessing as mp

    batches = _batches([8, 8, 8, 3])  # uneven shards: the true instance count matters
    shards = [[batches[0], batches[2]], [batches[1], batches[3]]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, shards, str(tmp_path)), nprocs=2, join=True)

    method = METHODS.get("manidp_no_manifold")(AUTHORS_RULE, budget=0.5)
    model, ctx = _model_and_context(method, steps=len(batches), train_loader=batches)
    model = method.prepare(model, ctx)
    for g in method.gates:
        nn.init.normal_(g.gate.fc2.weight, std=0.3, generator=torch.Generator().manual_seed(7))
    _run_statistics_epoch(method, model, ctx, batches)
    single = [g.gate.threshold.item() for g in method.gates]
    for rank in range(2):
        ddp = torch.load(tmp_path / f"rank{rank}.pt")
        assert ddp["thresholds"] == pytest.approx(single, rel=1e-5)
        assert ddp["complexity"] == pytest.approx(method.complexity, rel=1e-5)


# ---------------------------------------------------------------- a short digits-c run
_TRAINED: dict = {}


def trained_manidp_run(tmp_path_factory, data_cache, dense_run):
    """Two short epochs from the session's dense run, trained once per test session (test_latency uses it)."""
    from manidp.engine import train

    if "run" not in _TRAINED:
        out = tmp_path_factory.mktemp("manidp") / "run"
        # digits-c's short schedule at the first sweep's lr and lam: the test checks the mechanics (budget,
        # annealing, per-instance MACs), which two short epochs at config.yaml's larger lr would make noisier
        options = {"threshold_from_epoch": 0, "threshold_updates_per_epoch": 4, "anneal_epochs": 1, "lam": 0.05}
        _TRAINED["run"] = train(small_run_config(out, data_cache, method="manidp", budget=0.4,
                                                 init_from=str(dense_run), method_options=options,
                                                 **{"train.lr": 0.03}))
    return _TRAINED["run"]


@pytest.fixture
def manidp_run(tmp_path_factory, data_cache, dense_run):
    return trained_manidp_run(tmp_path_factory, data_cache, dense_run)


def test_short_run_meets_the_budget_and_keeps_accuracy(manidp_run, dense_run):
    metrics = json.loads((manidp_run / "metrics.json").read_text())
    assert abs(metrics["macs_reduction"] - 0.4) <= 0.02  # the test split, calibrated on validation only
    assert metrics["test_top1"] > 20  # chance is 10 %; the dense run reaches about 40 % in its two epochs
    history = [json.loads(line) for line in (manidp_run / "history.jsonl").read_text().splitlines()]
    # thresholds anneal during the first epoch and train at the target keep rate in the last
    assert history[-1]["keep_rate"] == pytest.approx(metrics["method_info"]["keep_rate_target"])
    assert 1 > history[0]["kept_fraction"] > history[-1]["kept_fraction"]
    assert metrics["method_info"]["calibration"]["keep_rate"] > 0
    for key in ("spearman_macs_severity", "spearman_macs_dense_loss", "macs_p10", "macs_p90"):
        assert key in metrics
    table = pd.read_csv(manidp_run / "instances_test.csv")
    assert table["macs"].nunique() > 10  # per instance, not once for the model
    assert table["macs"].max() < metrics["macs_dense"]


def test_saved_run_reloads_and_its_deployed_form_matches(manidp_run):
    from manidp.data import build_dataset
    from manidp.engine import evaluate_run, load_model

    metrics = json.loads((manidp_run / "metrics.json").read_text())
    summary = evaluate_run(manidp_run, "test", out_file=manidp_run.parent / "re-eval.csv")
    assert summary["test_top1"] == pytest.approx(metrics["test_top1"])
    assert summary["macs"] == pytest.approx(metrics["macs"])
    model, method, cfg, _ = load_model(manidp_run)
    images = torch.stack([build_dataset(cfg["dataset"], cfg["data"], seed=cfg["seed"]).test[i][0]
                          for i in range(8)])
    with torch.no_grad():
        masked = model(images)
        deployed = method.deploy(model)
        out = torch.cat([deployed(images[i:i + 1]) for i in range(8)])
    assert (out - masked).abs().max() / masked.abs().max() <= 1e-4


# ---------------------------------------------------------------- budget calibration
def _chained_gated_model(method):
    """A gated ResNet-20 whose saliencies follow the magnitude of each gate's input.

    Non-negative gate weights make every saliency grow with the pooled input,
    and that input shrinks as upstream gates prune: statistics collected
    before the upstream thresholds move are stale for every later layer.
    """
    model, ctx = _model_and_context(method)
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(192, 1, 16, 16, generator=generator)
    targets = torch.randint(0, 10, (192,), generator=generator)
    ctx.val_loader = [(images[i:i + 64], targets[i:i + 64]) for i in range(0, 192, 64)]
    model = method.prepare(model, ctx)
    for g in method.gates:
        g.gate.fc1.weight.data = torch.rand(g.gate.fc1.weight.shape, generator=generator) / g.in_channels ** 0.5
        g.gate.fc2.weight.data = torch.rand(g.gate.fc2.weight.shape, generator=generator) * 2 / g.gate.fc1.out_features
        g.gate.fc2.bias.data.zero_()
    for module in model.modules():  # BN that passes signal, so masks upstream change magnitudes downstream
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.uniform_(0.0, 0.3, generator=generator)
    return model.eval(), ctx


def _layer_kept_fractions(method, model, ctx) -> list[float]:
    kept, total = [0.0] * len(method.gates), 0
    with torch.no_grad():
        for images, _ in ctx.val_loader:
            model(images)
            for i, g in enumerate(method.gates):
                kept[i] += float((g.mask != 0).float().mean(1).sum())
            total += len(images)
    return [k / total for k in kept]


def test_calibration_sets_thresholds_in_forward_order_and_meets_the_budget():
    """Regression: knots collected once (with the trained thresholds) left later layers pruned far below
    the keep rate the search settled on. Forward order keeps every layer at the calibrated keep rate."""
    method = ManiDP({"calibrate": True}, budget=0.5)
    model, ctx = _chained_gated_model(method)
    method.finalize(model, ctx)
    calibration = method.calibration
    assert abs(calibration["val_macs_reduction"] - 0.5) <= 0.01
    fractions = _layer_kept_fractions(method, model, ctx)
    # every layer keeps the calibrated share of its (instance, channel) pairs, within 5 points
    assert max(abs(f - calibration["keep_rate"]) for f in fractions) <= 0.05, fractions
    assert max(fractions) - min(fractions) <= 0.1, fractions
    # the budget holds on the very masks the model produces, gates counted
    counter = InstanceMacs(model, ctx.input_size)
    reduction, _ = method.validation_pass(model, counter, ctx)
    assert reduction == pytest.approx(calibration["val_macs_reduction"], abs=1e-9)
    final = method.final_metrics()
    assert set(final) >= {"val_top1_before_calibration", "val_top1_after_calibration"}


def _thresholds(method) -> list[float]:
    return [float(site.gate.threshold) for site in method.gates]


@pytest.mark.parametrize("backbone", ["cifar_resnet20", "resnet50", "mobilenetv2_100"])
def test_thresholds_set_block_by_block_equal_a_pass_per_gate_bit_for_bit(backbone):
    """Each gated block run alone on its held inputs gives the saliencies the pass from the images gives:
    every threshold equal, on every gated block family (a Bottleneck holds two gates)."""
    if backbone == "cifar_resnet20":
        method = ManiDP(budget=0.5)
        model, ctx = _chained_gated_model(method)
    else:
        torch.manual_seed(0)
        method = ManiDP(budget=0.4)
        model = build_backbone(backbone, 10, 3)
        size = 16 if backbone == "resnet50" else 32  # mobilenetv2's gates cost more than they save at 16 px
        ctx = RunContext(config={"train": {"label_smoothing": 0.0, "lr": 0.01}}, device=torch.device("cpu"),
                         input_size=(3, size, size), num_classes=10, dense_macs=count_macs(model, (3, size, size)),
                         epochs=1, steps_per_epoch=1, autocast=contextlib.nullcontext)
        generator = torch.Generator().manual_seed(1)
        ctx.val_loader = [(torch.randn(n, 3, size, size, generator=generator), None) for n in (4, 4, 3)]
        model = method.prepare(model, ctx).eval()
        for site in method.gates:  # saliencies spread around the thresholds, not all near one value
            site.gate.fc2.bias.data.normal_(1, 1, generator=generator)
    held = method._held_blocks(model, ctx)
    assert held is not None and held[1] == 0 and sum(len(b.gates) for b in held[0]) == len(method.gates)
    method._set_keep_rate(model, ctx, 0.5)
    per_gate = _thresholds(method)
    method._set_keep_rate(model, ctx, 0.5, held=held)
    assert _thresholds(method) == per_gate
    assert len(set(per_gate)) > 1


def test_calibration_is_the_same_whichever_blocks_fit_the_memory_cap():
    """The whole calibration (search, measured reductions, top-1) is the same with every block's inputs
    held, with only the last stage's (the earlier gates by passes from the images, as ImageNet's early
    blocks at 224 px) and with none (a pass per gate)."""
    calibrations, logs = [], []
    for cap in ("all", "last stage", 0):
        method = ManiDP(budget=0.5)
        model, ctx = _chained_gated_model(method)
        ctx.val_loader = ctx.val_loader[:2]
        if cap == "last stage":  # ResNet-20's last stage: 16 x 4 x 4 maps of 64 channels at 16 px
            cap = 128 * min(b.bytes_per_instance for b in method._held_blocks(model, ctx)[0])
        if cap != "all":
            method.calibration_cache_bytes = cap
        held = method._held_blocks(model, ctx)
        logs.append([])
        ctx.log = logs[-1].append
        method.finalize(model, ctx)
        calibrations.append((held and held[1], method.calibration, method.final_metrics()))
    assert [start for start, _, _ in calibrations] == [0, 7, None]
    assert calibrations[0][1:] == calibrations[1][1:] == calibrations[2][1:]
    assert any("up to each of the first 14 gates" in line for line in logs[1]), logs[1]
    assert any("up to each gate (every gated block's inputs for 128 instances are over 0 bytes)" in line
               for line in logs[2]), logs[2]


def test_calibration_passes_up_to_each_gate_where_blocks_do_not_chain():
    """Blocks alone give the model's saliencies only when each block's input is the previous one's output,
    unchanged: an in-place op between blocks, or a block that changes its input, sends the calibration the
    long way, and the log says why."""
    from manidp.methods.manidp.calibration import block_chain

    method = ManiDP(budget=0.5)
    model, ctx = _chained_gated_model(method)
    images = ctx.val_loader[0][0]
    blocks = [m for m in model.modules() if any(isinstance(c, type(method.gates[0])) for c in m.children())]
    between = blocks[1].register_forward_pre_hook(lambda module, args: args[0].mul_(1.0))
    assert block_chain(model, method.gates, images, contextlib.nullcontext) == (
        "block 1's input is not block 0's output unchanged")
    between.remove()
    inside = blocks[2].conv1.register_forward_pre_hook(lambda module, args: args[0].add_(0.0))
    assert block_chain(model, method.gates, images, contextlib.nullcontext) == "block 2 changes its input in place"
    logged = []
    ctx.log = logged.append
    ctx.val_loader = ctx.val_loader[:1]
    method.finalize(model, ctx)
    inside.remove()
    assert any("up to each gate (block 2 changes its input in place)" in line for line in logged), logged
    assert abs(method.calibration["val_macs_reduction"] - 0.5) <= 0.01
    assert isinstance(block_chain(model, method.gates, images, contextlib.nullcontext), list)


def test_quantile_threshold_keeps_the_requested_share():
    values = torch.arange(1000, dtype=torch.float32).view(100, 10)
    for rate in (0.0, 0.25, 0.6, 1.0):
        threshold = quantile_threshold(values, rate)
        assert float((values >= threshold).float().mean()) == pytest.approx(rate, abs=1e-3)


def test_training_thresholds_follow_the_quantile_of_recent_instances():
    batches = _batches([8, 8, 5])
    method = METHODS.get("manidp_no_manifold")({"threshold_updates_per_epoch": 1, "threshold_from_epoch": 0},
                                               budget=0.5)
    model, ctx = _model_and_context(method, steps=len(batches), train_loader=batches)
    model = method.prepare(model, ctx)
    for g in method.gates:
        nn.init.normal_(g.gate.fc2.weight, std=0.3)
    seen, _, row = _run_statistics_epoch(method, model, ctx, batches)
    rate = method.keep_rate_target
    for layer, g in enumerate(method.gates):
        window = torch.cat([s[layer] for s in seen])
        assert g.gate.threshold.item() == pytest.approx(float(quantile_threshold(window, rate)), rel=1e-6)


def test_complexity_and_beta_use_the_unsmoothed_cross_entropy():
    """Label smoothing (the ImageNet recipe's 0.1) puts a floor under every CE; beta must not see it."""
    batches = _batches([8, 8])
    method = ManiDP({"eta": 0.0}, budget=0.5)
    model, ctx = _model_and_context(method, steps=len(batches), train_loader=batches)
    ctx.config["train"]["label_smoothing"] = 0.1
    model = method.prepare(model, ctx).eval()
    method.on_train_start(model, ctx)
    with torch.no_grad():
        plain = torch.cat([nn.functional.cross_entropy(model(x), y, reduction="none") for x, y in batches])
    assert method.complexity == pytest.approx(0.5 * plain.mean().item(), rel=1e-5)
    images, targets = batches[0]
    loss, logits, _ = method.training_loss(model, images, targets, ctx)
    smoothed = nn.functional.cross_entropy(logits, targets, label_smoothing=0.1)
    beta = instance_weights(nn.functional.cross_entropy(logits, targets, reduction="none"), method.complexity)
    sparse = sum((beta * g.gate.saliency.mean(1)).mean() for g in method.gates)
    assert loss.item() == pytest.approx((smoothed + 0.1 * sparse).item(), rel=1e-5)


def test_inference_gate_gives_the_training_gate_s_mask_bit_for_bit():
    """The deployed form's gate folds relu/clamp/threshold into fewer ops; its mask must not move,
    a saliency exactly at the threshold included (kept: pi >= threshold)."""
    from manidp.methods.manidp import SaliencyGate

    torch.manual_seed(0)
    gate = SaliencyGate(16, 24, clamp_max=1.5).eval()
    torch.nn.init.normal_(gate.fc2.weight, std=1.0)
    torch.nn.init.normal_(gate.fc2.bias, std=0.5)
    x = torch.randn(8, 16, 5, 5)
    with torch.no_grad():
        pi = torch.relu(gate.fc2(torch.relu(gate.fc1(x.mean((2, 3)))))).clamp(max=1.5)
        for threshold in (-1e4, 0.0, 0.3, float(pi[pi > 0].median()), 1.5, 2.0):
            gate.threshold.fill_(threshold)
            expected, slim = gate(x), gate.inference_form()(x)
            assert torch.equal(expected, slim), threshold
            assert (expected == 0).any() or threshold <= 0
