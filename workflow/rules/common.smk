"""Config validation, input functions and wildcard constraints.

Rules stay small: everything they look up in the config comes from a function
here. Two kinds of settings reach a job, deliberately kept apart:

- what determines a result (dataset, backbone, method, options, budget, seed,
  recipe) travels in ``params``, so changing it re-runs exactly the jobs whose
  results it changes (Snakemake's params trigger);
- where things go or run (tracking store, threads, the ImageNet folder) is
  passed through globals and the environment, so moving the store or giving a
  job more cores never re-trains anything.
"""
import json
import os
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

SCHEMA_FILE = Path(workflow.basedir) / "schemas" / "config.schema.yaml"


# ----------------------------------------------------------------- validation
def _key(path) -> str:
    return ".".join(str(part) for part in path) or "(top level)"


def _schema_message(error) -> str:
    """One line naming the offending key and what would be valid there."""
    where = _key(error.absolute_path)
    if error.validator == "additionalProperties" and error.validator_value is False:
        allowed = sorted(error.schema.get("properties", {}))
        unexpected = sorted(set(error.instance) - set(allowed))
        keys = ", ".join(f"{where}.{k}" if error.absolute_path else k for k in unexpected)
        return f"unknown config key(s) {keys}; valid keys at '{where}': {', '.join(allowed)}"
    if error.validator == "enum":
        valid = ", ".join(json.dumps(v) for v in error.validator_value)
        return f"config key '{where}' is {error.instance!r}; valid values: {valid}"
    if error.validator == "required":
        return f"config section '{where}' misses a key: {error.message}"
    if error.validator == "propertyNames":
        return f"config section '{where}' has an invalid name: {error.message}"
    return f"config key '{where}': {error.message}"


def validate_config(cfg: dict) -> None:
    """Check ``cfg`` against the schema, then every name against the live registries.

    The names are checked where the run is started; a job that re-reads the
    workflow on a cluster node skips that (it imports every method) since its
    config was checked before it was submitted.
    """
    import jsonschema
    from snakemake_interface_executor_plugins.settings import ExecMode

    schema = yaml.safe_load(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = list(validator.iter_errors(cfg))
    if errors:
        raise WorkflowError(_schema_message(jsonschema.exceptions.best_match(errors)))
    if workflow.exec_mode == ExecMode.DEFAULT:
        _check_names(cfg)


def _check_names(cfg: dict) -> None:
    """Names must exist in the package's registries, as they are at run time."""
    import timm

    from manidp.data import DATASETS
    from manidp.methods import METHODS, load_all
    from manidp.models import BENCHMARK_BACKBONES

    load_all()
    for name in cfg["default_datasets"]:
        if name not in cfg["datasets"]:
            raise WorkflowError(f"config key 'default_datasets' names '{name}', which has no section; "
                                f"valid values: {', '.join(cfg['datasets'])}")
    for ds, section in cfg["datasets"].items():
        if ds not in DATASETS:
            raise WorkflowError(f"config key 'datasets.{ds}': unknown dataset '{ds}'; "
                                f"valid datasets: {', '.join(DATASETS.names())}")
        for backbone in section["backbones"]:
            if not timm.is_model(backbone):
                raise WorkflowError(f"config key 'datasets.{ds}.backbones.{backbone}': unknown backbone; "
                                    f"valid backbones: {', '.join(BENCHMARK_BACKBONES)} (or any timm model name)")
            if not budgets(ds, backbone, cfg):
                raise WorkflowError(f"config key 'datasets.{ds}.backbones.{backbone}.budgets' is missing and "
                                    f"'datasets.{ds}.budgets' is not set: give the MACs reductions to run")
        for entry, settings in section["methods"].items():
            method = settings.get("method", entry)
            where = f"datasets.{ds}.methods.{entry}" + (".method" if "method" in settings else "")
            if method == "dense":
                raise WorkflowError(f"config key '{where}': 'dense' is the baseline every dataset trains "
                                    "(configured under 'dense'), not a method to list")
            if method not in METHODS:
                valid = [name for name in METHODS.names() if name != "dense"]
                raise WorkflowError(f"config key '{where}': unknown method '{method}'; "
                                    f"valid methods: {', '.join(valid)}")
        for profile in section.get("hardware_profiles", []):
            if profile not in cfg["hardware_profiles"]:
                raise WorkflowError(f"config key 'datasets.{ds}.hardware_profiles' names '{profile}'; "
                                    f"valid profiles: {', '.join(cfg['hardware_profiles'])}")


# ----------------------------------------------------------------- where things go
TRACKING = config.get("tracking", {}).get("enabled", True)
# Formatted into shell commands as globals, not params: switching tracking off
# or moving the store changes where runs are recorded, never a result.
TRACKING_ARGS = "" if TRACKING else "--set tracking.enabled=false"
TRACKING_SWITCH = "" if TRACKING else "--no-tracking"
# Rules call the package's console scripts (manidp, torchrun): find them beside
# the Python that runs Snakemake, even without an activated environment.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
if config.get("tracking", {}).get("uri"):
    # The package lets MLFLOW_TRACKING_URI win over its config key, as MLflow does.
    os.environ.setdefault("MLFLOW_TRACKING_URI", config["tracking"]["uri"])

# The variable manidp.data.imagenet reads when data.imagenet_path is unset.
IMAGENET_ENV_VAR = "MANIDP_IMAGENET"
if config.get("imagenet_path"):
    # The package reads the folder from this variable; keeping it out of the
    # params means moving ImageNet does not re-run anything.
    os.environ[IMAGENET_ENV_VAR] = str(config["imagenet_path"])

# Datasets read from a folder the user provides: the config key and variable naming it.
EXTERNAL_DATA = {"imagenet": ("imagenet_path", IMAGENET_ENV_VAR)}


def missing_data_message(datasets) -> str | None:
    """Why the data of one of ``datasets`` is missing, or None when all are there."""
    for ds in sorted(datasets):
        if ds not in EXTERNAL_DATA:
            continue
        key, env = EXTERNAL_DATA[ds]
        raw = os.environ.get(env)
        folder = Path(raw).expanduser() if raw else None
        if folder is None or not (folder / "train").is_dir() or not (folder / "val").is_dir():
            found = f"'{folder}' holds no train/ and val/ folders" if folder else "no path is set"
            return (f"{ds}: {found}. Set the ILSVRC-2012 folder (train/ and val/, one subfolder per class) "
                    f"with the config key '{key}' (snakemake ... --config {key}=/path/to/imagenet) or the "
                    f"environment variable {env}. A dry run (snakemake -n) lists the plan without the data.")
    return None


# ----------------------------------------------------------------- the plan
def dataset_cfg(ds: str) -> dict:
    return config["datasets"][ds]


def budgets(ds: str, backbone: str, cfg: dict = config) -> list:
    section = cfg["datasets"][ds]
    return section["backbones"][backbone].get("budgets") or section.get("budgets") or []


def budget_label(budget: float) -> str:
    """How a budget appears in run folders (the package's own naming: 0.4, 0.55)."""
    return f"{budget:g}"


def profiles(ds: str) -> list[str]:
    return dataset_cfg(ds).get("hardware_profiles", [])


def run_dir(ds, backbone, method, budget, seed) -> str:
    """runs/{dataset}/{backbone}/{method}[-b{budget}]/seed{seed}: the package's default layout."""
    name = method if budget is None else f"{method}-b{budget}"
    return f"runs/{ds}/{backbone}/{name}/seed{seed}"


def dense_dirs(ds: str) -> list[str]:
    return [run_dir(ds, b, "dense", None, s) for b in dataset_cfg(ds)["backbones"] for s in dataset_cfg(ds)["seeds"]]


def method_dirs(ds: str) -> list[str]:
    section = dataset_cfg(ds)
    return [run_dir(ds, b, m, budget_label(x), s)
            for b in section["backbones"] for m in section["methods"] for x in budgets(ds, b) for s in section["seeds"]]


def all_run_dirs(ds: str) -> list[str]:
    return dense_dirs(ds) + method_dirs(ds)


def report_inputs(ds: str) -> dict:
    """Every run file a dataset's table and plots are built from."""
    return {
        "metrics": [f"{d}/metrics.json" for d in all_run_dirs(ds)],
        "instances": [f"{d}/instances_test.csv" for d in all_run_dirs(ds)],
        "latency": [f"{d}/latency_{p}.json" for d in method_dirs(ds) for p in profiles(ds)],
    }


def dataset_targets(ds: str) -> list[str]:
    """What ``rule all`` builds for a dataset: tables, plots, MLflow summary, and every trained model.

    The models are targets because Snakemake takes a deleted file that only
    feeds up-to-date results for an intermediate it need not rebuild; as
    targets, a deleted model.pt is retrained, with everything built on it.
    """
    targets = [f"results/{ds}_table.{ext}" for ext in ("csv", "md", "tex")]
    targets += [f"results/{ds}_pareto.png", f"results/{ds}_macs_vs_difficulty.png"]
    targets += [f"{run}/model.pt" for run in all_run_dirs(ds)]
    return targets + [f"results/tracking/{ds}/summary_run.txt"]


validate_config(config)


# ----------------------------------------------------------------- training arguments
def _set_args(prefix: str, tree: dict) -> list[str]:
    """``--set prefix.key=value`` for each leaf; values as JSON, which the package reads as YAML."""
    args = []
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value and name != "method_options":
            args += _set_args(name, value)
        else:
            args += ["--set", shlex.quote(f"{name}={json.dumps(value)}")]
    return args


def _common_sets(ds: str) -> list[str]:
    section = dataset_cfg(ds)
    return _set_args("data", section.get("data", {})) + _set_args("runtime", section.get("runtime", {}))


def dense_args(wildcards) -> str:
    """The dense run's recipe and pretrained source, as ``manidp train`` flags."""
    dense = dataset_cfg(wildcards.dataset).get("dense", {})
    args = _set_args("train", dense.get("train", {})) + _common_sets(wildcards.dataset)
    if dense.get("pretrained"):
        args += _set_args("", {"pretrained": dense["pretrained"]})
    return " ".join(args)


def method_entry(wildcards) -> dict:
    return dataset_cfg(wildcards.dataset)["methods"][wildcards.method]


def method_args(wildcards) -> str:
    """Registered method, its options and its fine-tuning recipe, as ``manidp train`` flags."""
    section, entry = dataset_cfg(wildcards.dataset), method_entry(wildcards)
    recipe = {**section.get("finetune", {}).get("train", {}), **entry.get("train", {})}
    args = ["--method", entry.get("method", wildcards.method)]
    args += _set_args("", {"method_options": entry.get("options", {})})
    args += _set_args("train", recipe) + _common_sets(wildcards.dataset)
    return " ".join(args)


# ----------------------------------------------------------------- resources
def resources_of(ds: str, kind: str) -> dict:
    """Resources for one kind of job: the top-level ones, then the dataset's, key by key.

    Keys ``dense`` leaves unset fall back to ``train``: a pretrained dense
    model that is only evaluated can ask for less, but need not say so.
    """
    top, own = config["resources"], dataset_cfg(ds).get("resources", {})
    kinds = ["train", "dense"] if kind == "dense" else [kind]
    merged = {}
    for name in kinds:
        merged.update(top.get(name, {}))
        merged.update(own.get(name, {}))
    return merged


def resource(kind: str, key: str, default):
    """A resource callable for a rule: the value configured for the job's dataset, else ``default``."""
    def lookup(wildcards):
        value = resources_of(wildcards.dataset, kind).get(key)
        return default if value is None else value

    return lookup


# A hardware profile's optional keys (config/README.md).
PROFILE_DEFAULTS = {"batch_size": 1, "dtype": "fp32", "instances": 32, "repeats": 10, "warmup": 3}


def profile_of(wildcards) -> dict:
    return {**PROFILE_DEFAULTS, **config["hardware_profiles"][wildcards.profile]}


def latency_args(wildcards) -> str:
    """The hardware profile as ``manidp latency`` flags (its threads exactly, whatever the job's cores)."""
    return " ".join(f"--{key.replace('_', '-')} {value}" for key, value in profile_of(wildcards).items())


def latency_gpus(wildcards) -> int:
    """A cuda profile asks the scheduler for one GPU (Slurm: --gpus 1)."""
    return int(profile_of(wildcards)["device"] == "cuda")


def train_launcher(kind: str):
    """``manidp`` alone, or under torchrun when the job has several GPUs (one process per GPU)."""
    def launcher(wildcards) -> str:
        gpus = resources_of(wildcards.dataset, kind).get("gpus", 0)
        return f"torchrun --standalone --nproc-per-node {gpus} -m manidp" if gpus > 1 else "manidp"

    return launcher


def process_threads(kind: str):
    """Torch threads per training process: the job's cores shared among its processes."""
    def threads(wildcards, threads) -> int:
        return max(1, threads // max(1, resources_of(wildcards.dataset, kind).get("gpus", 0)))

    return threads


def store_input(wildcards) -> list:
    """The MLflow store, created once before any job opens it (a fresh sqlite store races)."""
    return [ancient("results/tracking/store.txt")] if TRACKING else []


def parent_input(wildcards) -> str:
    """The (dataset, backbone) parent run id a training job logs under.

    ``ancient``: re-creating the marker must never re-train anything.
    """
    return ancient(f"results/tracking/{wildcards.dataset}/{wildcards.backbone}/parent_run.txt")


wildcard_constraints:
    dataset=r"[A-Za-z0-9_.-]+",
    backbone=r"[A-Za-z0-9_.]+",
    method=r"[A-Za-z0-9_]+",
    budget=r"0\.[0-9]+",
    seed=r"[0-9]+",
    profile=r"[A-Za-z0-9_-]+",


onstart:
    # Stop before any job when a dataset that must be provided is absent
    # (a dry run, which never gets here, still lists the whole plan).
    needed = {job.wildcards.get("dataset") for job in workflow.dag.needrun_jobs() if "dataset" in job.wildcards.keys()}
    message = missing_data_message(needed)
    if message:
        raise WorkflowError(message)


def write_report(path) -> None:
    """``snakemake --report`` for the targets and config of the run that just succeeded.

    A second Snakemake process, because the report is assembled from finished
    outputs and their recorded provenance, which exist only once this run is
    over. A failed report only warns: the results themselves are complete.
    """
    if not path:
        return
    import subprocess

    settings = workflow.config_settings
    command = [sys.executable, "-m", "snakemake", "--report", str(path), "--snakefile", str(workflow.main_snakefile),
               "--directory", os.getcwd()]
    command += [arg for configfile in settings.configfiles for arg in ("--configfile", str(configfile))]
    if settings.config_args:
        command += ["--config", *settings.config_args]
    command += sorted(workflow.dag_settings.targets)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        logger.warning(f"the report could not be written ({' '.join(command)}):\n{result.stderr[-2000:]}")
    else:
        logger.info(f"report written to {path}")
