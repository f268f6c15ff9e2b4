"""Tables, plots, the tuning table and the MLflow summary, from hand-made run folders (no training)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from manidp import reporting
from manidp.cli import main

DENSE_MACS = 40_000_000


def make_run(root: Path, dataset: str, backbone: str, method: str, seed: int, top1: float, *,
             budget=None, reduction: float = 0.0, dynamic: bool = False, severity: bool = True,
             latency: dict | None = None, method_info: dict | None = None, epochs: int = 3,
             extra: dict | None = None) -> Path:
    """A run folder as ``manidp train`` leaves it (only the files the reports read)."""
    name = method if budget is None else f"{method}-b{budget:g}"
    run = root / "runs" / dataset / backbone / name / f"seed{seed}"
    run.mkdir(parents=True)
    metrics = {"dataset": dataset, "backbone": backbone, "method": method, "budget": budget, "seed": seed,
               "dynamic": dynamic, "test_top1": top1, "test_top5": min(100.0, top1 + 8),
               "macs": DENSE_MACS * (1 - reduction), "macs_dense": DENSE_MACS, "macs_reduction": reduction,
               "params": 270_000, "wall_time_s": 12.0, "spearman_macs_severity": -0.4 if dynamic else None,
               "method_info": method_info or {"name": method}, "epochs_trained": epochs,
               "optimizer_steps": epochs * 20,
               "config": {"dataset": dataset, "backbone": backbone, "method": method, "budget": budget, "seed": seed,
                          "method_options": {}, "train": {"epochs": epochs, "batch_size": 64, "lr": 0.02}},
               **(extra or {})}
    (run / "metrics.json").write_text(json.dumps(metrics))
    rng = np.random.default_rng(seed)
    n = 50
    level = np.arange(n) % 5
    macs = DENSE_MACS * (1 - reduction) * ((1.3 - 0.15 * (4 - level)) if dynamic else np.ones(n))
    instances = pd.DataFrame({"index": range(n), "label": level, "prediction": level,
                              "loss": rng.random(n) + level, "macs": macs})
    if severity:
        instances["severity"] = level
    instances.to_csv(run / "instances_test.csv", index=False)
    if latency is not None:
        (run / "latency_cpu-2t.json").write_text(json.dumps(latency))
    return run


def ok_latency(speedup: float, spread: float = 0.0) -> dict:
    """A latency file as ``manidp latency`` writes it: medians, their ratio and every repeat's time."""
    deployed = 2.0 / speedup
    return {"status": "ok", "dense_ms": 2.0, "deployed_ms": deployed, "latency_ratio": 1 / speedup,
            "speedup": speedup, "macs_ratio": 0.5, "profile": {"device": "cpu", "threads": 2, "processor": ""},
            "dense_ms_repeats": [2.0, 2.0, 2.0],
            "deployed_ms_repeats": [deployed - spread, deployed, deployed + spread]}


def md_rows(markdown: str) -> list[dict]:
    """The Markdown table's body rows as {header: stripped cell}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.fixture
def digits_runs(tmp_path) -> list[Path]:
    runs = []
    for seed, (dense, manidp, l1) in enumerate([(85.0, 84.0, 80.0), (87.0, 84.0, 83.0)]):
        runs.append(make_run(tmp_path, "digits-c", "cifar_resnet20", "dense", seed, dense, epochs=10))
        runs.append(make_run(tmp_path, "digits-c", "cifar_resnet20", "manidp", seed, manidp, budget=0.4,
                             reduction=0.41, dynamic=True, latency=ok_latency(1.5 + seed, spread=0.1)))
        runs.append(make_run(tmp_path, "digits-c", "cifar_resnet20", "l1", seed, l1, budget=0.4,
                             reduction=0.40, latency=ok_latency(1.2),
                             method_info={"name": "l1", "variant": "the authors' schedule"}))
    runs.append(make_run(tmp_path, "digits-c", "cifar_resnet20", "channel_gating", 0, 82.0, budget=0.4,
                         reduction=0.42, dynamic=True,
                         latency={"status": "unavailable", "reason": "no CUDA device is available"},
                         method_info={"name": "channel_gating", "macs_theoretical": True}))
    return runs


def test_table_means_stds_and_per_seed_gaps(digits_runs):
    table = reporting.build_table(reporting.load_runs(digits_runs, ["cpu-2t"]), ["cpu-2t"])
    assert table["method"].tolist() == ["dense", "channel_gating", "l1", "manidp"]
    row = table.set_index("method").loc["manidp"]
    assert row["n_seeds"] == 2 and row["dynamic"] == "dynamic" and row["source"] == "ours"
    assert row["top1_err"] == pytest.approx(16.0) and row["top1_err_std"] == pytest.approx(0.0)
    # Gaps per seed: 85 - 84 = 1 and 87 - 84 = 3.
    assert row["top1_gap"] == pytest.approx(2.0) and row["top1_gap_std"] == pytest.approx(math.sqrt(2))
    assert row["macs_reduction_pct"] == pytest.approx(41.0) and row["budget_pct"] == 40
    assert row["speedup_cpu-2t"] == pytest.approx(2.0) and row["speedup_cpu-2t_std"] == pytest.approx(math.sqrt(0.5))
    # Latency: the mean over seeds of the per-run medians (2/1.5 and 2/2.5 ms); IQR over repeats is 0.1.
    assert row["deployed_ms_cpu-2t"] == pytest.approx((2 / 1.5 + 2 / 2.5) / 2)
    assert row["deployed_ms_iqr_cpu-2t"] == pytest.approx(0.1) and row["dense_ms_cpu-2t"] == pytest.approx(2.0)
    assert row["epochs"] == 3 and row["optimizer_steps"] == 60
    dense = table.set_index("method").loc["dense"]
    assert dense["dynamic"] == "dense" and dense["top1_gap"] == 0 and dense["speedup_cpu-2t"] == 1
    assert dense["epochs"] == 10 and dense["optimizer_steps"] == 200
    gating = table.set_index("method").loc["channel_gating"]
    assert math.isnan(gating["speedup_cpu-2t"]) and math.isnan(gating["top1_err_std"])
    assert gating["latency_status_cpu-2t"] == "unavailable"
    assert "theoretical" in gating["notes"] and "unavailable: no CUDA device" in gating["notes"]
    assert "variant: the authors' schedule" in table.set_index("method").loc["l1", "notes"]
    assert not (table["source"] == "reported").any()


def test_a_deployed_form_without_the_compiled_gate_ops_is_noted(tmp_path):
    """Rows timed with ATen gates (no compiler where they ran) say so; compiled ones add nothing."""
    runs = [make_run(tmp_path, "digits-c", "cifar_resnet20", "dense", 0, 85.0)]
    for seed, kernel in enumerate(["compiled (built: /x.so)", "unavailable: no C++ compiler found"]):
        runs.append(make_run(tmp_path, "digits-c", "cifar_resnet20", "fbs", seed, 84.0, budget=0.4,
                             reduction=0.41, dynamic=True, latency={**ok_latency(0.9), "gate_kernel": kernel}))
        runs.append(make_run(tmp_path, "digits-c", "cifar_resnet20", "manidp", seed, 84.0, budget=0.4,
                             reduction=0.41, dynamic=True, latency={**ok_latency(0.9), "gate_kernel": "compiled"}))
    table = reporting.build_table(reporting.load_runs(runs, ["cpu-2t"]), ["cpu-2t"]).set_index("method")
    assert table.loc["fbs", "notes"] == ("cpu-2t: deployed gates ran as ATen ops, not the compiled ops "
                                         "(unavailable: no C++ compiler found)")
    assert "ATen" not in str(table.loc["manidp", "notes"])


def test_the_regime_of_a_speed_up_is_recorded_beside_it(tmp_path):
    """The first-pass slice-cache hit rate goes into the per-seed CSV; the notes say whether the deployed
    blocks ran gathered (and at what hit rate) or dense-then-mask."""
    runs = [make_run(tmp_path, "digits-c", "cifar_resnet20", "dense", 0, 85.0)]
    for seed, (rate, gathered) in enumerate([(0.5, 3), (0.75, 2)]):
        runs.append(make_run(tmp_path, "digits-c", "cifar_resnet20", "manidp", seed, 84.0, budget=0.4,
                             reduction=0.41, dynamic=True, latency={
                                 **ok_latency(0.9), "first_pass_hit_rate": rate,
                                 "dispatch_summary": {"gathered": gathered, "dense": 9 - gathered}}))
        runs.append(make_run(tmp_path, "digits-c", "cifar_resnet20", "fbs", seed, 84.0, budget=0.4,
                             reduction=0.41, dynamic=True, latency={
                                 **ok_latency(0.9), "first_pass_hit_rate": None,
                                 "dispatch_summary": {"gathered": 0, "dense": 9}}))
    loaded = reporting.load_runs(runs, ["cpu-2t"])
    table = reporting.build_table(loaded, ["cpu-2t"]).set_index("method")
    assert "gathered blocks, first-pass slice-cache hit rate 0.50-0.75" in table.loc["manidp", "notes"]
    assert "every block ran dense-then-mask" in table.loc["fbs", "notes"]
    per_seed = pd.read_csv(reporting.write_per_seed(loaded, tmp_path / "per_seed.csv", ["cpu-2t"]))
    manidp = per_seed[per_seed["method"] == "manidp"].set_index("seed")
    assert manidp.loc[0, "hit_rate_cpu-2t"] == pytest.approx(0.5) and manidp.loc[1, "hit_rate_cpu-2t"] == 0.75
    assert per_seed[per_seed["method"] == "fbs"]["hit_rate_cpu-2t"].isna().all()


def test_markdown_and_latex(digits_runs, tmp_path):
    runs = reporting.load_runs(digits_runs, ["cpu-2t"])
    paths = reporting.write_table(reporting.build_table(runs, ["cpu-2t"]), tmp_path / "out" / "digits-c_table.csv",
                                  ["cpu-2t"], "digits-c")
    assert [p.name for p in paths] == ["digits-c_table.csv", "digits-c_table.md", "digits-c_table.tex",
                                       "digits-c_table_full.md", "digits-c_table.html"]
    page = paths[4].read_text()
    assert "<table" in page and "16.00 ± 0.00" in page and "<caption" in page
    markdown = paths[3].read_text()
    rows = {r["Method"]: r for r in md_rows(markdown)}
    manidp = rows["manidp"]
    assert manidp["Top-1 err. (%)"] == "16.00 ± 0.00" and manidp["Top-1 drop"] == "2.00 ± 1.41"
    assert manidp["Epochs"] == "3" and manidp["Steps"] == "60" and manidp["Budget (%)"] == "40"
    assert manidp["Speed-up cpu-2t"] == "2.00 ± 0.71" and manidp["Latency cpu-2t (ms)"] == "1.067 (IQR 0.100)"
    assert manidp["Dense cpu-2t (ms)"] == "2.000 (IQR 0.000)" and manidp["n"] == "2" and manidp["Source"] == "ours"
    assert rows["channel_gating"]["Speed-up cpu-2t"] == "unavailable"
    assert "The paper reports no results on this dataset." in markdown and "Paper method" not in markdown
    assert "Training budget: dense training 10 epochs (200 optimizer steps); fine-tuning 3 epochs (60 optimizer " \
           "steps)." in markdown
    assert "channel_gating: MACs theoretical" in markdown
    assert "Profile cpu-2t measured on: device cpu, threads 2." in markdown  # empty fields left out
    latex = paths[2].read_text()
    for text in (r"\toprule", r"\midrule", r"\bottomrule", r"16.00 $\pm$ 0.00", r"channel\_gating",
                 r"Top-1 err. (\%)", r"\multicolumn{3}{c}", r"2.00 $\pm$ 0.71", r"\caption{", r"\end{table*}"):
        assert text in latex
    assert "±" not in latex and "–" not in latex
    csv = pd.read_csv(paths[0])
    assert {"top1_err", "top1_err_std", "top5_gap", "macs_m", "macs_reduction_pct", "speedup_cpu-2t",
            "speedup_cpu-2t_std", "deployed_ms_cpu-2t", "deployed_ms_iqr_cpu-2t", "dense_ms_cpu-2t", "epochs",
            "optimizer_steps", "n_seeds", "source"} <= set(csv.columns)


def test_training_budget_recorded_computed_or_missing(tmp_path):
    recorded = make_run(tmp_path, "digits-c", "cifar_resnet20", "dense", 0, 85.0, epochs=10)
    # No optimizer_steps: computed from the training-set size (the engine drops the last partial batch).
    computed = make_run(tmp_path, "digits-c", "cifar_resnet20", "l1", 0, 80.0, budget=0.4, reduction=0.4,
                        epochs=3, extra={"train_instances": 1000})
    unknown = [make_run(tmp_path, "digits-c", "cifar_resnet20", "fpgm", seed, 80.0, budget=0.4, reduction=0.4,
                        epochs=4) for seed in (0, 1)]
    for run in (computed, *unknown):
        metrics = json.loads((run / "metrics.json").read_text())
        (run / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if k != "optimizer_steps"}))
    runs = reporting.load_runs([recorded, computed, *unknown])
    by_method = runs.drop_duplicates("method").set_index("method")
    assert by_method.loc["dense", "optimizer_steps"] == 200
    assert by_method.loc["l1", "optimizer_steps"] == 3 * (1000 // 64)
    assert by_method.loc["fpgm", "epochs"] == 4 and math.isnan(by_method.loc["fpgm", "optimizer_steps"])
    markdown = reporting.to_markdown(reporting.build_table(runs), [])
    assert "fine-tuning 3 epochs (45 optimizer steps), 4 epochs (optimizer steps not recorded)." in markdown
    assert "Fine-tuning budgets differ between rows" in markdown


def test_validation_columns_appear_only_when_recorded(tmp_path):
    plain = [make_run(tmp_path / "a", "digits-c", "cifar_resnet20", "dense", 0, 85.0),
             make_run(tmp_path / "a", "digits-c", "cifar_resnet20", "l1", 0, 80.0, budget=0.4, reduction=0.4)]
    assert "Val top-1" not in reporting.to_markdown(reporting.build_table(reporting.load_runs(plain)), [])
    soft = make_run(tmp_path / "b", "digits-c", "cifar_resnet20", "fpgm", 0, 80.0, budget=0.4, reduction=0.4,
                    extra={"val_top1_masked": 85.76, "val_top1_pruned": 85.07})
    maniDP = make_run(tmp_path / "b", "digits-c", "cifar_resnet20", "manidp", 0, 82.0, budget=0.4, reduction=0.4,
                      dynamic=True, method_info={"name": "manidp", "calibration": {
                          "val_top1_before_calibration": 80.5, "val_top1_after_calibration": 81.25}})
    dense = make_run(tmp_path / "b", "digits-c", "cifar_resnet20", "dense", 0, 85.0)
    table = reporting.build_table(reporting.load_runs([dense, soft, maniDP])).set_index("method")
    assert table.loc["fpgm", "val_top1_masked"] == pytest.approx(85.76)
    assert table.loc["manidp", "val_top1_after_calibration"] == pytest.approx(81.25)
    assert math.isnan(table.loc["manidp", "val_top1_pruned"]) and math.isnan(table.loc["fpgm",
                                                                                      "val_top1_before_calibration"])
    rows = {r["Method"]: r for r in md_rows(reporting.to_markdown(table.reset_index(), []))}
    assert rows["fpgm"]["Val top-1 masked (%)"] == "85.76" and rows["fpgm"]["Val top-1 pruned (%)"] == "85.07"
    assert rows["manidp"]["Val top-1 before calib. (%)"] == "80.50"
    assert rows["manidp"]["Val top-1 after calib. (%)"] == "81.25" and rows["manidp"]["Val top-1 masked (%)"] == "–"


def test_reported_rows_matched_at_the_operating_point(tmp_path):
    runs = [make_run(tmp_path, "imagenet", "resnet18", "dense", 0, 69.76, severity=False),
            make_run(tmp_path, "imagenet", "resnet18", "manidp", 0, 68.00, budget=0.51, reduction=0.50,
                     dynamic=True, severity=False),
            make_run(tmp_path, "imagenet", "resnet18", "manidp", 0, 67.50, budget=0.55, reduction=0.56,
                     dynamic=True, severity=False),
            make_run(tmp_path, "imagenet", "resnet18", "fpgm", 0, 67.00, budget=0.55, reduction=0.55, severity=False),
            make_run(tmp_path, "imagenet", "resnet18", "l1", 0, 66.00, budget=0.55, reduction=0.55, severity=False)]
    table = reporting.build_table(reporting.load_runs(runs))
    ours = table[table["source"] == "ours"].set_index(["method", "budget_pct"])
    a, b = ours.loc[("manidp", 51.0)], ours.loc[("manidp", 55.0)]
    assert a["paper_method"] == "ManiDP-A" and b["paper_method"] == "ManiDP-B"
    assert a["paper_top1_err"] == pytest.approx(31.12) and a["paper_reference"] == "paper Table 1"
    # Our drop 69.76 - 68.00 = 1.76 against the paper's 31.12 - 30.24 = 0.88; 50 % fewer MACs against 51.0 %.
    assert a["top1_drop_vs_paper"] == pytest.approx(1.76 - 0.88) and a["macs_reduction_vs_paper"] == pytest.approx(-1.0)
    assert b["macs_reduction_vs_paper"] == pytest.approx(56.0 - 55.1)
    assert table.set_index("method").loc["dense", "paper_method"] == "Baseline"
    # FPGM's paper row (41.8 %) is 13 points from our 55 % budget, and L1 is not in the paper: no match.
    assert pd.isna(ours.loc[("fpgm", 55.0), "paper_method"]) and pd.isna(ours.loc[("l1", 55.0), "paper_method"])
    reported = table[table["source"] == "reported"]
    assert "FPGM" in set(reported["method"]) and not {"ManiDP-A", "ManiDP-B", "Baseline"} & set(reported["method"])
    assert reported[["top1_err", "n_seeds"]].isna().all().all()  # reported numbers never fill our columns
    assert table["source"].tolist()[:5] == ["ours"] * 5 and len(reported) == 11 - 3
    rows = md_rows(reporting.to_markdown(table, []))
    fpgm = next(r for r in rows if r["Method"] == "*FPGM*")
    assert fpgm["Top-1 err. reported (%)"] == "*31.59*" and fpgm["Source"] == "*reported (paper Table 1)*"
    assert fpgm["Top-1 err. (%)"] == "–" and fpgm["n"] == "–"
    manidp_a = next(r for r in rows if r["Paper method"] == "ManiDP-A")
    assert manidp_a["Method"] == "manidp" and manidp_a["Top-1 drop"] == "1.76"
    assert manidp_a["Top-1 drop reported"] == "0.88"
    assert manidp_a["Top-1 drop, ours - reported"] == "+0.88" and manidp_a["MACs red., ours - reported"] == "-1.0"
    assert manidp_a["Source"] == "ours + reported (paper Table 1)"
    assert r"\textit{FPGM}" in reporting.to_latex(table, [], "imagenet")
    # A tighter tolerance leaves ManiDP-B (55.1 %, 0.1 points from our 55 % budget) on a row of its own.
    strict = reporting.build_table(reporting.load_runs(runs), tolerance_pct=0.05)
    assert "ManiDP-B" in set(strict.loc[strict["source"] == "reported", "method"])
    assert "ManiDP-A" not in set(strict.loc[strict["source"] == "reported", "method"])


def test_cifar_rows_and_unmatched_backbone_block(tmp_path):
    runs = [make_run(tmp_path, "cifar10", "cifar_resnet56", "dense", 0, 93.5, severity=False),
            make_run(tmp_path, "cifar10", "cifar_resnet56", "manidp", 0, 93.4, budget=0.62, reduction=0.62,
                     dynamic=True, severity=False),
            make_run(tmp_path, "cifar10", "cifar_resnet20", "dense", 0, 92.0, severity=False)]
    table = reporting.build_table(reporting.load_runs(runs))
    r56 = table[table["backbone"] == "cifar_resnet56"]
    assert r56["source"].tolist()[:2] == ["ours", "ours"] and set(r56["source"][2:]) == {"reported"}
    manidp = r56.set_index("method").loc["manidp"]
    assert manidp["paper_top1_err"] == pytest.approx(6.36) and manidp["paper_macs_reduction_pct"] == pytest.approx(62.4)
    assert manidp["paper_top1_drop"] == pytest.approx(6.36 - 6.30)
    assert r56.set_index("method").loc["FBS", "dynamic"] == "dynamic"
    r20 = table[table["backbone"] == "cifar_resnet20"]
    assert r20["source"].tolist()[0] == "ours" and set(r20["source"][1:]) == {"reported"}


def test_paper_rows_are_packaged():
    table = reporting.reported_rows("imagenet", ["resnet18", "resnet34", "resnet50"])
    assert len(table) == 21 and set(table["backbone"]) == {"resnet18", "resnet34"}
    assert "the abstract's headline result" in set(table["paper_note"])
    fpgm = table[(table["backbone"] == "resnet34") & (table["paper_method"] == "FPGM")].iloc[0]
    # The drop follows from the printed errors (27.46 - 26.69), not the misprinted gap 0.07.
    assert fpgm["paper_top1_drop"] == pytest.approx(0.77)


def test_latency_files_read_defensively(tmp_path):
    dense = make_run(tmp_path, "digits-c", "cifar_resnet20", "dense", 0, 85.0)
    newer = {**ok_latency(1.25), "dense_optimized_ms": 1.8, "dense_optimized_ms_repeats": [1.0, 2.0, 3.0, 4.0, 5.0],
             "deployed_ms_iqr": 9.9, "cache_hit_rate": 0.9}
    del newer["deployed_ms_repeats"]  # only an explicit IQR for the deployed time
    fbs = make_run(tmp_path, "digits-c", "cifar_resnet20", "fbs", 0, 83.0, budget=0.4, reduction=0.4, dynamic=True,
                   latency=newer)
    unmeasured = make_run(tmp_path, "digits-c", "cifar_resnet20", "l1", 0, 82.0, budget=0.4, reduction=0.4)
    runs = reporting.load_runs([dense, fbs, unmeasured], ["cpu-2t"]).set_index("method")
    assert runs.loc["fbs", "dense_optimized_ms_cpu-2t"] == pytest.approx(1.8)
    assert runs.loc["fbs", "dense_optimized_ms_iqr_cpu-2t"] == pytest.approx(2.0)  # 4 - 2 over the five repeats
    assert runs.loc["fbs", "deployed_ms_iqr_cpu-2t"] == pytest.approx(9.9)
    assert runs.loc["l1", "note_cpu-2t"] == "not measured"
    table = reporting.build_table(runs.reset_index(), ["cpu-2t"])
    rows = {r["Method"]: r for r in md_rows(reporting.to_markdown(table, ["cpu-2t"]))}
    assert rows["fbs"]["dense optimized cpu-2t (ms)"] == "1.800 (IQR 2.000)"
    assert rows["fbs"]["Latency cpu-2t (ms)"] == "1.600 (IQR 9.900)"
    assert rows["l1"]["Speed-up cpu-2t"] == "not measured" and rows["l1"]["Latency cpu-2t (ms)"] == "–"
    (fbs / "latency_cpu-2t.json").write_text(json.dumps({"status": "ok", "dense_ms": 1.0}))
    with pytest.raises(reporting.UserError, match="has no numeric 'speedup'"):
        reporting.load_runs([fbs], ["cpu-2t"])


def test_per_seed_csv(digits_runs, tmp_path):
    out = tmp_path / "results" / "digits-c_table.csv"
    per_seed = tmp_path / "results" / "digits-c_per_seed.csv"
    assert main(["table", "--dataset", "digits-c", "--runs", *map(str, digits_runs), "--profiles", "cpu-2t",
                 "--out", str(out), "--per-seed", str(per_seed)]) == 0
    rows = pd.read_csv(per_seed)
    assert len(rows) == len(digits_runs)
    assert list(rows.columns[:6]) == ["dataset", "backbone", "method", "registered_method", "budget", "seed"]
    for column in ("test_top1", "test_top5", "macs_m", "macs_reduction_pct", "epochs", "optimizer_steps",
                   "speedup_cpu-2t", "deployed_ms_cpu-2t", "deployed_ms_iqr_cpu-2t", "dense_ms_cpu-2t",
                   "hit_rate_cpu-2t", "note_cpu-2t", "gate_kernel_cpu-2t", "hardware_cpu-2t", "run_dir"):
        assert column in rows.columns
    manidp = rows[rows["method"] == "manidp"].set_index("seed")
    assert manidp.loc[1, "speedup_cpu-2t"] == pytest.approx(2.5) and manidp.loc[1, "test_top1"] == pytest.approx(84.0)
    assert manidp.loc[0, "deployed_ms_cpu-2t"] == pytest.approx(2 / 1.5, abs=1e-4)
    gating = rows[rows["method"] == "channel_gating"].iloc[0]
    assert gating["note_cpu-2t"].startswith("unavailable") and math.isnan(gating["speedup_cpu-2t"])
    assert rows["method"].iloc[0] == "dense" and math.isnan(rows["budget"].iloc[0])


def test_plots(digits_runs, tmp_path):
    runs = reporting.load_runs(digits_runs, ["cpu-2t"])
    reporting.plot_pareto(runs, tmp_path / "pareto.png", "digits-c")
    reporting.plot_macs_vs_difficulty(runs, tmp_path / "difficulty.png", "digits-c")
    reporting.plot_speedup(runs, tmp_path / "speedup.png", "digits-c", ["cpu-2t"])
    for name in ("pareto.png", "difficulty.png", "speedup.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(reporting.UserError, match="--speedup needs latency"):
        reporting.plot_speedup(runs, tmp_path / "none.png", "digits-c", [])


def test_difficulty_without_severity_uses_dense_loss_and_static_only_runs_plot(tmp_path):
    runs = [make_run(tmp_path, "cifar10", "cifar_resnet20", "dense", 0, 92.0, severity=False),
            make_run(tmp_path, "cifar10", "cifar_resnet20", "fbs", 0, 91.0, budget=0.5, reduction=0.5,
                     dynamic=True, severity=False)]
    reporting.plot_macs_vs_difficulty(reporting.load_runs(runs), tmp_path / "d.png", "cifar10")
    static = [runs[0], make_run(tmp_path, "cifar10", "cifar_resnet20", "l1", 0, 90.0, budget=0.5, reduction=0.5)]
    reporting.plot_macs_vs_difficulty(reporting.load_runs(static), tmp_path / "s.png", "cifar10")
    assert (tmp_path / "d.png").is_file() and (tmp_path / "s.png").is_file()


def test_table_and_plot_commands(digits_runs, tmp_path, capsys):
    dirs = [str(d) for d in digits_runs]
    out = tmp_path / "results" / "digits-c_table.csv"
    assert main(["table", "--dataset", "digits-c", "--runs", *dirs, "--profiles", "cpu-2t", "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".md").is_file() and out.with_suffix(".tex").is_file()
    assert main(["plot", "--dataset", "digits-c", "--runs", *dirs, "--pareto", str(tmp_path / "p.png"),
                 "--difficulty", str(tmp_path / "d.png"), "--speedup", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    no_latency = [str(d) for d in digits_runs if not list(d.glob("latency_*.json"))]
    assert main(["plot", "--dataset", "digits-c", "--runs", *no_latency, "--pareto", str(tmp_path / "p.png"),
                 "--difficulty", str(tmp_path / "d.png"), "--speedup", str(tmp_path / "s2.png")]) == 2
    assert "--speedup needs latency_{profile}.json files" in capsys.readouterr().err
    assert main(["table", "--dataset", "cifar10", "--runs", *dirs, "--out", str(out)]) == 2
    assert "--dataset is cifar10 but some run folders hold digits-c" in capsys.readouterr().err
    assert main(["table", "--dataset", "digits-c", "--runs", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "metrics.json is missing" in capsys.readouterr().err
    assert main(["table", "--dataset", "digits-c", "--runs", *dirs, "--out", str(out), "--paper-tolerance", "-1"]) == 2
    assert "--paper-tolerance must be" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["table", "--dataset", "digits-c", "--runs", *dirs, "--out", str(blocker / "t.csv")]) == 2
    err = capsys.readouterr().err
    assert "a-file" in err and "Traceback" not in err
    assert main(["plot", "--dataset", "digits-c", "--runs", *dirs, "--pareto", str(tmp_path / "p.png"),
                 "--difficulty", str(tmp_path / "d.png"), "--speedup", str(blocker / "s.png")]) == 2
    assert "a-file" in capsys.readouterr().err


# ----------------------------------------------------------------- the tuning table
def make_sweep_run(root: Path, method: str, lr: float, seed: int, top1: float, reduction: float, *,
                   budget=0.4, options: dict | None = None, extra: dict | None = None) -> Path:
    """A validation-only run folder (``eval_splits: [val]``): no test keys, no instances_test.csv."""
    run = root / f"{method}-lr{lr:g}-{json.dumps(options or {}, sort_keys=True)}" / f"seed{seed}"
    run.mkdir(parents=True)
    metrics = {"val_top1": top1, "val_top5": 99.0, "val_macs_reduction": reduction, "macs_reduction": reduction,
               "dataset": "digits-c", "backbone": "cifar_resnet20", "method": method, "budget": budget, "seed": seed,
               "config": {"method": method, "budget": budget, "seed": seed, "method_options": options or {},
                          "train": {"epochs": 3, "lr": lr}}, **(extra or {})}
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "instances_val.csv").write_text("index,label\n")
    return run


@pytest.fixture
def sweep(tmp_path) -> list[Path]:
    runs = []
    for seed in range(3):
        # fpgm: lr 0.05 is most accurate but misses the budget; lr 0.02 is the best that meets it.
        runs.append(make_sweep_run(tmp_path, "fpgm", 0.01, seed, 80.0 + seed, 0.40))
        runs.append(make_sweep_run(tmp_path, "fpgm", 0.02, seed, 82.0 + seed, 0.41))
        runs.append(make_sweep_run(tmp_path, "fpgm", 0.05, seed, 90.0 + seed, 0.30))
        # manidp: two knob settings at one lr; neither meets the budget, the closer one is taken (flagged).
        runs.append(make_sweep_run(tmp_path, "manidp", 0.01, seed, 85.0, 0.30, options={"lambda": 1.0}))
        runs.append(make_sweep_run(tmp_path, "manidp", 0.01, seed, 84.0, 0.35, options={"lambda": 2.0}))
    return runs


def test_tuning_table_chooses_within_tolerance_and_flags_fallbacks(sweep):
    table = reporting.tuning_table(sweep, tolerance=0.02)
    assert len(table) == 5 and set(table["n_seeds"]) == {3} and set(table["seeds"]) == {"0 1 2"}
    fpgm = table[table["method"] == "fpgm"].set_index("lr")
    assert fpgm.loc[0.02, "val_top1_mean"] == pytest.approx(83.0)
    assert fpgm.loc[0.02, "val_top1_std"] == pytest.approx(1.0)
    assert fpgm.loc[0.02, "val_macs_reduction_mean"] == pytest.approx(0.41)
    assert fpgm["chosen"].tolist() == [False, True, False] and not fpgm.loc[0.05, "within_tolerance"]
    assert fpgm.loc[0.02, "choice"].startswith("highest validation top-1 within 0.02")
    manidp = table[table["method"] == "manidp"].set_index("method_options")
    chosen = manidp[manidp["chosen"]]
    assert chosen.index.tolist() == ['{"lambda": 2.0}'] and chosen["choice"].iloc[0].startswith("FALLBACK")
    assert chosen["fallback"].all() and not table.loc[table["method"] == "fpgm", "fallback"].any()
    # A looser tolerance lets the more accurate setting in, chosen without a flag.
    loose = reporting.tuning_table(sweep, tolerance=0.1)
    pick = loose[(loose["method"] == "manidp") & loose["chosen"]].iloc[0]
    assert pick["method_options"] == '{"lambda": 1.0}' and not pick["choice"].startswith("FALLBACK")


def test_tuning_table_never_chooses_a_configuration_with_a_diverged_seed(sweep, tmp_path):
    # fpgm lr 0.03 would win (most accurate, within the budget) but one seed diverged.
    diverged = []
    for seed in range(3):
        run = make_sweep_run(tmp_path / "div", "fpgm", 0.03, seed, 95.0, 0.40)
        if seed == 1:
            metrics = json.loads((run / "metrics.json").read_text())
            for key in ("val_top1", "val_top5", "val_macs_reduction", "macs_reduction"):
                del metrics[key]
            (run / "metrics.json").write_text(json.dumps({**metrics, "status": "diverged"}))
        diverged.append(run)
    table = reporting.tuning_table(sweep + diverged, tolerance=0.02)
    row = table[(table["method"] == "fpgm") & (table["lr"] == 0.03)].iloc[0]
    assert row["n_diverged"] == 1 and row["n_seeds"] == 3 and not row["chosen"]
    assert row["choice"] == "diverged in 1 of 3 seeds: never chosen"
    assert row["val_top1_mean"] == pytest.approx(95.0)  # over the seeds that finished
    chosen = table[(table["method"] == "fpgm") & table["chosen"]]
    assert chosen["lr"].tolist() == [0.02] and set(table["n_diverged"]) == {0, 1}
    # A method whose every configuration diverged gets rows and no choice.
    lost = [make_sweep_run(tmp_path / "lost", "sfp", 0.5, 0, 0.0, 0.0, extra={"status": "diverged"})]
    table = reporting.tuning_table(sweep + lost)
    assert not table.loc[table["method"] == "sfp", "chosen"].any()


def test_tuning_table_command_and_refusals(sweep, tmp_path, capsys):
    out = tmp_path / "results" / "digits-c_tuning.csv"
    assert main(["tuning-table", "--runs", *map(str, sweep), "--out", str(out)]) == 0
    written = pd.read_csv(out)
    assert written["chosen"].sum() == 2 and "(fallback)" in capsys.readouterr().out
    tested = make_sweep_run(tmp_path / "bad", "l1", 0.02, 0, 80.0, 0.4, extra={"test_top1": 79.0})
    assert main(["tuning-table", "--runs", *map(str, sweep), str(tested), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds test-split results (test_top1)" in err and "Traceback" not in err
    instances = make_sweep_run(tmp_path / "bad2", "l1", 0.02, 0, 80.0, 0.4)
    (instances / "instances_test.csv").write_text("index\n")
    assert main(["tuning-table", "--runs", str(instances), "--out", str(out)]) == 2
    assert "instances_test.csv" in capsys.readouterr().err
    no_val = make_sweep_run(tmp_path / "bad3", "l1", 0.02, 0, 80.0, 0.4)
    metrics = json.loads((no_val / "metrics.json").read_text())
    del metrics["val_macs_reduction"]
    (no_val / "metrics.json").write_text(json.dumps(metrics))
    assert main(["tuning-table", "--runs", str(no_val), "--out", str(out)]) == 2
    assert "lacks val_top1 or val_macs_reduction" in capsys.readouterr().err
    assert main(["tuning-table", "--runs", str(sweep[0]), str(sweep[0]), "--out", str(out)]) == 2
    assert "same configuration and seed" in capsys.readouterr().err
    assert main(["tuning-table", "--runs", str(sweep[0]), "--out", str(out), "--tolerance", "-0.1"]) == 2
    assert "--tolerance must be" in capsys.readouterr().err


def test_table_refuses_validation_only_runs(sweep, tmp_path, capsys):
    assert main(["table", "--dataset", "digits-c", "--runs", str(sweep[0]), "--out", str(tmp_path / "t.csv")]) == 2
    assert "not a finished test-evaluated run" in capsys.readouterr().err


def test_mlflow_parent_and_summary_runs(digits_runs, tmp_path):
    from mlflow.tracking import MlflowClient

    from manidp import tracking
    from manidp._files import result_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.init_store(uri, ("digits-c",))
    parent = tracking.parent_run("digits-c", "cifar_resnet20", uri)
    assert tracking.parent_run("digits-c", "cifar_resnet20", uri) == parent
    assert tracking.parent_run("digits-c", "cifar_resnet32", uri) != parent
    client = MlflowClient(tracking_uri=uri)
    # The finished training run of one result, found by its identity (config.yaml beside metrics.json).
    cfg = json.loads((digits_runs[1] / "metrics.json").read_text())["config"]
    (digits_runs[1] / "config.yaml").write_text(yaml.safe_dump(cfg))
    child = client.create_run(client.get_experiment_by_name("digits-c").experiment_id,
                              tags={**tracking.identity_tags(cfg, result_id(digits_runs[1])),
                                    "mlflow.parentRunId": parent}).info.run_id
    client.set_terminated(child)
    artifact = tmp_path / "digits-c_table.md"
    artifact.write_text("| table |\n")
    summary = tracking.log_summary("digits-c", [artifact], {str(digits_runs[1]): {"speedup_cpu-2t": 1.5}}, uri)
    assert tracking.log_summary("digits-c", [artifact], {}, uri) == summary
    assert [a.path for a in client.list_artifacts(summary)] == ["digits-c_table.md"]
    assert client.get_run(child).data.metrics["speedup_cpu-2t"] == 1.5
    assert client.get_run(summary).data.tags["role"] == "summary"


# ----------------------------------------------------------------- the paper's layout
@pytest.fixture
def imagenet_table(tmp_path):
    runs = [make_run(tmp_path, "imagenet", "resnet18", "dense", 0, 69.76, severity=False),
            make_run(tmp_path, "imagenet", "resnet18", "manidp", 0, 68.00, budget=0.51, reduction=0.50,
                     dynamic=True, severity=False),
            make_run(tmp_path, "imagenet", "resnet18", "fpgm", 0, 67.00, budget=0.55, reduction=0.55, severity=False)]
    return reporting.build_table(reporting.load_runs(runs))


def test_paper_layout_follows_the_papers_columns(digits_runs, tmp_path):
    from manidp.reporting.paper_layout import MAX_COLUMNS

    runs = reporting.load_runs(digits_runs, ["cpu-2t"])
    paths = reporting.write_table(reporting.build_table(runs, ["cpu-2t"]), tmp_path / "digits-c_table.csv",
                                  ["cpu-2t"], "digits-c")
    rows = {r["Method"]: r for r in md_rows(paths[1].read_text())}
    assert list(rows) == ["channel_gating", "l1", "manidp"]  # dense is the baseline column, not a row
    manidp = rows["manidp"]
    assert len(manidp) <= MAX_COLUMNS
    # Baseline: the dense error averaged over seeds (15 and 13); gap per seed (1 and 3) averaged.
    assert manidp["Top-1 base (%)"] == "14.00" and manidp["Top-1 pruned (%)"] == "16.00 ± 0.00"
    assert manidp["Top-1 gap"] == "2.00 ± 1.41" and manidp["Dynamic"] == "yes" and rows["l1"]["Dynamic"] == "no"
    assert manidp["Speed-up cpu-2t"] == "2.00 ± 0.71" and manidp["Source"] == "ours"
    assert "digits-c_table_full.md" in paths[1].read_text()
    assert "Epochs" not in manidp and "Latency cpu-2t (ms)" not in manidp  # those live in the full table


def test_paper_layout_lists_the_reported_rows_in_the_papers_order(imagenet_table):
    from manidp.reporting.paper_layout import paper_layout

    shown, reported = paper_layout(imagenet_table, [])
    paper = shown[reported]
    order = pd.read_csv(Path(reporting.__file__).parents[1] / "reference" / "paper_tables.csv")
    expected = order[(order["dataset"] == "imagenet") & (order["backbone"] == "resnet18")
                     & (order["method"] != "Baseline")]["method"].tolist()
    assert paper["Method"].tolist() == expected
    assert (paper["Source"] == "reported (Table 1)").all() and not (shown[~pd.Series(reported)]["Source"] != "ours").any()


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no TeX installation (pdflatex) on this machine")
def test_paper_layout_latex_compiles(imagenet_table, tmp_path):
    from manidp.reporting.paper_layout import to_paper_latex

    (tmp_path / "table.tex").write_text(to_paper_latex(imagenet_table, [], "imagenet", "imagenet_table_full.md"))
    (tmp_path / "doc.tex").write_text("\\documentclass[twocolumn]{article}\n\\usepackage{booktabs}\n"
                                      "\\begin{document}\n\\input{table}\n\\end{document}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "Overfull \\hbox" not in done.stdout  # fits a two-column page's width


@pytest.mark.parametrize("dataset,backbone,method,budget_pct,paper_method", [
    ("cifar10", "cifar_resnet56", "hrank", 52.0, "HRank"),
    ("imagenet", "resnet34", "taylor", 24.0, "Taylor"),
])
def test_taylor_and_hrank_rows_sit_beside_the_papers(dataset, backbone, method, budget_pct, paper_method):
    """At the budgets config/config.yaml gives them, our Taylor and HRank rows take the paper's rows."""
    import pandas as pd

    from manidp.reporting.paper import attach_reported, reported_rows

    budgets = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text())[
        "datasets"][dataset]["backbones"][backbone]["budgets"]
    assert budget_pct / 100 in budgets
    ours = pd.DataFrame([{"dataset": dataset, "backbone": backbone, "method": method, "budget_pct": budget_pct,
                          "top1_gap": 0.5, "macs_reduction_pct": budget_pct, "source": "ours", "dynamic": "static"}])
    table = attach_reported(ours, reported_rows(dataset, [backbone]))
    row = table[table["source"] == "ours"].iloc[0]
    assert row["paper_method"] == paper_method
    assert paper_method not in set(table.loc[table["source"] == "reported", "method"])
