"""The Snakemake workflow: plans, parse-time errors, a tiny end-to-end run, Slurm.

Every test drives the real ``snakemake`` command in a temporary working
directory. Of the bad configs (each checked in-process in test_plan.py), two
go through it: a schema error and a plan error. The tiny run (.test/config.yaml)
trains for real: a dense model and one method on a few hundred digits-c images.
It is killed once during the method's fine-tune and resumed, then the tests
inspect what it produced.

Two things keep the module within a few minutes on 2 cores: the dry runs and
parse-time failures start together (each mostly imports torch), and the Slurm
run starts when the module does and is checked last, so its jobs' queueing and
status polling overlap the local tests.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "workflow" / "Snakefile"
SCHEMA_FILE = ROOT / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = ROOT / "config" / "config.yaml"
IMAGE_FOLDER = "/nonexistent/image-folder-tree"  # a dry run never reads it
# The tiny configuration CI runs: `snakemake --cores 2 --directory .test`.
TINY_CONFIG = ROOT / ".test" / "config" / "config.yaml"
SLURM_PROFILE = ROOT / "workflow" / "profiles" / "slurm"
TINY_METHOD = "runs/digits-c/cifar_resnet20/l1-b0.4/seed0"
TINY_FINETUNE_EPOCHS = 6  # enough that the kill lands between the first checkpoint and the end

# The default plan (digits-c): 6 methods x 2 budgets x 3 seeds, one cpu profile; no ablations, no sweep.
# Latency: one job per seed and profile times the seed's 12 method runs.
DEFAULT_PLAN = {"tracking_store": 1, "tracking_parent": 1, "train_dense": 3, "train_method": 36, "latency": 3,
                "table": 1, "plot": 1, "tracking_summary": 1, "dataset_all": 1, "all": 1}
# ImageNet: resnet18 at two operating points, resnet34 at three, resnet50 at one;
# 7 methods (Taylor too), 1 seed, latency on cpu-1t and cuda-bf16.
IMAGENET_PLAN = {"tracking_store": 1, "tracking_parent": 3, "train_dense": 3, "train_method": 42, "latency": 6,
                 "table": 1}


def _sweep_size(section: dict) -> int:
    """Runs of a dataset's recipe sweep: every method's lr x knob grid, on every seed and backbone."""
    tuning = section["tuning"]
    per_method = [len(tuning["lr"]) * math.prod(len(v) for v in grid.values()) for grid in tuning["methods"].values()]
    return sum(per_method) * len(tuning["seeds"]) * len(section["backbones"])


# On request: ManiDP and its 4 ablations (the authors' variant included) x 2 budgets x 3 seeds (the manidp
# runs are the main table's), and the sweep (its size follows the configured grids).
DIGITS_C = yaml.safe_load(DEFAULT_CONFIG.read_text())["datasets"]["digits-c"]
ON_REQUEST_PLAN = {"tracking_store": 1, "tracking_parent": 1, "train_dense": 3, "train_method": 30,
                   "ablation_table": 1, "train_tuning": _sweep_size(DIGITS_C), "tuning_table": 1}
TINY_PLAN = {"tracking_store": 1, "tracking_parent": 1, "train_dense": 1, "train_method": 1, "latency": 1,
             "table": 1, "plot": 1, "tracking_summary": 1, "dataset_all": 1, "all": 1}


def snakemake(workdir: Path, *args: str, env: dict | None = None, timeout: int = 600,
              check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
               "--cores", "2", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env or _env(),
                            cwd=workdir)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def job_blocks(output: str, rule: str) -> list[str]:
    """The dry-run (-p) listing of every job of ``rule``: its input, output, resources and shell command."""
    return [block for block in re.split(r"\n\[[^\]]+\]\n", output) if block.startswith(f"rule {rule}:")]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MANIDP_IMAGENET", "MLFLOW_TRACKING_URI")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra)
    return env


def job_counts(output: str) -> dict[str, int]:
    """The per-rule job counts of Snakemake's "Job stats" summary."""
    match = re.search(r"Job stats:\njob\s+count\n-+\s+-+\n(.*?)\ntotal\s+\d+", output, re.S)
    assert match, f"no job stats in:\n{output[-3000:]}"
    counts: dict[str, int] = {}
    for name, count in re.findall(r"^(\S+)\s+(\d+)$", match.group(1), re.M):
        # One latency rule per (dataset, backbone): latency_<dataset>_<backbone>, counted together.
        name = "latency" if name.startswith("latency_") else name
        counts[name] = counts.get(name, 0) + int(count)
    return counts


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory) -> dict:
    """One digits-c cache for every workflow run of this module."""
    return _env(MANIDP_CACHE=str(tmp_path_factory.mktemp("digits-cache")))


# ----------------------------------------------------------------- plans and parse-time errors
def _broken_config(edit) -> dict:
    config = yaml.safe_load(TINY_CONFIG.read_text())
    edit(config)
    return config


BAD_CONFIGS = {
    "enum": (lambda c: c["hardware_profiles"]["cpu-1t"].update(device="tpu"),
             ["hardware_profiles.cpu-1t.device", "'tpu'", '"cpu", "cuda"']),
    "unknown-key": (lambda c: c["datasets"]["digits-c"]["dense"]["train"].update(epochz=1),
                    ["datasets.digits-c.dense.train.epochz", "epochs", "lr"]),
    "unknown-method": (lambda c: c["datasets"]["digits-c"]["methods"].update(nosuch={}),
                       ["datasets.digits-c.methods.nosuch", "unknown method 'nosuch'", "valid methods:", "fbs",
                        "l1", "manidp"]),
    "unknown-backbone": (lambda c: c["datasets"]["digits-c"]["backbones"].update(resnet_nosuch={}),
                         ["datasets.digits-c.backbones.resnet_nosuch", "cifar_resnet20", "resnet50"]),
    "unknown-dataset": (lambda c: c["datasets"].update({"mnist": c["datasets"]["digits-c"]}),
                        ["datasets.mnist", "unknown dataset 'mnist'", "digits-c", "imagenet"]),
    # One training budget per dataset: a method entry may not change the number of steps.
    "method-epochs": (lambda c: c["datasets"]["digits-c"]["methods"].update(l1={"train": {"epochs": 9}}),
                      ["datasets.digits-c.methods.l1.train.epochs", "same number of steps",
                       "datasets.digits-c.finetune.train.epochs"]),
    "method-batch-size": (lambda c: c["datasets"]["digits-c"]["methods"].update(l1={"train": {"batch_size": 8}}),
                          ["datasets.digits-c.methods.l1.train.batch_size", "datasets.digits-c.finetune.train"]),
    "uneven-sweep": (lambda c: (c["datasets"]["digits-c"]["methods"].update(fpgm={}),
                                c["datasets"]["digits-c"].update(tuning={
                                    "budget": 0.4, "seeds": [0, 1, 2], "lr": [0.01],
                                    "methods": {"l1": {"skip_layers": [[]]}, "fpgm": {"zero_grad": [True, False]}}})),
                     ["datasets.digits-c.tuning.methods", "same-size sweep", "l1: 1", "fpgm: 2"]),
    "ablation-reference": (lambda c: c["datasets"]["digits-c"].update(ablations={
                               "reference": "manidp", "methods": {"manidp_plain": {}}}),
                           ["datasets.digits-c.ablations.reference", "'manidp'", "valid values: l1"]),
}
# Through the real snakemake as well: one schema error and one plan error.
WIRED_BAD_CONFIGS = ("enum", "method-epochs")


@pytest.fixture(scope="module")
def parse_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every run that stops at or before planning, started together; name -> (workdir, result)."""
    # Targets first: --configfile takes every value that follows it.
    default = ["--configfile", str(DEFAULT_CONFIG)]
    calls = {"default-plan": ["-n", *default],
             "on-request-plan": ["results/digits-c_ablations.csv", "results/digits-c_tuning.csv", "-n", "-p", *default],
             # A cluster whose ImageNet only compute nodes see: the jobs check the folder themselves.
             "imagenet-plan": ["results/imagenet_table.csv", "-n", "-p", "--config", "data_check=job", *default],
             "imagenet-without-data": ["results/imagenet_table.csv", *default]}
    # Any ImageFolder tree as a dataset: its folder named by the config key, read by jobs from the environment.
    folder_config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    folder_config["datasets"]["imagefolder"] = {
        "backbones": {"resnet18": {}}, "budgets": [0.5], "seeds": [0], "hardware_profiles": ["cpu-1t"],
        "dense": {"train": {"epochs": 1}}, "finetune": {"train": {"epochs": 1}}, "methods": {"l1": {}}}
    folder_path = tmp_path_factory.mktemp("config") / "imagefolder.yaml"
    folder_path.write_text(yaml.safe_dump(folder_config))
    calls["imagefolder-plan"] = ["results/imagefolder_table.csv", "-n", "-p", "--configfile", str(folder_path),
                                 "--config", f"image_folder={IMAGE_FOLDER}"]
    for name in WIRED_BAD_CONFIGS:
        path = tmp_path_factory.mktemp("config") / "config.yaml"
        path.write_text(yaml.safe_dump(_broken_config(BAD_CONFIGS[name][0])))
        calls[name] = ["-n", "--configfile", str(path)]
    started = {}
    for name, args in calls.items():
        workdir = tmp_path_factory.mktemp(name)
        command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
                   "--cores", "2", *args]
        started[name] = (workdir, command, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                             text=True, env=_env(), cwd=workdir))
    results = {}
    for name, (workdir, command, process) in started.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = (workdir, subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return results


def _succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{' '.join(result.args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_default_plan(parse_runs):
    assert job_counts(_succeeded(parse_runs["default-plan"][1]).stdout) == DEFAULT_PLAN


def test_on_request_plan_ablations_and_sweep(parse_runs):
    assert job_counts(_succeeded(parse_runs["on-request-plan"][1]).stdout) == ON_REQUEST_PLAN


def test_recipe_sweep_reads_no_test_file(parse_runs):
    """Every sweep job starts from the dense model of its own seed, reads nothing else, evaluates validation only."""
    output = _succeeded(parse_runs["on-request-plan"][1]).stdout
    jobs = job_blocks(output, "train_tuning")
    assert len(jobs) == ON_REQUEST_PLAN["train_tuning"]
    for job in jobs:
        inputs = re.search(r"^    input: (.*)$", job, re.M).group(1).split(", ")
        seed = re.search(r"seed=(\d+)", job).group(1)
        assert inputs == [f"runs/digits-c/cifar_resnet20/dense/seed{seed}/model.pt"], job
        assert "test" not in " ".join(inputs)
        command = job.split("Shell command:", 1)[1]
        assert "--set 'eval_splits=[\"val\"]'" in command and "instances_test" not in command, command
        assert f"--init-from runs/digits-c/cifar_resnet20/dense/seed{seed} " in command
    # Every method gets the same-size sweep: lr x its knob values, here ManiDP's lam.
    methods = {re.search(r"method=(\w+),", job).group(1) for job in jobs}
    assert methods == set(DIGITS_C["tuning"]["methods"])
    settings = {re.search(r"recipe=([^,]+)", job).group(1) for job in jobs if "method=manidp," in job}
    lam = DIGITS_C["tuning"]["methods"]["manidp"]["lam"]
    assert settings == {f"lr{a:g}-lam{b:g}" for a in DIGITS_C["tuning"]["lr"] for b in lam}
    per_method = {m: sum(f"method={m}," in job for job in jobs) for m in methods}
    assert len(set(per_method.values())) == 1, per_method


def test_imagenet_dry_run_lists_plan_without_data(parse_runs):
    result = _succeeded(parse_runs["imagenet-plan"][1])
    assert job_counts(result.stdout) == IMAGENET_PLAN
    assert "runs/imagenet/resnet34/manidp-b0.47/seed0/metrics.json" in result.stdout
    assert "runs/imagenet/resnet50/fbs-b0.55/seed0/latency_cuda-bf16.json" in result.stdout
    # The profile leaves instances, repeats and warmup unset: the schema's defaults, filled by validate().
    flags = "--batch-size 1 --dtype bf16 --instances 32 --repeats 10 --warmup 3 --device cuda --threads 4 "
    assert flags in result.stdout
    # The dense job only evaluates hub weights: the `evaluate` resources, not the 4-GPU training ones.
    for job in job_blocks(result.stdout, "train_dense"):
        assert re.search(r"resources: .*\bgpu=1, .*mem_mb=32000", job), job
        assert "torchrun" not in job
    for job in job_blocks(result.stdout, "train_method"):
        assert re.search(r"resources: .*\bgpu=4, .*mem_mb=128000", job), job
        assert job.count("torchrun --standalone --nproc-per-node 4") == 1


def test_an_image_folder_dataset_is_planned_with_its_folder_out_of_the_jobs_params(parse_runs):
    result = _succeeded(parse_runs["imagefolder-plan"][1])
    counts = job_counts(result.stdout)
    assert counts["check_data"] == counts["train_dense"] == counts["train_method"] == counts["table"] == 1
    assert "runs/imagefolder/resnet18/l1-b0.5/seed0/metrics.json" in result.stdout
    # Jobs read the folder from MANIDP_IMAGE_FOLDER: moving it re-runs nothing.
    for rule in ("train_dense", "train_method"):
        assert all(IMAGE_FOLDER not in job for job in job_blocks(result.stdout, rule))


def test_imagenet_without_data_stops_before_any_job(parse_runs):
    workdir, result = parse_runs["imagenet-without-data"]
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "imagenet_path" in message and "MANIDP_IMAGENET" in message, message[-3000:]
    assert message.count("Set the folder (train/ and val/") == 1
    # Only the MLflow store may have been created beside the check: no run, no parent run, no experiment.
    assert not (workdir / "runs").exists() and not (workdir / "results" / "tracking" / "imagenet").exists()


@pytest.mark.parametrize("name", WIRED_BAD_CONFIGS)
def test_bad_config_fails_at_parse_time_naming_key_and_valid_values(parse_runs, name):
    result = parse_runs[name][1]
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "Job stats" not in message
    for text in BAD_CONFIGS[name][1]:
        assert text in message, f"{text!r} not in:\n{message[-2000:]}"


# ----------------------------------------------------------------- the tiny run
def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"snakemake ended before {path} appeared:\n{process.stdout.read()[-4000:]}")
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_env) -> Path:
    """The tiny workflow, killed hard during the method's fine-tune, then resumed to the end.

    The fine-tune runs 6 epochs here so that its first epoch's checkpoint (and
    its open MLflow run) exist while the job still runs; the whole process
    group gets SIGKILL then, as a crash, a preemption or an impatient user
    would give it. The config sits where the workflow reads it
    (config/config.yaml in the working directory, as with `--directory .test`),
    writes the fine-tune's learning rate as ``1.25e-2`` (a float in YAML 1.2,
    which the schema check and the training command must both read so), and
    holds a cifar10 section that nothing asks for.
    """
    workdir = tmp_path_factory.mktemp("tiny")
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["datasets"]["digits-c"]["finetune"]["train"].update(epochs=TINY_FINETUNE_EPOCHS, lr=0.0125)
    config["datasets"]["cifar10"] = {**yaml.safe_load(DEFAULT_CONFIG.read_text())["datasets"]["cifar10"],
                                     "hardware_profiles": ["cpu-1t"]}
    text = yaml.safe_dump(config)
    assert text.count("lr: 0.0125") == 1
    (workdir / "config").mkdir()
    (workdir / "config" / "config.yaml").write_text(text.replace("lr: 0.0125", "lr: 1.25e-2"))

    command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
               "--cores", "2"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cache_env,
                             cwd=workdir, start_new_session=True)
    _wait_for(workdir / TINY_METHOD / "checkpoint.pt", first)
    (workdir / "killed_run.txt").write_text(json.loads((workdir / TINY_METHOD / "tracking.json").read_text())["run_id"])
    descendants = psutil.Process(first.pid).children(recursive=True)
    os.killpg(first.pid, signal.SIGKILL)
    for process in descendants:  # and any job that left the group
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    first.wait(timeout=60)
    assert not (workdir / TINY_METHOD / "metrics.json").exists(), "the fine-tune finished before it was killed"

    # What a user does after a crash: release the dead run's lock, run the same command again.
    snakemake(workdir, "--unlock", env=cache_env)
    result = snakemake(workdir, env=cache_env)
    (workdir / "snakemake.out").write_text(result.stdout + result.stderr)
    return workdir


def test_killed_run_resumed_from_its_checkpoint(tiny_run):
    log = (tiny_run / "results/logs/digits-c/cifar_resnet20/l1-b0.4/seed0/train.log").read_text()
    assert re.search(rf"resuming after epoch [1-{TINY_FINETUNE_EPOCHS - 1}]/{TINY_FINETUNE_EPOCHS}", log), log[-2000:]
    history = (tiny_run / TINY_METHOD / "history.jsonl").read_text().splitlines()
    assert len(history) == TINY_FINETUNE_EPOCHS
    # A finished run drops its checkpoint: a later re-run must not resume stale state.
    assert not (tiny_run / TINY_METHOD / "checkpoint.pt").exists()


def test_killed_workflow_leaves_one_finished_run_per_result(tiny_run):
    """Every result identity (dataset, backbone, method, budget, seed, config hash) has exactly one FINISHED
    MLflow run after the kill and the re-run: the killed fine-tune's run went on, nothing is left RUNNING."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tiny_run / 'results' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits-c").experiment_id])
    by_identity = collections.Counter(r.data.tags["manidp.identity"] for r in runs if "manidp.identity" in r.data.tags)
    assert sorted(key.split("/")[2] for key in by_identity) == ["dense", "l1"], by_identity
    assert set(by_identity.values()) == {1}, by_identity
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.data.tags, r.info.status) for r in runs]
    (method,) = [r for r in runs if r.data.tags.get("method") == "l1"]
    assert method.info.run_id == (tiny_run / "killed_run.txt").read_text()
    assert method.data.params["train.lr"] == "0.0125" and "test_top1" in method.data.metrics
    assert not list((tiny_run / "runs").rglob("tracking_pending.json"))
    # The tiny config's tracking.log_model: false reached every training job, which logged no model.
    assert not client.search_logged_models([client.get_experiment_by_name("digits-c").experiment_id])
    for run in runs:
        if "manidp.identity" in run.data.tags:
            assert "manidp.model_format" not in run.data.tags and "manidp.model_not_logged" not in run.data.tags


def _check_table(workdir: Path, epochs: int = 1) -> None:
    table = pd.read_csv(workdir / "results/digits-c_table.csv")
    assert table["method"].tolist() == ["dense", "l1"]
    assert table["dynamic"].tolist() == ["dense", "static"]
    assert table["budget_pct"].isna()[0] and table["budget_pct"][1] == 40
    assert table["n_seeds"].tolist() == [1, 1] and table["source"].tolist() == ["ours", "ours"]
    for column in ("backbone", "top1_err", "top1_err_std", "top5_err", "top1_gap", "top5_gap", "macs_m",
                   "macs_reduction_pct", "macs_reduction_pct_std", "notes", "paper_reference"):
        assert column in table.columns
    # The table states the training budget: the method row fine-tuned finetune.train.epochs.
    assert table.loc[1, "epochs"] == epochs and table.loc[1, "optimizer_steps"] > 0
    assert table.loc[0, "top1_gap"] == 0 and table.loc[0, "macs_reduction_pct"] == 0
    assert abs(table.loc[1, "macs_reduction_pct"] - 40) <= 1
    assert table.loc[0, "speedup_cpu-1t"] == 1 and table.loc[1, "speedup_cpu-1t"] > 0
    markdown = (workdir / "results/digits-c_table.md").read_text()  # the paper's layout
    assert re.search(r"\|\s*cifar_resnet20\s*\|\s*l1\s*\|\s*no\s*\|", markdown), markdown
    full = (workdir / "results/digits-c_table_full.md").read_text()  # every column
    assert re.search(r"\|\s*cifar_resnet20\s*\|\s*l1\s*\|\s*static\s*\|\s*40\s*\|", full), full
    latex = (workdir / "results/digits-c_table.tex").read_text()
    assert r"\toprule" in latex and r"\bottomrule" in latex and r"cifar\_resnet20" in latex


def test_tiny_run_table(tiny_run):
    _check_table(tiny_run, TINY_FINETUNE_EPOCHS)


def test_profile_switch_reaches_the_latency_report(tiny_run):
    """The tiny profile's `inductor: false` becomes --no-inductor, and the report says why the candidate is absent."""
    report = json.loads((tiny_run / TINY_METHOD / "latency_cpu-1t.json").read_text())
    reference = report["dense_reference"]
    assert "inductor/channels_last" not in reference["candidates_ms"]
    assert "hardware profile" in reference["dropped"]["inductor/channels_last"]


def test_tiny_run_per_seed_table(tiny_run):
    per_seed = pd.read_csv(tiny_run / "results/digits-c_per_seed.csv")
    assert sorted(per_seed["method"]) == ["dense", "l1"] and set(per_seed["seed"]) == {0}
    # The dataset's one target lists everything it built.
    built = set((tiny_run / "results/digits-c_all.txt").read_text().split())
    assert {"results/digits-c_table.csv", "results/digits-c_per_seed.csv", "results/digits-c_speedup.png",
            f"{TINY_METHOD}/model.pt", "results/tracking/digits-c/summary_run.txt"} <= built


def test_tiny_run_plots_and_report(tiny_run):
    """Plots, and the report the default profile writes after the run (report-after-run)."""
    for name in ("digits-c_pareto.png", "digits-c_macs_vs_difficulty.png", "digits-c_speedup.png", "report.html"):
        path = tiny_run / "results" / name
        assert path.stat().st_size > 10_000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" or name.endswith(".html")
    report = (tiny_run / "results" / "report.html").read_text()
    assert "digits-c_table.html" in report and "digits-c_per_seed.csv" in report  # the table readable in the page


def test_tiny_run_mlflow_parent_children_summary(tiny_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_run / 'results' / 'mlflow.db'}")
    # Only datasets that ran have an experiment (the config's cifar10 section did not run).
    assert {e.name for e in client.search_experiments()} - {"Default"} == {"digits-c"}
    experiment = client.get_experiment_by_name("digits-c")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "parent"]
    summaries = [r for r in runs if r.data.tags.get("role") == "summary"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(summaries) == 1, [r.data.tags for r in runs]
    assert sorted(r.data.tags["method"] for r in children) == ["dense", "l1"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert all(r.info.status == "FINISHED" and "test_top1" in r.data.metrics for r in children)
    artifacts = {a.path for a in client.list_artifacts(summaries[0].info.run_id)}
    assert {"digits-c_table.csv", "digits-c_table.md", "digits-c_table.tex", "digits-c_pareto.png",
            "digits-c_macs_vs_difficulty.png"} <= artifacts
    assert (tiny_run / "results/tracking/digits-c/summary_run.txt").read_text() == summaries[0].info.run_id


def test_rerunning_finished_workflow_does_nothing(tiny_run, cache_env):
    result = snakemake(tiny_run, "-n", env=cache_env)
    assert "Nothing to be done" in result.stdout + result.stderr


def test_deleting_a_checkpoint_reruns_only_its_dependents(tiny_run, cache_env):
    """Without the method's model, the plan retrains it and redoes what depends on it, and only that:
    the dense run is left alone. (The plan is checked; Snakemake runs what it plans.)"""
    model = tiny_run / TINY_METHOD / "model.pt"
    aside = model.with_name("model.pt.aside")
    os.replace(model, aside)
    try:
        plan = job_counts(snakemake(tiny_run, "-n", env=cache_env).stdout)
    finally:
        os.replace(aside, model)  # rename keeps its time stamp: the finished workflow stays finished
    assert plan == {"train_method": 1, "latency": 1, "table": 1, "plot": 1, "tracking_summary": 1, "dataset_all": 1,
                    "all": 1}


def test_an_unavailable_latency_is_measured_when_the_device_appears(tiny_run, cache_env, tmp_path):
    """A cuda profile on a machine without a GPU records "unavailable"; re-running here does nothing,
    and once the device is there (torch reports CUDA: faked here) the latency job is due again."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the profile is measured, not unavailable")
    overlay = tmp_path / "cuda.yaml"
    overlay.write_text(yaml.safe_dump({
        "hardware_profiles": {"cuda-bf16": {"device": "cuda", "threads": 1, "batch_size": 1, "dtype": "bf16"}},
        "datasets": {"digits-c": {"hardware_profiles": ["cpu-1t", "cuda-bf16"]}}}))
    target = f"{TINY_METHOD}/latency_cuda-bf16.json"
    snakemake(tiny_run, target, "--configfile", str(overlay), env=cache_env)
    assert json.loads((tiny_run / target).read_text())["status"] == "unavailable"
    fake = tmp_path / "fake_cuda"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    env = {**cache_env, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake), cache_env.get("PYTHONPATH")]))}
    # Two dry runs (they take no lock and write nothing), side by side: here, and where the device appeared.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        again, appeared = pool.map(lambda e: snakemake(tiny_run, target, "-n", "--configfile", str(overlay), env=e),
                                   (cache_env, env))
    assert "Nothing to be done" in again.stdout + again.stderr
    assert "before: 'absent' now: 'present'" in appeared.stdout + appeared.stderr, appeared.stdout[-3000:]


# ----------------------------------------------------------------- a real Slurm cluster
def _slurm_unavailable() -> str | None:
    if shutil.which("sinfo") is None:
        return "sinfo not found: no Slurm client here (CI starts a one-node cluster with .ci/start_slurm.sh)"
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    states = probe.stdout.split()
    if probe.returncode or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        return (f"no Slurm cluster answers (sinfo: {(probe.stderr or probe.stdout).strip() or 'no nodes'}); "
                "start one with .ci/start_slurm.sh")
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_run(request, tmp_path_factory):
    """The tiny workflow through the Slurm profile, started in the background with the module.

    Polls often (a real cluster is polled more gently). Yields (workdir,
    process) or a reason to skip.
    """
    if not any(item.name == "test_slurm_profile_runs_tiny_workflow" for item in request.session.items):
        yield "the Slurm test is not selected"
        return
    reason = _slurm_unavailable()
    if reason:
        yield reason
        return
    workdir = tmp_path_factory.mktemp("slurm")
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
               "--profile", str(SLURM_PROFILE), "--configfile", str(TINY_CONFIG),
               "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "2",
               "--latency-wait", "5"]
    env = _env(MANIDP_CACHE=str(tmp_path_factory.mktemp("slurm-digits-cache")))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=workdir)
    yield workdir, process
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=60)


@pytest.mark.slurm
def test_slurm_profile_runs_tiny_workflow(slurm_run):
    if isinstance(slurm_run, str):
        pytest.skip(slurm_run)
    workdir, process = slurm_run
    output, _ = process.communicate(timeout=540)
    assert process.returncode == 0, output[-6000:]
    # Training and latency jobs go through Slurm; MLflow bookkeeping, tables and plots stay local.
    assert len(re.findall(r"Job \d+ has been submitted with SLURM jobid \d+", output)) == 3, output[-3000:]
    assert job_counts(output) == TINY_PLAN
    # The plugin deletes a successful job's log unless told to keep it (slurm-keep-successful-logs).
    assert len(list((workdir / "results" / "logs" / "slurm").rglob("*.log"))) == 3
    _check_table(workdir)
