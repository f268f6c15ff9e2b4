"""Config validation, input functions and wildcard constraints: a thin layer over manidp.plan, which holds the
plan as functions of the config alone. Two kinds of settings reach a job, deliberately kept apart:

- what determines a result (dataset, backbone, method, options, budget, seed,
  recipe) travels in ``params``, so changing it re-runs exactly the jobs whose
  results it changes (Snakemake's params trigger);
- where things go or run (tracking store, threads, the ImageNet folder) travels
  in ``resources`` and the environment, so moving the store or giving a job
  more cores never re-trains anything.
"""

import functools
import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from manidp.errors import UserError
from manidp.plan import FETCHED_DATA, RECIPE_PATTERN, Plan, check_config, profile_defaults, profile_flags, run_files

SCHEMA_FILE = Path(workflow.basedir) / "schemas" / "config.schema.yaml"
# The one software environment every job runs in (--software-deployment-method conda).
ENV_FILE = "../envs/manidp.yaml"
# What that environment's pip installs: this clone, editable, unless set already
# (a workflow used as a module from GitHub sets e.g. git+https://...@v0.1.0).
os.environ.setdefault("MANIDP_PACKAGE", f"-e {Path(workflow.basedir).parent}")


# ----------------------------------------------------------------- validation
# check_config's messages name the key and what is valid there, so it runs first; validate() then finds
# the config valid and fills the schema's defaults (a hardware profile's optional keys).
try:
    check_config(config, SCHEMA_FILE)
except UserError as error:
    raise WorkflowError(str(error)) from None
validate(config, SCHEMA_FILE)
PLAN = Plan(config)


def user_errors(function):
    """A config mistake met while planning a job (an on-request section not set): the message alone."""

    @functools.wraps(function)
    def wrapped(wildcards):
        try:
            return function(wildcards)
        except UserError as error:
            raise WorkflowError(str(error)) from None

    return wrapped


def of_dataset(plan_function):
    """An input function: ``plan_function`` of the job's dataset."""
    return user_errors(lambda wildcards: plan_function(wildcards.dataset))


# ----------------------------------------------------------------- where things go
TRACKING = config.get("tracking", {}).get("enabled", True)
# Each tracked training job logs its model to MLflow unless this is off (a large ImageNet model, or a
# quick run that needs no Models tab: torch.export and MLflow's checks cost every job seconds).
LOG_MODEL = config.get("tracking", {}).get("log_model", True)
# Jobs call the package's console scripts (manidp, torchrun): without a conda
# environment per job, find them beside the Python that runs Snakemake, even
# when its environment is not activated.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
if config.get("tracking", {}).get("uri"):
    # The package lets MLFLOW_TRACKING_URI win over its config key, as MLflow does.
    os.environ.setdefault("MLFLOW_TRACKING_URI", config["tracking"]["uri"])

# Datasets read from a folder the user provides: the config key naming it and the variable jobs read it
# from (never params, so moving the data re-runs nothing). Rule check_data downloads the FETCHED_DATA
# ones once, or checks them, and their jobs only read the files.
EXTERNAL_DATA = {
    "imagenet": ("imagenet_path", "MANIDP_IMAGENET"),
    "imagefolder": ("image_folder", "MANIDP_IMAGE_FOLDER"),
}
os.environ.update({env: str(config[key]) for key, env in EXTERNAL_DATA.values() if config.get(key)})


def data_checked(wildcards) -> list:
    """The data check a dataset's first jobs wait for (none for embedded data, or when jobs check it themselves).

    ``ancient``: re-checking the data never re-runs a finished job.
    """
    if wildcards.dataset not in [*EXTERNAL_DATA, *FETCHED_DATA] or config.get("data_check", "local") == "job":
        return []
    return [ancient(f"results/data/{wildcards.dataset}.checked")]


def data_folder(wildcards) -> dict:
    """Where a dataset's files should be, and how the user names that place (and whether to download)."""
    ds = wildcards.dataset
    if ds in FETCHED_DATA:
        return {"fetch": True, "data": PLAN.section(ds).get("data", {}), "keys": f"datasets.{ds}.data."}
    key, env = EXTERNAL_DATA[ds]
    return {"fetch": False, "folder": os.environ.get(env, ""), "key": key, "env": env}


# ----------------------------------------------------------------- the plan
dataset_targets = of_dataset(PLAN.dataset_targets)
main_dirs = of_dataset(PLAN.all_run_dirs)  # dense and every method: the rows of the main table
ablation_dirs = of_dataset(PLAN.ablation_dirs)
tuning_dirs = of_dataset(PLAN.tuning_dirs)
augment_dirs = of_dataset(PLAN.augment_dirs)
budget_curve_dirs = of_dataset(PLAN.budget_curve_dirs)


def report_inputs(wildcards) -> dict:
    """The files of the dataset's main table, plots and MLflow summary."""
    ds = wildcards.dataset
    return run_files(PLAN.dense_dirs(ds), PLAN.method_dirs(ds), PLAN.profiles(ds))


def ablation_inputs(wildcards) -> dict:
    """The ablation table's files (no latency: it compares accuracy and MACs)."""
    return run_files(ablation_dirs(wildcards), [])


def metrics_of(run_dirs):
    """An input function: the metrics.json of every run folder ``run_dirs`` lists."""
    return lambda wildcards: [f"{d}/metrics.json" for d in run_dirs(wildcards)]


# ----------------------------------------------------------------- training arguments (manidp train flags)
dense_args = of_dataset(lambda ds: " ".join(PLAN.dense_args(ds)))
augment_dense_args = of_dataset(lambda ds: " ".join(PLAN.augment_dense_args(ds)))


def method_args(wildcards) -> str:
    return " ".join(PLAN.method_args(wildcards.dataset, wildcards.method))


@user_errors
def tuning_args(wildcards) -> str:
    return " ".join(PLAN.tuning_args(wildcards.dataset, wildcards.method, wildcards.recipe))


def augment_method_args(wildcards) -> str:
    return " ".join(PLAN.augment_method_args(wildcards.dataset, wildcards.method))


def budget_curve_args(wildcards) -> str:
    """Another number of fine-tuning epochs (both splits: a results figure)."""
    return " ".join(PLAN.method_args(wildcards.dataset, wildcards.method, epochs=int(wildcards.epochs)))


# ----------------------------------------------------------------- run folders
def run_folder(wildcards, output) -> str:
    """The folder a training job writes: where its metrics.json goes."""
    return str(Path(output.metrics).parent)


def dense_folder(wildcards, input) -> str:
    """The dense run a job starts from or is timed against."""
    return str(Path(input.dense_model).parent)


def measured_folders(wildcards, input) -> str:
    """The runs a latency job times."""
    return " ".join(str(Path(model).parent) for model in input.models)


# ----------------------------------------------------------------- latency jobs
def latency_rule_name(ds: str, backbone: str) -> str:
    return re.sub(r"\W", "_", f"latency_{ds}_{backbone}")


def latency_constraints(ds: str, backbone: str) -> dict[str, str]:
    """Wildcard constraints that pin one latency rule to its (dataset, backbone)."""
    return {"dataset": re.escape(ds), "backbone": re.escape(backbone)}


def latency_models(ds: str, backbone: str) -> list[str]:
    return [f"{d}/model.pt" for d in PLAN.seed_runs(ds, backbone)]


def latency_outputs(ds: str, backbone: str) -> list[str]:
    return [f"{d}/latency_{{profile}}.json" for d in PLAN.seed_runs(ds, backbone)]


# The keys of a hardware profile the schema fills in, which lead its flags.
PROFILE_DEFAULTED = list(profile_defaults(SCHEMA_FILE))


def profile_of(wildcards) -> dict:
    return config["hardware_profiles"][wildcards.profile]


def latency_args(wildcards) -> str:
    """The hardware profile as ``manidp latency`` flags (its threads exactly, whatever the job's cores)."""
    return profile_flags(profile_of(wildcards), PROFILE_DEFAULTED)


def latency_gpus(wildcards) -> int:
    """A cuda profile asks the scheduler for one GPU (Slurm: --gpus 1)."""
    return int(profile_of(wildcards)["device"] == "cuda")


def profile_device(wildcards) -> str:
    """'present' or 'absent': whether the profile's device can be measured (a param: see
    manidp.latency.device_state). An "unavailable" result is not final: when the device appears the
    value changes and Snakemake re-runs the job. Jobs that run elsewhere (a cluster executor) get the
    GPU they request. A function of the wildcards only: Snakemake records (and compares) only those."""
    if not workflow.local_exec:
        return "present"
    device = profile_of(wildcards)["device"]
    if device == "cpu":  # always measurable; answering so spares every snakemake call a torch import
        return "present"
    from manidp.latency import device_state

    outputs = [p.format(**dict(wildcards.items())) for p in latency_outputs(wildcards.dataset, wildcards.backbone)]
    return "present" if all(device_state(device, out) == "present" for out in outputs) else "absent"


# ----------------------------------------------------------------- resources
def resource(kind: str, key: str, default):
    """The value configured for a job's dataset and kind, else ``default``; for a rule's resources."""

    def lookup(wildcards):
        value = PLAN.resources_of(wildcards.dataset, kind).get(key)
        return default if value is None else value

    return lookup


def train_launcher(kind: str):
    """``manidp`` alone, or under torchrun when the job has several GPUs (one process per GPU)."""

    def launcher(wildcards) -> str:
        gpus = PLAN.resources_of(wildcards.dataset, kind).get("gpus", 0)
        return f"torchrun --standalone --nproc-per-node {gpus} -m manidp" if gpus > 1 else "manidp"

    return launcher


def process_threads(kind: str):
    """Torch threads per training process: the job's cores shared among its processes."""

    def threads(wildcards, threads) -> int:
        return max(1, threads // max(1, PLAN.resources_of(wildcards.dataset, kind).get("gpus", 0)))

    return threads


# ----------------------------------------------------------------- tracking
# Resources, not params: switching tracking off changes where runs are
# recorded, never a result, so it must not re-run anything.
# An MLflow run id as every store writes it (uuid4().hex).
RUN_ID_PATTERN = r"[0-9a-f]{32}"


def tracking_train_flag(wildcards, input) -> str:
    """``manidp train`` flags: the parent run to log under (and whether to log the model), or no MLflow run
    when tracking is off.

    The parent's id is read here and must be an MLflow run id, never pasted into
    the shell command: whatever a tampered marker file holds cannot become an
    argument. An empty marker (written while tracking was off) means no parent.
    Until the marker exists (a dry run) Snakemake shows the value as <TBD>.
    """
    if not TRACKING:
        return "--set tracking.enabled=false"
    log_model = "" if LOG_MODEL else " --set tracking.log_model=false"
    run_id = Path(input.parent).read_text().strip()
    if not run_id:
        return log_model.strip()
    if not re.fullmatch(RUN_ID_PATTERN, run_id):
        raise WorkflowError(
            f"{input.parent} should hold the MLflow run id of the parent run (32 hex digits) but holds "
            f"{run_id[:60]!r}; delete the file and Snakemake re-creates it from the tracking store"
        )
    return f"--set tracking.parent_run_id={run_id}{log_model}"


def tracking_command_flag(wildcards) -> str:
    """``manidp tracking-*`` flag: write an empty run id and touch no store when tracking is off."""
    return "" if TRACKING else "--no-tracking"


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
    recipe=RECIPE_PATTERN,
    seed=r"[0-9]+",
    epochs=r"[0-9]+",
    profile=r"[A-Za-z0-9_-]+",
