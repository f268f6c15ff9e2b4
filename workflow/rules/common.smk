"""Config validation, input functions and wildcard constraints.

Rules stay small: everything they look up in the config comes from a function
here. Two kinds of settings reach a job, deliberately kept apart:

- what determines a result (dataset, backbone, method, options, budget, seed,
  recipe) travels in ``params``, so changing it re-runs exactly the jobs whose
  results it changes (Snakemake's params trigger);
- where things go or run (tracking store, threads, the ImageNet folder) travels
  in ``resources`` and the environment, so moving the store or giving a job
  more cores never re-trains anything.
"""

import itertools
import json
import os
import re
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

SCHEMA_FILE = Path(workflow.basedir) / "schemas" / "config.schema.yaml"
# A setting of a recipe sweep, as its folder is named: lr0.02-lam0.2.
RECIPE_PATTERN = r"lr[A-Za-z0-9_.+-]+"
# The one software environment every job runs in (--software-deployment-method conda).
ENV_FILE = "../envs/manidp.yaml"
# What that environment's pip installs: this clone, editable, unless set already
# (a workflow used as a module from GitHub sets e.g. git+https://...@v0.1.0).
os.environ.setdefault("MANIDP_PACKAGE", f"-e {Path(workflow.basedir).parent}")


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
    """Check ``cfg`` against the schema, then the plan it describes, then every name against the registries."""
    import jsonschema

    schema = yaml.safe_load(SCHEMA_FILE.read_text())
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(cfg))
    if errors:
        raise WorkflowError(_schema_message(jsonschema.exceptions.best_match(errors)))
    for ds, section in cfg["datasets"].items():
        _check_training_budget(ds, section)
        _check_ablations(ds, section)
        _check_tuning(ds, section)
        _check_on_request(ds, section)
    _check_names(cfg)


# Keys that set how many optimizer steps a fine-tune takes: the dataset's one budget.
BUDGET_KEYS = ("epochs", "batch_size")


def _check_training_budget(ds: str, section: dict) -> None:
    """Every method fine-tunes the same number of steps: only ``finetune.train`` sets epochs and batch size."""
    entries = [("methods", section["methods"]), ("ablations.methods", section.get("ablations", {}).get("methods", {}))]
    for where, mapping in entries:
        for entry, settings in mapping.items():
            for key in BUDGET_KEYS:
                if key in settings.get("train", {}):
                    raise WorkflowError(
                        f"config key 'datasets.{ds}.{where}.{entry}.train.{key}': every method fine-tunes the "
                        f"same number of steps from the same dense checkpoint, so {key} is set once per dataset, "
                        f"in 'datasets.{ds}.finetune.train.{key}'; a method entry may set lr, the schedule and "
                        "its options"
                    )


def _check_ablations(ds: str, section: dict) -> None:
    ablations = section.get("ablations")
    if not ablations:
        return
    if ablations["reference"] not in section["methods"]:
        raise WorkflowError(
            f"config key 'datasets.{ds}.ablations.reference' names '{ablations['reference']}', which is not "
            f"an entry of 'datasets.{ds}.methods'; valid values: {', '.join(section['methods'])}"
        )
    shared = sorted(set(ablations["methods"]) & set(section["methods"]))
    if shared:
        raise WorkflowError(
            f"config key 'datasets.{ds}.ablations.methods.{shared[0]}' repeats an entry of "
            f"'datasets.{ds}.methods': entry names name run folders, so each may appear once"
        )


def _check_tuning(ds: str, section: dict) -> None:
    """The sweep is the same size for every method (the lr grid x one knob grid of equal size)."""
    tuning = section.get("tuning")
    if not tuning:
        return
    sizes = {}
    entries = [*section["methods"], *section.get("ablations", {}).get("methods", {})]
    for entry, grid in tuning["methods"].items():
        if entry not in entries:
            raise WorkflowError(
                f"config key 'datasets.{ds}.tuning.methods.{entry}': not an entry of 'datasets.{ds}.methods' "
                f"or 'datasets.{ds}.ablations.methods'; valid values: {', '.join(entries)}"
            )
        sizes[entry] = len(list(itertools.product(*grid.values())))
        for name in tuning_recipes(ds, entry, section):
            if not re.fullmatch(RECIPE_PATTERN, name):
                raise WorkflowError(
                    f"config section 'datasets.{ds}.tuning.methods.{entry}': the setting '{name}' cannot name a "
                    "folder; knob values may hold letters, digits and . _ + - only"
                )
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{entry}: {size}" for entry, size in sizes.items())
        raise WorkflowError(
            f"config section 'datasets.{ds}.tuning.methods': every method gets the same-size sweep, but the "
            f"knob grids hold different numbers of settings ({listed}); give each the same number of values"
        )


def _check_on_request(ds: str, section: dict) -> None:
    """The augmentation check reuses the default run at its budget; the curve runs entries of ``methods``."""
    aug = section.get("augmentation")
    if aug and not any(aug["budget"] in budgets(ds, b, {"datasets": {ds: section}}) for b in section["backbones"]):
        raise WorkflowError(
            f"config key 'datasets.{ds}.augmentation.budget' is {aug['budget']}: its runs without augmentation "
            f"are the default run's, so it must be one of the budgets ({', '.join(map(str, section.get('budgets', [])))})"
        )
    for entry in section.get("training_budget", {}).get("methods", []):
        if entry not in section["methods"]:
            raise WorkflowError(
                f"config key 'datasets.{ds}.training_budget.methods' names '{entry}', which is not an entry of "
                f"'datasets.{ds}.methods'; valid values: {', '.join(section['methods'])}"
            )


def _check_names(cfg: dict) -> None:
    """Names must exist in the package's registries, as they are at run time."""
    import timm

    from manidp.data import DATASETS
    from manidp.methods import METHODS, load_all
    from manidp.models import BENCHMARK_BACKBONES

    load_all()
    for name in cfg["default_datasets"]:
        if name not in cfg["datasets"]:
            raise WorkflowError(
                f"config key 'default_datasets' names '{name}', which has no section; "
                f"valid values: {', '.join(cfg['datasets'])}"
            )
    for ds, section in cfg["datasets"].items():
        if ds not in DATASETS:
            raise WorkflowError(
                f"config key 'datasets.{ds}': unknown dataset '{ds}'; valid datasets: {', '.join(DATASETS.names())}"
            )
        for backbone in section["backbones"]:
            if not timm.is_model(backbone):
                raise WorkflowError(
                    f"config key 'datasets.{ds}.backbones.{backbone}': unknown backbone; "
                    f"valid backbones: {', '.join(BENCHMARK_BACKBONES)} (or any timm model name)"
                )
            if not budgets(ds, backbone, cfg):
                raise WorkflowError(
                    f"config key 'datasets.{ds}.backbones.{backbone}.budgets' is missing and "
                    f"'datasets.{ds}.budgets' is not set: give the MACs reductions to run"
                )
        entries = [("methods", section["methods"])]
        entries += [("ablations.methods", section.get("ablations", {}).get("methods", {}))]
        for where, mapping in entries:
            for entry, settings in mapping.items():
                method = settings.get("method", entry)
                key = f"datasets.{ds}.{where}.{entry}" + (".method" if "method" in settings else "")
                if method == "dense":
                    raise WorkflowError(
                        f"config key '{key}': 'dense' is the baseline every dataset trains "
                        "(configured under 'dense'), not a method to list"
                    )
                if method not in METHODS:
                    valid = [name for name in METHODS.names() if name != "dense"]
                    raise WorkflowError(
                        f"config key '{key}': unknown method '{method}'; valid methods: {', '.join(valid)}"
                    )
        for profile in section.get("hardware_profiles", []):
            if profile not in cfg["hardware_profiles"]:
                raise WorkflowError(
                    f"config key 'datasets.{ds}.hardware_profiles' names '{profile}'; "
                    f"valid profiles: {', '.join(cfg['hardware_profiles'])}"
                )


# ----------------------------------------------------------------- where things go
TRACKING = config.get("tracking", {}).get("enabled", True)
# Jobs call the package's console scripts (manidp, torchrun): without a conda
# environment per job, find them beside the Python that runs Snakemake, even
# when its environment is not activated.
SEARCH_PATH = os.environ["PATH"]
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), SEARCH_PATH])
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
# Datasets torchvision downloads: rule check_data fetches them once (datasets.NAME.data.download)
# or checks them, and their jobs only read the files.
FETCHED_DATA = ("cifar10", "cifar100")


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
        return {"fetch": True, "data": dataset_cfg(ds).get("data", {}), "keys": f"datasets.{ds}.data."}
    key, env = EXTERNAL_DATA[ds]
    return {"fetch": False, "folder": os.environ.get(env, ""), "key": key, "env": env}


# ----------------------------------------------------------------- the plan
def dataset_cfg(ds: str) -> dict:
    return config["datasets"][ds]


def budgets(ds: str, backbone: str, cfg: dict = config) -> list:
    section = cfg["datasets"][ds]
    return section["backbones"][backbone].get("budgets") or section.get("budgets") or []


def label(value) -> str:
    """How a value appears in folder names: numbers as the package names budgets (0.4, 0.55, 5e-05)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(label(v) for v in value) or "none"
    return str(value)


def profiles(ds: str) -> list[str]:
    return dataset_cfg(ds).get("hardware_profiles", [])


def run_dir(ds, backbone, method, budget, seed) -> str:
    """runs/{dataset}/{backbone}/{method}[-b{budget}]/seed{seed}: the package's default layout."""
    name = method if budget is None else f"{method}-b{budget}"
    return f"runs/{ds}/{backbone}/{name}/seed{seed}"


def dense_dirs(ds: str, seeds=None) -> list[str]:
    section = dataset_cfg(ds)
    return [run_dir(ds, b, "dense", None, s) for b in section["backbones"] for s in seeds or section["seeds"]]


def method_dirs(ds: str, entries=None) -> list[str]:
    """The runs of ``entries`` (default: the dataset's methods) at every budget and seed."""
    section = dataset_cfg(ds)
    entries = section["methods"] if entries is None else entries
    return [
        run_dir(ds, b, m, label(x), s)
        for b in section["backbones"]
        for m in entries
        for x in budgets(ds, b)
        for s in section["seeds"]
    ]


def ablation_entries(ds: str) -> list[str]:
    ablations = dataset_cfg(ds).get("ablations")
    return [ablations["reference"], *ablations["methods"]] if ablations else []


def ablation_dirs(wildcards) -> list[str]:
    """Dense, the reference method and its ablations: the rows of the ablation table."""
    return dense_dirs(wildcards.dataset) + method_dirs(wildcards.dataset, ablation_entries(wildcards.dataset))


def main_dirs(wildcards) -> list[str]:
    """Dense and every method: the rows of the main table."""
    return all_run_dirs(wildcards.dataset)


def all_run_dirs(ds: str) -> list[str]:
    return dense_dirs(ds) + method_dirs(ds)


def run_files(dense: list[str], methods: list[str], profiles_: list[str] = ()) -> dict:
    """Every file a table or plot is built from: metrics and per-instance records, latency of method runs."""
    runs = dense + methods
    return {
        "metrics": [f"{d}/metrics.json" for d in runs],
        "instances": [f"{d}/instances_test.csv" for d in runs],
        "latency": [f"{d}/latency_{p}.json" for d in methods for p in profiles_],
    }


def report_inputs(wildcards) -> dict:
    """The files of the dataset's main table, plots and MLflow summary."""
    ds = wildcards.dataset
    return run_files(dense_dirs(ds), method_dirs(ds), profiles(ds))


def ablation_inputs(wildcards) -> dict:
    """The ablation table's files (no latency: it compares accuracy and MACs)."""
    ds = wildcards.dataset
    if not dataset_cfg(ds).get("ablations"):
        raise WorkflowError(f"config section 'datasets.{ds}.ablations' is not set: no ablations to run")
    return run_files(dense_dirs(ds), method_dirs(ds, ablation_entries(ds)))


def dataset_targets(wildcards) -> list[str]:
    """Everything one dataset's results consist of: tables, plots, MLflow summary, and every trained model."""
    ds = wildcards.dataset
    targets = [f"results/{ds}_table.{ext}" for ext in ("csv", "md", "tex")] + [f"results/{ds}_per_seed.csv"]
    targets += [f"results/{ds}_{plot}.png" for plot in ("pareto", "macs_vs_difficulty", "speedup")]
    targets += [f"{run}/model.pt" for run in all_run_dirs(ds)]
    return targets + [f"results/tracking/{ds}/summary_run.txt"]


def default_targets() -> list[str]:
    """The default targets: each default dataset's target and, listed again as targets, its models.

    A model only an up-to-date file consumes is an intermediate Snakemake need
    not rebuild once deleted; as a target it is retrained, with everything
    built on it.
    """
    targets = []
    for ds in config["default_datasets"]:
        targets += [f"results/{ds}_all.txt"] + [f"{run}/model.pt" for run in all_run_dirs(ds)]
    return targets


# ----------------------------------------------------------------- the recipe sweep
def tuning_recipes(ds: str, entry: str, section: dict | None = None) -> dict[str, tuple[float, dict]]:
    """Folder label -> (lr, knob options) for every setting of one method's sweep, e.g. 'lr0.02-lam0.2'."""
    tuning = (section or dataset_cfg(ds))["tuning"]
    grid = tuning["methods"][entry]
    recipes = {}
    for lr in tuning["lr"]:
        for values in itertools.product(*grid.values()):
            knobs = dict(zip(grid, values))
            name = "-".join([f"lr{label(lr)}", *(f"{k}{label(v)}" for k, v in knobs.items())])
            recipes[name] = (lr, knobs)
    return recipes


def tuning_dirs(wildcards) -> list[str]:
    """runs/tuning/{dataset}/{backbone}/{method}-b{budget}/{recipe}/seed{seed}, for every method, recipe and seed."""
    ds = wildcards.dataset
    tuning = dataset_cfg(ds).get("tuning")
    if not tuning:
        raise WorkflowError(f"config section 'datasets.{ds}.tuning' is not set: no recipe sweep to run")
    return [
        f"runs/tuning/{ds}/{b}/{entry}-b{label(tuning['budget'])}/{recipe}/seed{s}"
        for b in dataset_cfg(ds)["backbones"]
        for entry in tuning["methods"]
        for recipe in tuning_recipes(ds, entry)
        for s in tuning["seeds"]
    ]


def tuning_metrics(wildcards) -> list[str]:
    return [f"{d}/metrics.json" for d in tuning_dirs(wildcards)]


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


def _common_sets(ds: str, data_extra: dict | None = None) -> list[str]:
    section = dataset_cfg(ds)
    data = {**section.get("data", {}), **(data_extra or {})}
    if ds in FETCHED_DATA:
        # Rule check_data downloaded the files once: jobs only read them (parallel
        # downloads into one folder would race; with data_check: job they must be there).
        data = {**data, "download": False}
    return _set_args("data", data) + _set_args("runtime", section.get("runtime", {}))


def _dense_args(ds: str, data_extra: dict | None = None) -> list[str]:
    dense = dataset_cfg(ds).get("dense", {})
    args = _set_args("train", dense.get("train", {})) + _common_sets(ds, data_extra)
    if dense.get("pretrained"):
        args += _set_args("", {"pretrained": dense["pretrained"]})
    return args


def dense_args(wildcards) -> str:
    """The dense run's recipe and pretrained source, as ``manidp train`` flags."""
    return " ".join(_dense_args(wildcards.dataset))


def method_entry(ds: str, entry: str) -> dict:
    section = dataset_cfg(ds)
    return {**section.get("ablations", {}).get("methods", {}), **section["methods"]}[entry]


def _method_args(ds: str, entry: str, lr=None, knobs=None, epochs=None, data_extra=None) -> list[str]:
    """Registered method, its options and the dataset's fine-tuning recipe (lr and knobs may be swept;
    the training-budget curve sets the epochs, the augmentation check adds data keys)."""
    section, settings = dataset_cfg(ds), method_entry(ds, entry)
    recipe = {**section.get("finetune", {}).get("train", {}), **settings.get("train", {})}
    if lr is not None:
        recipe["lr"] = lr
    if epochs is not None:
        recipe["epochs"] = epochs
    args = ["--method", settings.get("method", entry)]
    args += _set_args("", {"method_options": {**settings.get("options", {}), **(knobs or {})}})
    return args + _set_args("train", recipe) + _common_sets(ds, data_extra)


def method_args(wildcards) -> str:
    """One method entry's run, as ``manidp train`` flags."""
    return " ".join(_method_args(wildcards.dataset, wildcards.method))


def tuning_args(wildcards) -> str:
    """One setting of the sweep, as ``manidp train`` flags: validation split only, never the test split."""
    recipes = tuning_recipes(wildcards.dataset, wildcards.method)
    if wildcards.recipe not in recipes:
        raise WorkflowError(
            f"'{wildcards.recipe}' is not a setting of the {wildcards.method} sweep; "
            f"valid settings: {', '.join(recipes)}"
        )
    lr, knobs = recipes[wildcards.recipe]
    args = _method_args(wildcards.dataset, wildcards.method, lr, knobs)
    return " ".join(args + _set_args("", {"eval_splits": ["val"]}))


# ----------------------------------------------------------------- augmentation as a knob
# The augmentation check trains its own dense models and method runs with the
# training-time augmentation on, under runs/augment/; "off" is the default run's
# runs at the same budget. Every figure it reports is a validation figure.
VALIDATION_ONLY = {"eval_splits": ["val"]}


def _section(ds: str, key: str) -> dict:
    section = dataset_cfg(ds).get(key)
    if not section:
        raise WorkflowError(f"config section 'datasets.{ds}.{key}' is not set: nothing to run")
    return section


def augment_dirs(wildcards) -> list[str]:
    """Dense and every method, with the augmentation (runs/augment/...) and without (the default run's folders)."""
    ds = wildcards.dataset
    aug = _section(ds, "augmentation")
    budget = label(aug["budget"])
    dirs = []
    for b in dataset_cfg(ds)["backbones"]:
        for s in aug["seeds"]:
            dirs += [f"runs/augment/{ds}/{b}/dense/seed{s}", run_dir(ds, b, "dense", None, s)]
            for m in dataset_cfg(ds)["methods"]:
                dirs += [f"runs/augment/{ds}/{b}/{m}-b{budget}/seed{s}", run_dir(ds, b, m, budget, s)]
    return dirs


def augment_metrics(wildcards) -> list[str]:
    return [f"{d}/metrics.json" for d in augment_dirs(wildcards)]


def augment_dense_args(wildcards) -> str:
    """The dense recipe with the augmentation on, validation only."""
    aug = dataset_cfg(wildcards.dataset)["augmentation"]
    return " ".join(_dense_args(wildcards.dataset, aug["data"]) + _set_args("", VALIDATION_ONLY))


def augment_method_args(wildcards) -> str:
    """One method at its recipe with the augmentation on, validation only."""
    aug = dataset_cfg(wildcards.dataset)["augmentation"]
    args = _method_args(wildcards.dataset, wildcards.method, data_extra=aug["data"])
    return " ".join(args + _set_args("", VALIDATION_ONLY))


# ----------------------------------------------------------------- the training-budget curve
def budget_curve_dirs(wildcards) -> list[str]:
    """Every (method, epochs, seed) of the curve: the default run's folder where the epochs are the dataset's
    training budget, runs/budget/{dataset}/{backbone}/{method}-b{budget}/e{epochs}/seed{seed} elsewhere."""
    ds = wildcards.dataset
    curve = _section(ds, "training_budget")
    budget = label(curve["budget"])
    default_epochs = dataset_cfg(ds).get("finetune", {}).get("train", {}).get("epochs")
    return [
        (run_dir(ds, b, m, budget, s) if e == default_epochs else f"runs/budget/{ds}/{b}/{m}-b{budget}/e{e}/seed{s}")
        for b in dataset_cfg(ds)["backbones"]
        for m in curve["methods"]
        for e in curve["epochs"]
        for s in curve["seeds"]
    ]


def budget_curve_metrics(wildcards) -> list[str]:
    return [f"{d}/metrics.json" for d in budget_curve_dirs(wildcards)]


def budget_curve_args(wildcards) -> str:
    """One method at its recipe with another number of fine-tuning epochs (both splits: a results figure)."""
    return " ".join(_method_args(wildcards.dataset, wildcards.method, epochs=int(wildcards.epochs)))


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
def latency_groups() -> list[tuple[str, str]]:
    """(dataset, backbone) pairs that get a latency rule: every backbone of every dataset with methods."""
    return [
        (ds, b) for ds, section in config["datasets"].items() if section.get("methods") for b in section["backbones"]
    ]


def latency_rule_name(ds: str, backbone: str) -> str:
    return re.sub(r"\W", "_", f"latency_{ds}_{backbone}")


def _seed_runs(ds: str, backbone: str) -> list[str]:
    """The method runs of one seed, the main table's (never ablations), as patterns: the dataset,
    backbone and seed are wildcards (the rule pins the first two), so every input function of a
    job sees them as it would in any other rule."""
    return [
        run_dir("{dataset}", "{backbone}", m, label(x), "{seed}")
        for m in dataset_cfg(ds)["methods"]
        for x in budgets(ds, backbone)
    ]


def latency_constraints(ds: str, backbone: str) -> dict[str, str]:
    """Wildcard constraints that pin one latency rule to its (dataset, backbone)."""
    return {"dataset": re.escape(ds), "backbone": re.escape(backbone)}


def latency_models(ds: str, backbone: str) -> list[str]:
    return [f"{d}/model.pt" for d in _seed_runs(ds, backbone)]


def latency_outputs(ds: str, backbone: str) -> list[str]:
    return [f"{d}/latency_{{profile}}.json" for d in _seed_runs(ds, backbone)]


# ----------------------------------------------------------------- resources
def resources_of(ds: str, kind: str) -> dict:
    """Resources for one kind of job: the top-level ones, then the dataset's, key by key.

    Keys ``dense`` leaves unset fall back to ``train``: a dense model trained
    from scratch needs what a fine-tune needs. A dense model that is only
    imported and evaluated (``dense.train.epochs: 0``, e.g. ImageNet hub
    weights) takes ``evaluate`` over those: it asks for far less.
    """
    top, own = config["resources"], dataset_cfg(ds).get("resources", {})
    kinds = [kind]
    if kind == "dense":
        kinds = ["train", "dense"] + (["evaluate"] if evaluate_only(ds) else [])
    merged = {}
    for name in kinds:
        merged.update(top.get(name, {}))
        merged.update(own.get(name, {}))
    return merged


def evaluate_only(ds: str) -> bool:
    return dataset_cfg(ds).get("dense", {}).get("train", {}).get("epochs") == 0


def resource(kind: str, key: str, default):
    """The value configured for a job's dataset and kind, else ``default``; for a rule's resources."""

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


def profile_device(wildcards) -> str:
    """'present' or 'absent': whether the profile's device can be measured (a param: see
    manidp.latency.device_state). An "unavailable" result is not final: when the device appears the
    value changes and Snakemake re-runs the job. Jobs that run elsewhere (a cluster executor) get the
    GPU they request. A function of the wildcards only: Snakemake records (and compares) only those."""
    from manidp.latency import device_state

    if not workflow.local_exec:
        return "present"
    device = profile_of(wildcards)["device"]
    outputs = [p.format(**dict(wildcards.items())) for p in latency_outputs(wildcards.dataset, wildcards.backbone)]
    return "present" if all(device_state(device, out) == "present" for out in outputs) else "absent"


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


# ----------------------------------------------------------------- tracking
# Resources, not params: switching tracking off changes where runs are
# recorded, never a result, so it must not re-run anything.
# An MLflow run id as every store writes it (uuid4().hex).
RUN_ID_PATTERN = r"[0-9a-f]{32}"


def tracking_train_flag(wildcards, input) -> str:
    """``manidp train`` flags: the parent run to log under, or no MLflow run when tracking is off.

    The parent's id is read here and must be an MLflow run id, never pasted into
    the shell command: whatever a tampered marker file holds cannot become an
    argument. An empty marker (written while tracking was off) means no parent.
    Until the marker exists (a dry run) Snakemake shows the value as <TBD>.
    """
    if not TRACKING:
        return "--set tracking.enabled=false"
    run_id = Path(input.parent).read_text().strip()
    if not run_id:
        return ""
    if not re.fullmatch(RUN_ID_PATTERN, run_id):
        raise WorkflowError(
            f"{input.parent} should hold the MLflow run id of the parent run (32 hex digits) but holds "
            f"{run_id[:60]!r}; delete the file and Snakemake re-creates it from the tracking store"
        )
    return f"--set tracking.parent_run_id={run_id}"


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


from manidp.config import yaml12_numbers  # 1e-3 is a float, as YAML 1.2 and the package read it

validate_config(yaml12_numbers(config))


wildcard_constraints:
    dataset=r"[A-Za-z0-9_.-]+",
    backbone=r"[A-Za-z0-9_.]+",
    method=r"[A-Za-z0-9_]+",
    budget=r"0\.[0-9]+",
    recipe=RECIPE_PATTERN,
    seed=r"[0-9]+",
    epochs=r"[0-9]+",
    profile=r"[A-Za-z0-9_-]+",
