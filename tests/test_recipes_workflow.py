"""The recipe checks of issue 19: equal sweep grids holding each published default, and the on-request
augmentation and training-budget targets (planned with a dry run; nothing trains here)."""
from __future__ import annotations

import itertools
import re
import subprocess
import sys

import pytest
import yaml

from manidp.methods import METHODS, load_all
from test_workflow import DEFAULT_CONFIG, SNAKEFILE, _env, job_blocks, job_counts

DIGITS_C = yaml.safe_load(DEFAULT_CONFIG.read_text())["datasets"]["digits-c"]
# The published default each grid must hold: the method's own default option (the authors' code or paper).
PUBLISHED = {"manidp": "lam", "channel_gating": "gate_weight", "fbs": "l1_weight", "fpgm": "soft_fraction",
             "sfp": "soft_fraction"}


def test_every_sweep_entry_gets_the_same_grid_of_at_least_three_by_three_with_its_published_default():
    load_all()
    tuning = DIGITS_C["tuning"]
    assert len(tuning["lr"]) >= 3 and len(tuning["seeds"]) >= 3
    entries = [*DIGITS_C["methods"], *DIGITS_C["ablations"]["methods"]]
    assert sorted(tuning["methods"]) == sorted(entries)  # every method and ablation is swept
    sizes = {entry: len(list(itertools.product(*grid.values()))) for entry, grid in tuning["methods"].items()}
    assert min(sizes.values()) >= 3 and len(set(sizes.values())) == 1, sizes
    for entry, option in PUBLISHED.items():
        assert METHODS.get(entry).default_options[option] in tuning["methods"][entry][option], entry
    # past the previous sweep's edge: every entry chose lr 0.03, the top of {0.01, 0.03}
    assert max(tuning["lr"]) > 0.03


def test_every_digits_c_recipe_is_the_choice_its_committed_sweep_records():
    """config.yaml's lr and options per entry are the `chosen` row of the committed tuning table (the matched
    extra configurations' table where a method has one): a recipe edited by hand, or a sweep re-run without
    updating the config, fails here."""
    import csv
    import json

    reference = DEFAULT_CONFIG.parents[1] / "results" / "reference"
    chosen = {}
    for name in ("digits-c_tuning.csv", "digits-c_tuning_matched.csv"):  # the matched table wins where present
        for row in csv.DictReader((reference / name).open()):
            if row["chosen"] == "True":
                chosen[row["method"]] = (float(row["lr"]), json.loads(row["method_options"]))
    entries = {**DIGITS_C["methods"], **DIGITS_C["ablations"]["methods"]}
    assert set(entries) <= set(chosen)
    for entry, recipe in entries.items():
        lr, options = chosen[entry]
        assert recipe["train"]["lr"] == pytest.approx(lr, abs=5e-5), entry
        for key, value in recipe.get("options", {}).items():
            assert options[key] == value, (entry, key)


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> str:
    workdir = tmp_path_factory.mktemp("recipes-plan")
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
               "--cores", "2", "results/digits-c_augmentation.csv", "results/digits-c_training_budget.csv",
               "-n", "-p", "--configfile", str(DEFAULT_CONFIG)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env(), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_augmentation_and_training_budget_targets_plan_their_runs(plan):
    aug, curve = DIGITS_C["augmentation"], DIGITS_C["training_budget"]
    longer = [e for e in curve["epochs"] if e != DIGITS_C["finetune"]["train"]["epochs"]]
    counts = job_counts(plan)
    assert counts["train_augment_dense"] == len(aug["seeds"])
    assert counts["train_augment_method"] == len(aug["seeds"]) * len(DIGITS_C["methods"])
    assert counts["train_budget"] == len(longer) * len(curve["seeds"]) * len(curve["methods"])
    assert counts["augmentation_table"] == counts["training_budget_curve"] == 1
    for job in job_blocks(plan, "train_augment_method") + job_blocks(plan, "train_augment_dense"):
        command = job.split("Shell command:", 1)[1]
        assert "--set 'eval_splits=[\"val\"]'" in command and "data.augment_rotation_deg=" in command, command
    for job in job_blocks(plan, "train_budget"):
        epochs = re.search(r"epochs=(\d+)", job).group(1)
        assert f"--set train.epochs={epochs} " in job.split("Shell command:", 1)[1]
