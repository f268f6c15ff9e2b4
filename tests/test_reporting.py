"""Tables, plots and the MLflow summary, from hand-made run folders (no training)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from manidp import reporting
from manidp.cli import main

DENSE_MACS = 40_000_000


def make_run(root: Path, dataset: str, backbone: str, method: str, seed: int, top1: float, *,
             budget=None, reduction: float = 0.0, dynamic: bool = False, severity: bool = True,
             latency: dict | None = None, method_info: dict | None = None) -> Path:
    """A run folder as ``manidp train`` leaves it (only the files the reports read)."""
    name = method if budget is None else f"{method}-b{budget:g}"
    run = root / "runs" / dataset / backbone / name / f"seed{seed}"
    run.mkdir(parents=True)
    metrics = {"dataset": dataset, "backbone": backbone, "method": method, "budget": budget, "seed": seed,
               "dynamic": dynamic, "test_top1": top1, "test_top5": min(100.0, top1 + 8),
               "macs": DENSE_MACS * (1 - reduction), "macs_dense": DENSE_MACS, "macs_reduction": reduction,
               "params": 270_000, "wall_time_s": 12.0, "spearman_macs_severity": -0.4 if dynamic else None,
               "method_info": method_info or {"name": method}}
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


def ok_latency(speedup: float) -> dict:
    return {"status": "ok", "dense_ms": 2.0, "deployed_ms": 2.0 / speedup, "latency_ratio": 1 / speedup,
            "speedup": speedup, "macs_ratio": 0.5}


@pytest.fixture
def digits_runs(tmp_path) -> list[Path]:
    runs = []
    for seed, (dense, manidp, l1) in enumerate([(85.0, 84.0, 80.0), (87.0, 84.0, 83.0)]):
        runs.append(make_run(tmp_path, "digits-c", "cifar_resnet20", "dense", seed, dense))
        runs.append(make_run(tmp_path, "digits-c", "cifar_resnet20", "manidp", seed, manidp, budget=0.4,
                             reduction=0.41, dynamic=True, latency=ok_latency(1.5 + seed)))
        runs.append(make_run(tmp_path, "digits-c", "cifar_resnet20", "l1", seed, l1, budget=0.4,
                             reduction=0.40, latency=ok_latency(1.2)))
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
    dense = table.set_index("method").loc["dense"]
    assert dense["dynamic"] == "dense" and dense["top1_gap"] == 0 and dense["speedup_cpu-2t"] == 1
    gating = table.set_index("method").loc["channel_gating"]
    assert math.isnan(gating["speedup_cpu-2t"]) and math.isnan(gating["top1_err_std"])
    assert "theoretical" in gating["notes"] and "unavailable: no CUDA device" in gating["notes"]
    assert not (table["source"] == "reported").any()


def test_markdown_and_latex(digits_runs, tmp_path):
    runs = reporting.load_runs(digits_runs, ["cpu-2t"])
    paths = reporting.write_table(reporting.build_table(runs, ["cpu-2t"]), tmp_path / "out" / "digits-c_table.csv",
                                  ["cpu-2t"], "digits-c")
    assert [p.name for p in paths] == ["digits-c_table.csv", "digits-c_table.md", "digits-c_table.tex"]
    markdown = paths[1].read_text()
    assert "| cifar_resnet20 | manidp | dynamic | 40 | 16.00 ± 0.00 |" in markdown
    assert "Speed-up cpu-2t" in markdown and "The paper reports no results on this dataset." in markdown
    assert "channel_gating: MACs theoretical" in markdown
    latex = paths[2].read_text()
    for text in (r"\toprule", r"\midrule", r"\bottomrule", r"16.00 $\pm$ 0.00", r"channel\_gating", r"Top-1 err. (\%)"):
        assert text in latex
    csv = pd.read_csv(paths[0])
    assert {"top1_err", "top1_err_std", "top5_gap", "macs_m", "macs_reduction_pct", "speedup_cpu-2t",
            "speedup_cpu-2t_std", "n_seeds", "source"} <= set(csv.columns)


def test_reported_rows_stand_beside_ours(tmp_path):
    runs = [make_run(tmp_path, "cifar10", "cifar_resnet56", "dense", 0, 93.5, severity=False),
            make_run(tmp_path, "cifar10", "cifar_resnet56", "manidp", 0, 93.4, budget=0.62, reduction=0.62,
                     dynamic=True, severity=False),
            make_run(tmp_path, "cifar10", "cifar_resnet20", "dense", 0, 92.0, severity=False)]
    table = reporting.build_table(reporting.load_runs(runs))
    r56 = table[table["backbone"] == "cifar_resnet56"]
    assert r56["source"].tolist()[:2] == ["ours", "ours"]
    reported = r56[r56["source"] == "reported"].set_index("method")
    assert reported.loc["ManiDP", "top1_err"] == pytest.approx(6.36)
    assert reported.loc["ManiDP", "macs_reduction_pct"] == pytest.approx(62.4)
    assert reported.loc["ManiDP", "reference"] == "paper Table 4" and reported.loc["FBS", "dynamic"] == "dynamic"
    assert reported.loc["Baseline", "dynamic"] == "dense"
    # ResNet-20's block holds its own reported rows, right after our dense row.
    r20 = table[table["backbone"] == "cifar_resnet20"]
    assert r20["source"].tolist()[0] == "ours" and set(r20["source"][1:]) == {"reported"}
    markdown = reporting.to_markdown(table, [])
    assert "| *cifar_resnet56* | *ManiDP* | *dynamic* |" in markdown and "reported (paper Table 4)" in markdown
    assert r"\textit{ManiDP}" in reporting.to_latex(table, [], "cifar10")


def test_paper_rows_are_packaged():
    table = reporting.reported_rows("imagenet", ["resnet18", "resnet34", "resnet50"])
    assert len(table) == 21 and set(table["backbone"]) == {"resnet18", "resnet34"}
    assert "the abstract's headline result" in set(table["notes"])


def test_plots(digits_runs, tmp_path):
    runs = reporting.load_runs(digits_runs)
    reporting.plot_pareto(runs, tmp_path / "pareto.png", "digits-c")
    reporting.plot_macs_vs_difficulty(runs, tmp_path / "difficulty.png", "digits-c")
    for name in ("pareto.png", "difficulty.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


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
                 "--difficulty", str(tmp_path / "d.png")]) == 0
    assert main(["table", "--dataset", "cifar10", "--runs", *dirs, "--out", str(out)]) == 2
    assert "--dataset is cifar10 but some run folders hold digits-c" in capsys.readouterr().err
    assert main(["table", "--dataset", "digits-c", "--runs", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "metrics.json is missing" in capsys.readouterr().err


def test_mlflow_parent_and_summary_runs(digits_runs, tmp_path):
    from mlflow.tracking import MlflowClient

    from manidp import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.init_store(uri, ("digits-c",))
    parent = tracking.parent_run("digits-c", "cifar_resnet20", uri)
    assert tracking.parent_run("digits-c", "cifar_resnet20", uri) == parent
    assert tracking.parent_run("digits-c", "cifar_resnet32", uri) != parent
    client = MlflowClient(tracking_uri=uri)
    child = client.create_run(client.get_experiment_by_name("digits-c").experiment_id,
                              tags={"mlflow.parentRunId": parent}).info.run_id
    (digits_runs[1] / "tracking.json").write_text(json.dumps({"uri": uri, "run_id": child}))
    artifact = tmp_path / "digits-c_table.md"
    artifact.write_text("| table |\n")
    summary = tracking.log_summary("digits-c", [artifact], {str(digits_runs[1]): {"speedup_cpu-2t": 1.5}}, uri)
    assert tracking.log_summary("digits-c", [artifact], {}, uri) == summary
    assert [a.path for a in client.list_artifacts(summary)] == ["digits-c_table.md"]
    assert client.get_run(child).data.metrics["speedup_cpu-2t"] == 1.5
    assert client.get_run(summary).data.tags["role"] == "summary"
