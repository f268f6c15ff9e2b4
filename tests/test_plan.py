"""manidp.plan: the runs, folders and ``manidp train`` arguments a workflow config asks for, without Snakemake."""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import subprocess
import sys

import pytest
import yaml

from manidp.errors import UserError
from manidp.plan import Plan, check_config, label, profile_defaults, profile_flags, run_dir
from test_workflow import BAD_CONFIGS, DEFAULT_CONFIG, DEFAULT_PLAN, SCHEMA_FILE, TINY_CONFIG, _broken_config


@pytest.fixture(scope="module")
def default_config() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


@pytest.fixture()
def tiny() -> dict:
    return yaml.safe_load(TINY_CONFIG.read_text())


def _sets(args: list[str]) -> dict[str, str]:
    """``--set key=value`` pairs of an argument list, as the shell would pass them."""
    words = shlex.split(" ".join(args))
    return dict(words[i + 1].split("=", 1) for i, word in enumerate(words) if word == "--set")


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_is_refused_naming_key_and_valid_values(name):
    """check_config is what the workflow runs on its config before it plans anything."""
    with pytest.raises(UserError) as refused:
        check_config(_broken_config(BAD_CONFIGS[name][0]), SCHEMA_FILE)
    for text in BAD_CONFIGS[name][1]:
        assert text in str(refused.value), f"{text!r} not in: {refused.value}"


@pytest.mark.parametrize("path", [DEFAULT_CONFIG, TINY_CONFIG])
def test_shipped_configs_pass_the_checks(path):
    check_config(yaml.safe_load(path.read_text()), SCHEMA_FILE)


def test_checking_and_planning_the_default_config_imports_neither_torch_nor_timm():
    """The workflow checks and plans at every snakemake call (dry runs, each Slurm job): seconds saved each."""
    code = ("import sys, yaml\n"
            "from manidp.plan import Plan, check_config\n"
            f"config = yaml.safe_load(open({str(DEFAULT_CONFIG)!r}).read())\n"
            f"check_config(config, {str(SCHEMA_FILE)!r})\n"
            "Plan(config)\n"
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_parse_time_names_are_the_registries():
    """check_config reads names without building the registries; they must be the registries' names."""
    from importlib.metadata import entry_points

    import timm

    from manidp._defaults import BENCHMARK_BACKBONES, DATASET_NAMES, METHODS_ENTRY_POINT_GROUP
    from manidp.data import DATASETS
    from manidp.methods import METHODS, load_all

    load_all()
    assert sorted(DATASET_NAMES) == sorted(DATASETS.names())
    assert {p.name for p in entry_points(group=METHODS_ENTRY_POINT_GROUP)} == set(METHODS.names())
    assert all(timm.is_model(name) for name in BENCHMARK_BACKBONES)


def test_a_timm_backbone_outside_the_benchmarks_list_is_accepted(tiny):
    tiny["datasets"]["digits-c"]["backbones"] = {"resnet26": {}}
    check_config(tiny, SCHEMA_FILE)


def test_check_config_reads_yaml_12_numbers(tiny):
    tiny["datasets"]["digits-c"]["finetune"]["train"]["lr"] = "1.25e-2"  # as YAML 1.1 leaves it
    check_config(tiny, SCHEMA_FILE)
    assert tiny["datasets"]["digits-c"]["finetune"]["train"]["lr"] == 0.0125


def test_profile_defaults_are_manidp_latencys():
    """The schema's profile defaults, which Snakemake's validate fills in, are the command's own defaults."""
    from manidp.cli.latency import COMMANDS

    parser = argparse.ArgumentParser()
    COMMANDS[0].add_arguments(parser)
    defaults = profile_defaults(SCHEMA_FILE)
    assert defaults == {"batch_size": 1, "dtype": "fp32", "instances": 32, "repeats": 10, "warmup": 3}
    assert defaults == {key: parser.get_default(key) for key in defaults}


def test_profile_flags_put_defaulted_keys_first():
    profile = {"device": "cpu", "threads": 2, "warmup": 2, "batch_size": 1, "slice_cache_mb": 64}
    assert profile_flags(profile, ["batch_size", "warmup"]) == (
        "--batch-size 1 --warmup 2 --device cpu --threads 2 --slice-cache-mb 64")


@pytest.mark.parametrize("value, flag", [(False, "--no-inductor"), (True, "--inductor")])
def test_profile_switches_become_both_forms_of_the_flag(value, flag):
    """A boolean key is a switch: `manidp latency` takes --inductor / --no-inductor, not '--inductor False'."""
    from manidp.cli import build_parser

    flags = profile_flags({"device": "cpu", "threads": 1, "inductor": value}, [])
    assert flags == f"--device cpu --threads 1 {flag}"
    args = build_parser().parse_args(["latency", "RUN", *flags.split()])
    assert args.inductor is value


def test_every_profile_key_is_a_latency_flag():
    """The workflow passes a hardware profile to `manidp latency` key by key: each key the schema allows must
    parse as that command's flag, with a value the schema allows."""
    from manidp.cli import build_parser

    properties = yaml.safe_load(SCHEMA_FILE.read_text())["properties"]["hardware_profiles"][
        "additionalProperties"]["properties"]
    examples = {"integer": 2, "number": 64, "boolean": True}
    profile = {key: spec["enum"][0] if "enum" in spec else examples[spec["type"]] for key, spec in properties.items()}
    args = vars(build_parser().parse_args(["latency", "RUN", *profile_flags(profile, []).split()]))
    for key, value in profile.items():
        assert args[key] == value, key
    assert profile["omp_wait_policy"] == "active"


@pytest.mark.parametrize("value, text", [(0.4, "0.4"), (5e-05, "5e-05"), (True, "true"), (3, "3"),
                                         ([], "none"), ([1, 0.5], "1+0.5"), ("a", "a")])
def test_label(value, text):
    assert label(value) == text


def test_default_plan_runs(default_config):
    plan = Plan(default_config)
    dense, methods = plan.dense_dirs("digits-c"), plan.method_dirs("digits-c")
    assert (len(dense), len(methods)) == (DEFAULT_PLAN["train_dense"], DEFAULT_PLAN["train_method"])
    assert run_dir("digits-c", "cifar_resnet20", "l1", "0.4", 0) in methods
    assert plan.default_targets()[0] == "results/digits-c_all.txt"
    assert plan.latency_groups()[0] == ("digits-c", "cifar_resnet20")


def test_backbone_budgets_override_the_datasets(tiny):
    tiny["datasets"]["digits-c"]["backbones"]["cifar_resnet20"]["budgets"] = [0.3, 0.5]
    assert Plan(tiny).method_dirs("digits-c")[-1].endswith("-b0.5/seed0")


def test_tuning_sweep_folders_and_arguments(default_config):
    plan = Plan(default_config)
    tuning = default_config["datasets"]["digits-c"]["tuning"]
    dirs = plan.tuning_dirs("digits-c")
    lr = tuning["lr"][0]
    lam = tuning["methods"]["manidp"]["lam"][0]
    recipe = f"lr{label(lr)}-lam{label(lam)}"
    assert f"runs/tuning/digits-c/cifar_resnet20/manidp-b{label(tuning['budget'])}/{recipe}/seed0" in dirs
    sets = _sets(plan.tuning_args("digits-c", "manidp", recipe))
    assert sets["train.lr"] == str(lr) and json.loads(sets["method_options"])["lam"] == lam
    assert sets["eval_splits"] == '["val"]'
    with pytest.raises(UserError, match="not a setting of the manidp sweep"):
        plan.tuning_args("digits-c", "manidp", "lr9")


def test_method_arguments(tiny):
    tiny["datasets"]["digits-c"]["methods"]["l1"] = {"options": {"skip_layers": []}, "train": {"lr": 0.5}}
    args = Plan(tiny).method_args("digits-c", "l1", epochs=9)
    assert args[:2] == ["--method", "l1"]
    sets = _sets(args)
    assert sets["method_options"] == '{"skip_layers": []}'
    assert sets["train.lr"] == "0.5" and sets["train.epochs"] == "9"


def test_downloaded_datasets_never_download_in_a_job(default_config):
    sets = _sets(Plan(default_config).dense_args("cifar10"))
    assert sets["data.download"] == "false"


def test_on_request_section_not_set(tiny):
    plan = Plan(tiny)
    for name, key in [(plan.augment_dirs, "augmentation"), (plan.budget_curve_dirs, "training_budget"),
                      (plan.tuning_dirs, "tuning"), (plan.ablation_dirs, "ablations")]:
        with pytest.raises(UserError, match=f"'datasets.digits-c.{key}' is not set"):
            name("digits-c")


def test_dense_resources_fall_back_to_train_and_evaluate_only_takes_evaluate(tiny):
    tiny["resources"] = {"train": {"threads": 4, "gpus": 2, "mem_mb": 100}, "dense": {"mem_mb": 200},
                         "evaluate": {"gpus": 1}}
    plan = Plan(tiny)
    assert plan.resources_of("digits-c", "dense") == {"threads": 4, "gpus": 2, "mem_mb": 200}
    evaluated = copy.deepcopy(tiny)
    evaluated["datasets"]["digits-c"]["dense"] = {"train": {"epochs": 0}}
    evaluated["datasets"]["digits-c"]["resources"] = {"dense": {"threads": 8}}
    assert Plan(evaluated).resources_of("digits-c", "dense") == {"threads": 8, "gpus": 1, "mem_mb": 200}


# The checks test_workflow's BAD_CONFIGS leave out: edit of the tiny config -> what the message names.
PLAN_MISTAKES = {
    "ablation-repeats-entry": (lambda d: d.update(ablations={"reference": "l1", "methods": {"l1": {}}}),
                               "'datasets.digits-c.ablations.methods.l1' repeats an entry"),
    "sweep-of-no-entry": (lambda d: d.update(tuning={"budget": 0.4, "seeds": [0, 1, 2], "lr": [0.01],
                                                     "methods": {"fpgm": {"zero_grad": [True]}}}),
                          "'datasets.digits-c.tuning.methods.fpgm': not an entry"),
    "sweep-value-not-a-folder": (lambda d: d.update(tuning={"budget": 0.4, "seeds": [0, 1, 2], "lr": [0.01],
                                                            "methods": {"l1": {"skip_layers": ["a/b"]}}}),
                                 "the setting 'lr0.01-skip_layersa/b' cannot name a folder"),
    "augmentation-off-budget": (lambda d: d.update(augmentation={"budget": 0.5, "seeds": [0],
                                                                 "data": {"augment_shift_px": 2}}),
                                "'datasets.digits-c.augmentation.budget' is 0.5"),
    "curve-of-no-entry": (lambda d: d.update(training_budget={"budget": 0.4, "seeds": [0], "epochs": [2],
                                                              "methods": ["fpgm"]}),
                          "'datasets.digits-c.training_budget.methods' names 'fpgm'"),
    "dense-listed": (lambda d: d["methods"].update(base={"method": "dense"}),
                     "'datasets.digits-c.methods.base.method': 'dense' is the baseline"),
    "unknown-profile": (lambda d: d.update(hardware_profiles=["gpu"]),
                        "'datasets.digits-c.hardware_profiles' names 'gpu'; valid profiles: cpu-1t"),
    "no-budgets": (lambda d: d.pop("budgets"), "'datasets.digits-c.backbones.cifar_resnet20.budgets' is missing"),
}


@pytest.mark.parametrize("name", list(PLAN_MISTAKES))
def test_plan_mistakes_name_the_key(tiny, name):
    edit, text = PLAN_MISTAKES[name]
    edit(tiny["datasets"]["digits-c"])
    with pytest.raises(UserError) as refused:
        check_config(tiny, SCHEMA_FILE)
    assert text in str(refused.value)


def test_default_datasets_must_have_a_section(tiny):
    tiny["default_datasets"] = ["cifar10"]
    with pytest.raises(UserError, match="'default_datasets' names 'cifar10', which has no section"):
        check_config(tiny, SCHEMA_FILE)
