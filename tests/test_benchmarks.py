"""The benchmark scripts the README documents run, report what they claim and refuse bad input cleanly.

Timings here prove nothing (shared machine, one repeat); the checks are on the fields, on the deployed
outputs' agreement with the masked model, and on the errors.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from manidp import kernels
from manidp.gating import deployed_blocks
from test_manidp import trained_manidp_run

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    if str(BENCHMARKS) not in sys.path:  # as `python benchmarks/NAME.py` has it: the scripts import each other
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_resnet34_latency_reports_a_deployed_form_equal_to_the_masked_model(capsys, restore_threads):
    """Both keep patterns: deployed == masked, the regime recorded (first-pass hit rate, distinct kept sets),
    planning and warm-up on other instances than the timed ones, and the dense cross-check row."""
    script = _script("resnet34_latency")
    assert script.main(["--threads", "1", "--repeats", "1", "--warmup", "0", "--instances", "2",
                        "--no-inductor", "--size", "64"]) == 0  # the fields, not the speed: a small input
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    check, static, per_instance = rows
    assert check["benchmark"] == "resnet34_dense_crosscheck" and check["reference_over_independent"] > 0
    assert "onednn/channels_last" in check["dense_reference"]["candidates_ms"]
    for report in (static, per_instance):
        assert report["benchmark"] == "resnet34_latency" and report["threads"] == 1
        assert report["deployed_max_rel_error"] <= 1e-4
        assert sum(report["dispatch_summary"].values()) == 16  # resnet34's 16 BasicBlocks, each planned
        assert report["gate_kernel"] == kernels.status()
        assert report["latency_ratio"] == pytest.approx(report["deployed_ms"] / report["dense_ms"])
        assert len(report["distinct_kept_sets"]) == 32 and report["plan_instances"] == 2
        assert report["dense_reference"] == check["dense_reference"]  # one reference for every row
    assert static["keep_pattern"] == "static" and abs(static["macs_ratio"] - 0.45) < 0.02  # 55 % fewer MACs
    assert set(static["distinct_kept_sets"]) == {1}
    assert static["first_pass_hit_rate"] == 1.0  # the planning instances kept the same sets: all cached
    assert per_instance["keep_pattern"] == "per_instance" and 0.3 < per_instance["macs_ratio"] < 0.6
    assert set(per_instance["distinct_kept_sets"]) == {2}  # each timed instance its own kept set, every gate
    if per_instance["dispatch_summary"].get("gathered"):  # the plan may put every block on dense-then-mask
        assert per_instance["first_pass_hit_rate"] < 0.5  # neither the plan nor the warm-up saw them
        # each timed pass is a first pass: the cache is restored, so repeats find no slice an earlier one left
        assert per_instance["slice_cache"]["hit_rate"] == pytest.approx(per_instance["first_pass_hit_rate"])
    else:
        assert per_instance["first_pass_hit_rate"] is None  # no block asked the slice cache


def test_resnet34_latency_repeats_the_measurement_in_fresh_processes(capsys):
    """--processes N: N children, each line tagged with its process, and a summary of their paired ratios."""
    script = _script("resnet34_latency")
    assert script._without_processes(["--processes", "3", "--threads", "1", "--processes=2"]) == ["--threads", "1"]
    assert script.main(["--processes", "2", "--patterns", "static", "--threads", "1", "--repeats", "6",
                        "--warmup", "0", "--instances", "1", "--plan-instances", "1", "--no-inductor",
                        "--size", "64"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    measured = [r for r in rows if r["benchmark"] == "resnet34_latency"]
    assert [r["process"] for r in measured] == [0, 1]
    assert all(r["latency_ratio_paired"]["n"] == 6 and r["latency_ratio_paired"]["low"] is not None
               for r in measured)
    (summary,) = [r for r in rows if r["benchmark"] == "resnet34_latency_processes"]
    values = [r["latency_ratio_paired"]["median"] for r in measured]
    assert summary["latency_ratio_paired"] == values and summary["processes"] == 2
    assert (summary["keep_pattern"], summary["threads"]) == ("static", 1)
    assert summary["min"] == min(values) <= summary["median"] <= summary["max"] == max(values)


def test_thread_switch_times_the_repacked_the_stale_and_a_fresh_deployed_form(capsys, restore_threads):
    """One line per path and switch; the script itself checks that the stale copy runs the old count's packs
    and the switched copy new ones (it exits otherwise)."""
    script = _script("thread_switch")
    assert script.main(["--size", "32", "--repeats", "1", "--warmup", "0", "--instances", "1",
                        "--switches", "1:2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["path"], r["threads_before"], r["threads_after"]) for r in rows] == [("gathered", 1, 2),
                                                                                      ("dense", 1, 2)]
    for row in rows:
        assert set(row["ms"]) == {"fresh", "switched", "stale"} and row["over_fresh"]["fresh"] == 1.0
        assert row["profile"]["threads"] == 2
    with pytest.raises(SystemExit):
        script.main(["--switches", "1-2"])
    assert "BEFORE:AFTER" in capsys.readouterr().err


def test_miss_path_times_every_way_of_paying_a_miss_on_the_same_output(capsys, restore_threads):
    """Each row computes the hit's output (the script checks it before timing), one JSON line per stage."""
    assert _script("miss_path").main(["--repeats", "1", "--keep", "0.5"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["channels"], r["size"]) for r in rows] == [(64, 56), (128, 28), (256, 14), (512, 7)]
    for row in rows:
        assert {"dense", "hit", "miss_oihw", "miss_channels_last", "miss_unpacked", "gemm_im2col", "hit_padded",
                "hit_exact_inputs"} <= set(row["ms"])
        assert row["kept_padded"] % 16 == 0 and row["kept"] <= row["kept_padded"] < row["kept"] + 16
        assert row["over_dense"]["dense"] == 1.0 and row["kept"] == row["channels"] // 2


def test_unseen_instances_times_padded_and_unpadded_sets(capsys, restore_threads):
    script = _script("unseen_instances")
    assert script.main(["--instances", "1", "--plan-instances", "1", "--size", "64"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["benchmark"] == "resnet34_unseen_instances" and set(row["ms"]) == {"dense", "padded_16", "unpadded"}
    assert all(len(t) == 1 for t in row["ms_each"].values())  # each unseen instance runs once per model


@pytest.mark.parametrize("switch", ["fused_glue", "use_kernels"])
def test_block_switches_times_every_gathered_block_both_ways(capsys, restore_threads, switch):
    """One line per gathered block with both medians and the paired ratio, and a total that adds them up;
    the switch is left on."""
    script = _script("block_switches")
    assert script.main(["--switch", switch, "--repeats", "6", "--warmup", "1", "--size", "64"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    blocks, total = rows[:-1], rows[-1]
    assert total["benchmark"] == "block_switch_total" and total["gathered_blocks"] == len(blocks) > 0
    assert all(r["benchmark"] == "block_switch" and r["switch"] == switch for r in blocks)
    assert all(r["on_over_off_paired"]["n"] == 6 and r["on_over_off_paired"]["low"] is not None for r in blocks)
    assert total["saved_us"] == pytest.approx(sum(r["saved_us"] for r in blocks))


def test_block_switches_refuses_bad_counts(capsys):
    with pytest.raises(SystemExit) as stop:
        _script("block_switches").main(["--repeats", "0"])
    assert stop.value.code == 2 and "--repeats must be >= 1" in capsys.readouterr().err


def test_resnet34_latency_refuses_a_bad_rounding(capsys):
    with pytest.raises(SystemExit) as stop:
        _script("resnet34_latency").main(["--round-to", "0"])
    assert stop.value.code == 2 and "--round-to must be >= 1" in capsys.readouterr().err


def test_calibration_times_both_ways_on_a_trained_run_and_checks_they_agree(tmp_path_factory, data_cache,
                                                                            dense_run, capsys, restore_threads):
    run = trained_manidp_run(tmp_path_factory, data_cache, dense_run)
    capsys.readouterr()  # the training's log, when this test trained the run
    script = _script("calibration")
    assert script.main(["--run", str(run), "--repeats", "1"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["identical_calibration"] is True and row["validation_images"] == 256 and row["gates"] == 18
    assert row["held_from_gate"] == 0  # digits-c's blocks all fit the default cap
    # the run's own calibration, redone: the same validation images, MACs reference and search
    assert row["keep_rate"] == json.loads((run / "metrics.json").read_text())["calibrated_keep_rate"]
    assert row["keep_rates_tried"] >= 1 and row["by_block_s"] > 0 and row["per_gate_s"] > 0
    assert script.main(["--run", str(dense_run)]) == 2
    assert "is a dense run; this benchmark times ManiDP's calibration" in capsys.readouterr().err


@pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler on this machine (the script needs the ops)")
def test_digits_c_gates_compares_the_gate_forms(tmp_path_factory, data_cache, dense_run, restore_threads):
    run = trained_manidp_run(tmp_path_factory, data_cache, dense_run)
    result = _script("digits_c_gates").compare(run, instances=2, repeats=1, dense_dir=dense_run, inductor=False)
    assert result["method"] == "manidp"
    assert set(result["speed_vs_dense"]) == {"training_gate", "aten_gate", "compiled_gate"}
    assert result["aten_forms_identical"] is True  # ManiDP's two ATen gate forms, bit for bit
    assert result["compiled_rel_error"] <= 1e-5
    assert result["gate_kernel"].startswith("compiled")


@pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler on this machine (the script needs the ops)")
def test_digits_c_gates_identity_check_ignores_the_forms_timed_plans(tmp_path_factory, data_cache, dense_run,
                                                                     restore_threads):
    """Each timed form is planned by timing, so on a loaded machine two forms can pick different block paths
    or memory formats; the bit-for-bit check of the two ATen gate forms must not read that as a difference."""
    run = trained_manidp_run(tmp_path_factory, data_cache, dense_run)
    script = _script("digits_c_gates")
    real_prepare = script.prepare_deployed
    calls = []

    def diverging_plans(deployed, inputs, memory_format, mode):  # what load can do: a plan per form
        calls.append(memory_format)
        other = "contiguous" if len(calls) % 2 else "channels_last"
        prepared = real_prepare(deployed, inputs, other, mode, choose_format=False)
        for block in deployed_blocks(prepared[0]).values():
            block.path = "dense" if len(calls) % 2 else "gathered"
        return prepared

    script.prepare_deployed = diverging_plans
    result = script.compare(run, instances=2, repeats=1, dense_dir=dense_run, inductor=False)
    assert len(calls) == 3 and result["aten_forms_identical"] is True


def test_digits_c_gates_adds_the_inductor_form_with_cold_and_warm_compile_times(tmp_path_factory, data_cache,
                                                                                dense_run, restore_threads):
    """The Inductor row's wiring; the compiler itself is stood in for (a real compile costs the suite seconds
    per model; `python benchmarks/digits_c_gates.py RUN` runs it)."""
    run = trained_manidp_run(tmp_path_factory, data_cache, dense_run)
    script = _script("digits_c_gates")
    compiles = []

    def stand_in(model, example):
        compiles.append(model)
        return model, 0.5 * len(compiles)

    real_reference = script.optimized_dense
    script.inductor_compile = stand_in
    script.optimized_dense = lambda dense, inputs, inductor: real_reference(dense, inputs, inductor=False)
    result = script.compare(run, instances=2, repeats=1, dense_dir=dense_run, inductor=True)
    assert set(result["speed_vs_dense"]) == {"training_gate", "aten_gate", "compiled_gate", "inductor_gate"}
    assert result["inductor_compile_s"] == {"cold": 0.5, "warm": 1.0} and len(compiles) == 2
    # The stand-in runs the gated model itself, eager: the ATen-gate deployed form's other summation order only.
    assert result["inductor_rel_error"] <= 1e-5


def test_digits_c_gates_refuses_a_folder_without_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit, match="needs model.pt and a finished dense run"):
        _script("digits_c_gates").main([str(tmp_path)])
