"""``manidp latency``: the timer, the report, and an honest 'unavailable' for a missing device."""
from __future__ import annotations

import json

import pytest
import torch

from manidp import kernels
from manidp.cli import main
from manidp.errors import UserError
from manidp.latency import measure_latency
from test_manidp import trained_manidp_run


def test_measure_latency_interleaves_and_alternates_the_order():
    calls = []
    models = {"a": lambda x: calls.append("a"), "b": lambda x: calls.append("b")}
    times = measure_latency(models, [torch.zeros(1)], warmup=1, repeats=4)
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4}
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert all(t >= 0 for v in times.values() for t in v)


def test_cpu_clock_is_for_one_thread_only():
    models = {"a": lambda x: x + 1}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert len(measure_latency(models, [torch.zeros(1)], warmup=0, repeats=2, clock="cpu")["a"]) == 2
        torch.set_num_threads(2)
        with pytest.raises(UserError, match="one CPU thread"):
            measure_latency(models, [torch.zeros(1)], clock="cpu")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def gated_run(tmp_path_factory, data_cache, dense_run):
    return trained_manidp_run(tmp_path_factory, data_cache, dense_run)


def test_latency_subcommand_writes_its_report(gated_run, dense_run, tmp_path, capsys):
    out = tmp_path / "latency.json"
    code = main(["latency", str(gated_run), "--threads", "1", "--instances", "4", "--repeats", "3",
                 "--warmup", "1", "--dense", str(dense_run), "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["status"] == "ok" and report["method"] == "manidp"
    assert report["dense_ms"] > 0 and report["deployed_ms"] > 0
    assert report["latency_ratio"] == pytest.approx(report["deployed_ms"] / report["dense_ms"])
    assert report["speedup"] == pytest.approx(1 / report["latency_ratio"])
    assert 0.3 < report["macs_ratio"] < 0.8  # the instances it ran, pruned around the 40 % budget
    assert report["deployed_max_rel_error"] <= 1e-4
    assert report["profile"]["device"] == "cpu" and report["profile"]["threads"] == 1
    assert report["profile"]["batch_size"] == 1 and report["instances"] == 4
    for key in ("cpu_model", "cpu_capability", "cpu_count", "torch", "onednn"):
        assert key in report["profile"]
    assert report["profile"]["cpu_model"]
    assert len(report["dense_ms_repeats"]) == 3
    # both dense references, medians with their spread
    assert report["dense_eager_ms"] > 0
    assert report["latency_ratio_vs_eager"] == pytest.approx(report["deployed_ms"] / report["dense_eager_ms"])
    for name in ("dense", "dense_eager", "deployed"):
        spread = report[f"{name}_ms_spread"]
        assert spread["min"] <= spread["p25"] <= spread["median"] <= spread["p75"] <= spread["max"]
        assert spread["median"] == report[f"{name}_ms"]
    paired = report["latency_ratio_paired"]  # 3 repeats: too few for a 95 % interval, and it says so
    assert paired["n"] == 3 and paired["low"] is None and paired["high"] is None
    assert paired["median"] == pytest.approx(sorted(d / r for d, r in zip(report["deployed_ms_repeats"],
                                                                         report["dense_ms_repeats"]))[1])
    reference = report["dense_reference"]
    assert reference["mode"] in ("eager", "torchscript", "onednn", "inductor")
    assert reference["memory_format"] in ("contiguous", "channels_last")
    # every candidate timed (or dropped with its reason), the fastest chosen
    assert {"eager/contiguous", "torchscript/channels_last", "onednn/channels_last"} <= set(reference["candidates_ms"])
    assert "inductor/channels_last" in {**reference["candidates_ms"], **reference["dropped"]}
    assert f"{reference['mode']}/{reference['memory_format']}" == min(reference["candidates_ms"],
                                                                       key=reference["candidates_ms"].get)
    # planned and warmed on validation instances, timed on test ones: the regime is recorded
    assert report["plan_instances"] == 8 and len(report["distinct_kept_sets"]) == len(report["dispatch_plan"]) * 2
    assert all(1 <= n <= 4 for n in report["distinct_kept_sets"])
    if report["dispatch_summary"]["gathered"]:
        assert 0 <= report["first_pass_hit_rate"] <= 1
    else:
        assert report["first_pass_hit_rate"] is None  # every block dense-then-mask: no slice looked up
    # the dispatch plan and the slice cache
    assert report["dispatch_plan"] and all(e["path"] in ("gathered", "dense") for e in report["dispatch_plan"].values())
    assert sum(report["dispatch_summary"].values()) == len(report["dispatch_plan"])
    assert report["gate_kernel"] == kernels.status()  # which gate form ran: compiled op or ATen, and why
    assert report["gate_kernel"].startswith(("compiled", "unavailable: ", "off "))
    cache = report["slice_cache"]
    assert cache["bytes"] <= cache["max_bytes"] and cache["hits"] + cache["misses"] >= 0
    assert json.loads(capsys.readouterr().out)["status"] == "ok"


def test_a_shared_dense_reference_is_kept_per_thread_count(gated_run, dense_run, monkeypatch):
    # A reference packed at one thread count and reused at another would run oneDNN's per-call weight
    # reorder (AVX2) and flatter the speed-up; each count gets its own, and a count seen before reuses it.
    import manidp.latency.report as report_module

    built, timed = [], []

    def reference(dense, batches, inductor=True):
        built.append(torch.get_num_threads())
        return "packed at", torch.get_num_threads()

    def side_by_side(dense, deployed, batches, reference, *args, dense_reference, **kwargs):
        timed.append((torch.get_num_threads(), dense_reference))
        return {}

    monkeypatch.setattr(report_module, "optimized_dense", reference)
    monkeypatch.setattr(report_module, "time_side_by_side", side_by_side)
    cache: dict = {}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            report_module.latency_report(gated_run, threads=threads, instances=2, dense_run=dense_run,
                                         dense_cache=cache, plan_instances=1)
    finally:
        torch.set_num_threads(before)
    assert built == [1, 2]  # the third call, at 1 thread again, reused the first one's
    assert timed == [(threads, ("packed at", threads)) for threads in (1, 2, 1)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_missing_device_is_reported_not_invented(gated_run, tmp_path):
    out = tmp_path / "cuda.json"
    assert main(["latency", str(gated_run), "--device", "cuda", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["status"] == "unavailable" and "CUDA" in report["reason"]
    assert "deployed_ms" not in report


def test_dynamic_deployed_form_runs_batches(gated_run, tmp_path):
    out = tmp_path / "batch.json"
    assert main(["latency", str(gated_run), "--batch-size", "4", "--instances", "8", "--repeats", "1",
                 "--warmup", "0", "--threads", "1", "--no-inductor", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["status"] == "ok" and report["profile"]["batch_size"] == 4
    assert report["deployed_max_rel_error"] <= 1e-4
    assert set(e["path"] for e in report["dispatch_plan"].values()) == {"dense"}  # batches run dense-then-mask


def test_negative_slice_cache_cap_is_a_user_error(gated_run, capsys):
    assert main(["latency", str(gated_run), "--slice-cache-mb", "-1"]) == 2
    assert "--slice-cache-mb" in capsys.readouterr().err


def test_missing_run_is_a_user_error(tmp_path, capsys):
    assert main(["latency", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_static_method_is_timed_with_the_dense_reference_s_optimizations(tmp_path_factory, data_cache, dense_run,
                                                                        gated_run, capsys):
    """Also: several run folders in one process (what the workflow does per seed), one file in each."""
    from conftest import small_run_config
    from manidp.engine import train

    run = train(small_run_config(tmp_path_factory.mktemp("l1") / "run", data_cache, method="l1", budget=0.4,
                                 init_from=str(dense_run), **{"train.epochs": 1}))
    flags = ["--threads", "1", "--instances", "4", "--repeats", "1", "--warmup", "0", "--dense", str(dense_run),
             "--no-inductor"]
    assert main(["latency", str(run), str(gated_run), *flags, "--out-name", "latency_test.json"]) == 0
    report = json.loads((run / "latency_test.json").read_text())
    assert report["status"] == "ok" and report["deployed_max_rel_error"] <= 1e-4
    assert "dispatch_plan" not in report and report["deployed_mode"] == report["dense_reference"]["mode"]
    gated = json.loads((gated_run / "latency_test.json").read_text())
    assert gated["status"] == "ok" and gated["method"] == "manidp" and gated["dispatch_plan"]
    # One dense model and one optimized reference (chosen once) for every run of the call.
    assert gated["dense_reference"] == report["dense_reference"]
    capsys.readouterr()
    # Several folders need --out-name; a path is not a name; a missing folder fails before any timing.
    assert main(["latency", str(run), str(gated_run), *flags, "--out", str(run / "x.json")]) == 2
    assert "--out-name" in capsys.readouterr().err
    assert main(["latency", str(run), *flags, "--out-name", "sub/x.json"]) == 2
    assert "not a path" in capsys.readouterr().err
    assert main(["latency", str(run), str(run.parent / "nothing"), *flags, "--out-name", "late.json"]) == 2
    assert "not found" in capsys.readouterr().err and not (run / "late.json").exists()


def test_an_unavailable_result_is_not_final_and_a_measured_one_is_kept(tmp_path, monkeypatch):
    """The workflow's latency param: 'absent' while the device is missing and nothing was measured;
    it turns 'present' (a re-run) when the device appears, and a measurement is never re-run away."""
    from manidp import latency

    result = tmp_path / "latency_cuda-bf16.json"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert latency.device_state("cpu", result) == "present"
    assert latency.device_state("cuda", result) == "absent"  # nothing yet
    result.write_text(json.dumps({"status": "unavailable", "reason": "no CUDA device", "device": "cuda"}))
    assert latency.device_state("cuda", result) == "absent"  # stable: no re-run on the same machine
    result.write_text("{not json")
    assert latency.device_state("cuda", result) == "absent"
    result.write_text(json.dumps({"status": "ok", "deployed_ms": 1.0}))
    assert latency.device_state("cuda", result) == "present"  # measured on a GPU machine, then moved here
    result.write_text(json.dumps({"status": "unavailable", "reason": "no CUDA device", "device": "cuda"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert latency.device_state("cuda", result) == "present"  # the device appeared: the job re-runs


def test_paired_ratio_interval_is_the_sign_tests_and_holds_its_level():
    import random

    from manidp.latency import paired_ratio

    dense = [2.0] * 15
    deployed = [2.0 * (0.5 + i / 100) for i in range(15)]  # ratios 0.50, 0.51, ..., 0.64
    paired = paired_ratio(deployed, dense)
    # 15 repeats: the 4th and 12th smallest ratios bound the median with 1 - 2 P(B(15, 1/2) <= 3) = 0.965
    assert (paired["low"], paired["median"], paired["high"]) == pytest.approx((0.53, 0.57, 0.61))
    assert paired_ratio([1.0] * 5, [1.0] * 5)["low"] is None  # no interval of 5 repeats reaches 0.95
    assert paired_ratio([1.0] * 6, [2.0] * 6)["low"] == 0.5
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])
    rng, misses, trials = random.Random(0), 0, 2000
    for _ in range(trials):  # times with a common drift per repeat and skewed noise: the true median ratio is 0.6
        drift = [rng.uniform(0.8, 1.5) for _ in range(15)]
        ref = [d * rng.lognormvariate(0, 0.05) for d in drift]
        dep = [0.6 * r * rng.lognormvariate(0, 0.05) / rng.lognormvariate(0, 0.05) for r in ref]
        interval = paired_ratio(dep, ref)
        misses += not interval["low"] <= 0.6 <= interval["high"]
    assert misses / trials <= 0.05


def test_omp_wait_policy_is_set_for_the_process_and_recorded(gated_run, dense_run, tmp_path, capsys, monkeypatch):
    """--omp-wait-policy reaches the OpenMP runtime only if set before torch loads: in its own process it is
    set and the report's profile records it; in a process that loaded torch already it is refused, unless
    the environment already holds it."""
    import os
    import subprocess

    from conftest import manidp_cli

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    flags = ["--threads", "1", "--instances", "2", "--repeats", "1", "--warmup", "0", "--no-inductor",
             "--dense", str(dense_run)]
    assert main(["latency", str(gated_run), *flags, "--omp-wait-policy", "active"]) == 2
    assert "OMP_WAIT_POLICY=ACTIVE" in capsys.readouterr().err
    out = tmp_path / "latency.json"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run(manidp_cli("latency", str(gated_run), *flags, "--omp-wait-policy", "active",
                                       "--out", str(out)), capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(out.read_text())["profile"]["omp_wait_policy"] == "active"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # already the environment's: nothing to set, no refusal
    assert main(["latency", str(gated_run), *flags, "--omp-wait-policy", "passive", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["profile"]["omp_wait_policy"] == "passive"


def test_a_bf16_cpu_profile_says_whether_onednn_runs_bf16_here(monkeypatch):
    from manidp.gating import slices
    from manidp.latency import hardware_profile

    assert "onednn_bf16" not in hardware_profile("cpu", 1, "fp32")
    assert hardware_profile("cpu", 1, "bf16")["onednn_bf16"] is bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())  # this CPU
    for supported in (True, False):  # an AVX-512 (or AVX-NE-CONVERT) CPU, and an AVX2 one
        monkeypatch.setattr(slices, "_BF16", supported)  # what the deployed form and the reference go by
        assert hardware_profile("cpu", 1, "bf16")["onednn_bf16"] is supported
