"""The runs a workflow config asks for: checks, run folders, sweeps and ``manidp train`` arguments.

Functions of the workflow's config dict alone (``config/config.yaml``, its
schema in ``workflow/schemas/config.schema.yaml``), so the workflow's input
functions stay thin and the plan is tested without Snakemake. Mistakes raise
:class:`~manidp.errors.UserError` naming the config key and what is valid there.
"""
from __future__ import annotations

import itertools
import json
import re
import shlex
from pathlib import Path

import yaml

from manidp.config import schema_validator, yaml12_numbers
from manidp.errors import UserError
from manidp.runid import RunId, label

__all__ = ["RECIPE_PATTERN", "FETCHED_DATA", "check_config", "profile_defaults", "profile_flags", "label", "run_dir",
           "run_files", "Plan"]

# A setting of a recipe sweep, as its folder is named: lr0.02-lam0.2.
RECIPE_PATTERN = r"lr[A-Za-z0-9_.+-]+"
# Datasets torchvision downloads: the workflow fetches them once, and training jobs only read the files.
FETCHED_DATA = ("cifar10", "cifar100")
# Keys that set how many optimizer steps a fine-tune takes: the dataset's one budget.
BUDGET_KEYS = ("epochs", "batch_size")
# What every figure of the on-request checks reports on: the validation split, never the test split.
VALIDATION_ONLY = {"eval_splits": ["val"]}


# ----------------------------------------------------------------- validation
def check_config(cfg: dict, schema_file: Path) -> None:
    """Read ``cfg``'s numbers as YAML 1.2 does (in place), then check it against the schema, the plan it
    describes and the package's registries: what the workflow does before it plans anything."""
    import jsonschema

    yaml12_numbers(cfg)
    errors = list(schema_validator(schema_file).iter_errors(cfg))
    if errors:
        raise UserError(_schema_message(jsonschema.exceptions.best_match(errors)))
    for ds, section in cfg["datasets"].items():
        _check_training_budget(ds, section)
        _check_ablations(ds, section)
        _check_tuning(ds, section)
        _check_on_request(ds, section)
    _check_names(cfg)


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
    if "propertyNames" in error.relative_schema_path:
        why = error.schema.get("description", error.message)
        return f"config section '{where}' has an invalid name '{error.instance}': {why}"
    return f"config key '{where}': {error.message}"


def _entries(section: dict) -> list[tuple[str, dict]]:
    """Where a dataset lists method entries: its methods and its ablations."""
    return [("methods", section["methods"]), ("ablations.methods", section.get("ablations", {}).get("methods", {}))]


def _check_training_budget(ds: str, section: dict) -> None:
    """Every method fine-tunes the same number of steps: only ``finetune.train`` sets epochs and batch size."""
    for where, mapping in _entries(section):
        for entry, settings in mapping.items():
            for key in BUDGET_KEYS:
                if key in settings.get("train", {}):
                    raise UserError(
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
        raise UserError(
            f"config key 'datasets.{ds}.ablations.reference' names '{ablations['reference']}', which is not "
            f"an entry of 'datasets.{ds}.methods'; valid values: {', '.join(section['methods'])}"
        )
    shared = sorted(set(ablations["methods"]) & set(section["methods"]))
    if shared:
        raise UserError(
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
            raise UserError(
                f"config key 'datasets.{ds}.tuning.methods.{entry}': not an entry of 'datasets.{ds}.methods' "
                f"or 'datasets.{ds}.ablations.methods'; valid values: {', '.join(entries)}"
            )
        sizes[entry] = len(list(itertools.product(*grid.values())))
        for name in tuning_recipes(tuning, entry):
            if not re.fullmatch(RECIPE_PATTERN, name):
                raise UserError(
                    f"config section 'datasets.{ds}.tuning.methods.{entry}': the setting '{name}' cannot name a "
                    "folder; knob values may hold letters, digits and . _ + - only"
                )
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{entry}: {size}" for entry, size in sizes.items())
        raise UserError(
            f"config section 'datasets.{ds}.tuning.methods': every method gets the same-size sweep, but the "
            f"knob grids hold different numbers of settings ({listed}); give each the same number of values"
        )


def _check_on_request(ds: str, section: dict) -> None:
    """The augmentation check reuses the default run at its budget; the curve runs entries of ``methods``."""
    aug = section.get("augmentation")
    if aug and not any(aug["budget"] in budgets(section, b) for b in section["backbones"]):
        listed = ", ".join(map(str, section.get("budgets", [])))
        raise UserError(
            f"config key 'datasets.{ds}.augmentation.budget' is {aug['budget']}: its runs without augmentation "
            f"are the default run's, so it must be one of the budgets ({listed})"
        )
    for entry in section.get("training_budget", {}).get("methods", []):
        if entry not in section["methods"]:
            raise UserError(
                f"config key 'datasets.{ds}.training_budget.methods' names '{entry}', which is not an entry of "
                f"'datasets.{ds}.methods'; valid values: {', '.join(section['methods'])}"
            )


def _check_names(cfg: dict) -> None:
    """Names must exist as they will at run time: the built-in datasets, the methods the installed packages
    declare (the ``manidp.methods`` entry points, which every job loads), and timm's backbones.

    Read without importing torch or timm (this runs at every ``snakemake`` call); only a backbone outside
    the benchmark's own list makes it ask timm. A declared method whose module fails to import is reported
    by the job that loads it.
    """
    from importlib.metadata import entry_points

    from manidp._defaults import BENCHMARK_BACKBONES, DATASET_NAMES, METHODS_ENTRY_POINT_GROUP

    methods = sorted({point.name for point in entry_points(group=METHODS_ENTRY_POINT_GROUP)})
    for name in cfg["default_datasets"]:
        if name not in cfg["datasets"]:
            raise UserError(
                f"config key 'default_datasets' names '{name}', which has no section; "
                f"valid values: {', '.join(cfg['datasets'])}"
            )
    for ds, section in cfg["datasets"].items():
        if ds not in DATASET_NAMES:
            raise UserError(
                f"config key 'datasets.{ds}': unknown dataset '{ds}'; valid datasets: {', '.join(DATASET_NAMES)}"
            )
        for backbone in section["backbones"]:
            if backbone not in BENCHMARK_BACKBONES and not _timm_has(backbone):
                raise UserError(
                    f"config key 'datasets.{ds}.backbones.{backbone}': unknown backbone; "
                    f"valid backbones: {', '.join(BENCHMARK_BACKBONES)} (or any timm model name)"
                )
            if not budgets(section, backbone):
                raise UserError(
                    f"config key 'datasets.{ds}.backbones.{backbone}.budgets' is missing and "
                    f"'datasets.{ds}.budgets' is not set: give the MACs reductions to run"
                )
        for where, mapping in _entries(section):
            for entry, settings in mapping.items():
                method = settings.get("method", entry)
                key = f"datasets.{ds}.{where}.{entry}" + (".method" if "method" in settings else "")
                if method == "dense":
                    raise UserError(
                        f"config key '{key}': 'dense' is the baseline every dataset trains "
                        "(configured under 'dense'), not a method to list"
                    )
                if method not in methods:
                    valid = [name for name in methods if name != "dense"]
                    raise UserError(f"config key '{key}': unknown method '{method}'; valid methods: {', '.join(valid)}")
        for profile in section.get("hardware_profiles", []):
            if profile not in cfg["hardware_profiles"]:
                raise UserError(
                    f"config key 'datasets.{ds}.hardware_profiles' names '{profile}'; "
                    f"valid profiles: {', '.join(cfg['hardware_profiles'])}"
                )


def _timm_has(backbone: str) -> bool:
    import timm

    import manidp.models  # noqa: F401  (registers the CIFAR backbones into timm)

    return timm.is_model(backbone)


# ----------------------------------------------------------------- names and folders
def budgets(section: dict, backbone: str) -> list:
    """A backbone's MACs reductions: its own, else the dataset's."""
    return section["backbones"][backbone].get("budgets") or section.get("budgets") or []


def run_dir(ds, backbone, method, budget, seed, root: str = "runs", setting=None) -> str:
    """{root}/{dataset}/{backbone}/{method}[-b{budget}][/{setting}]/seed{seed}, where ``method`` is the config
    entry (:meth:`RunId.folder <manidp.runid.RunId.folder>`: the registered method an entry runs does not
    name its folder)."""
    return RunId(ds, backbone, entry=method, method=method, budget=budget, seed=seed).folder(root, setting)


def run_files(dense: list[str], methods: list[str], profiles: list[str] = ()) -> dict:
    """Every file a table or plot is built from: metrics and per-instance records, latency of method runs."""
    runs = dense + methods
    return {
        "metrics": [f"{d}/metrics.json" for d in runs],
        "instances": [f"{d}/instances_test.csv" for d in runs],
        "latency": [f"{d}/latency_{p}.json" for d in methods for p in profiles],
    }


def tuning_recipes(tuning: dict, entry: str) -> dict[str, tuple[float, dict]]:
    """Folder label -> (lr, knob options) for every setting of one method's sweep, e.g. 'lr0.02-lam0.2'."""
    grid = tuning["methods"][entry]
    recipes = {}
    for lr in tuning["lr"]:
        for values in itertools.product(*grid.values()):
            knobs = dict(zip(grid, values))
            name = "-".join([f"lr{label(lr)}", *(f"{k}{label(v)}" for k, v in knobs.items())])
            recipes[name] = (lr, knobs)
    return recipes


def set_args(prefix: str, tree: dict) -> list[str]:
    """``--set prefix.key=value`` for each leaf; values as JSON, which the package reads as YAML."""
    args = []
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value and name != "method_options":
            args += set_args(name, value)
        else:
            args += ["--set", shlex.quote(f"{name}={json.dumps(value)}")]
    return args


def profile_defaults(schema_file: Path) -> dict:
    """A hardware profile's optional keys and their values, as the schema sets them (``default:``)."""
    schema = yaml.safe_load(Path(schema_file).read_text())
    keys = schema["properties"]["hardware_profiles"]["additionalProperties"]["properties"]
    return {key: spec["default"] for key, spec in keys.items() if "default" in spec}


def profile_flags(profile: dict, defaulted: list[str]) -> str:
    """A hardware profile as ``manidp latency`` flags: the keys the schema defaults first, in its order."""
    keys = [*defaulted, *(key for key in profile if key not in defaulted)]
    return " ".join(_flag(key, profile[key]) for key in keys)


def _flag(key: str, value) -> str:
    option = key.replace("_", "-")
    if isinstance(value, bool):  # a switch: --inductor / --no-inductor
        return f"--{option}" if value else f"--no-{option}"
    return f"--{option} {value}"


# ----------------------------------------------------------------- one config's plan
class Plan:
    """The runs, folders and commands one (checked) workflow config asks for."""

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def section(self, ds: str, key: str | None = None) -> dict:
        """A dataset's section, or one of its on-request sections, which must be set to be asked for."""
        section = self.cfg["datasets"][ds]
        if key is None:
            return section
        if not section.get(key):
            raise UserError(f"config section 'datasets.{ds}.{key}' is not set: nothing to run")
        return section[key]

    def budgets(self, ds: str, backbone: str) -> list:
        return budgets(self.section(ds), backbone)

    def profiles(self, ds: str) -> list[str]:
        return self.section(ds).get("hardware_profiles", [])

    # ------------------------------------------------------------- run folders
    def dense_dirs(self, ds: str) -> list[str]:
        section = self.section(ds)
        return [run_dir(ds, b, "dense", None, s) for b in section["backbones"] for s in section["seeds"]]

    def method_dirs(self, ds: str, entries=None) -> list[str]:
        """The runs of ``entries`` (default: the dataset's methods) at every budget and seed."""
        section = self.section(ds)
        entries = section["methods"] if entries is None else entries
        return [
            run_dir(ds, b, m, label(x), s)
            for b in section["backbones"]
            for m in entries
            for x in self.budgets(ds, b)
            for s in section["seeds"]
        ]

    def all_run_dirs(self, ds: str) -> list[str]:
        """Dense and every method: the rows of the main table."""
        return self.dense_dirs(ds) + self.method_dirs(ds)

    def ablation_dirs(self, ds: str) -> list[str]:
        """Dense, the reference method and its ablations: the rows of the ablation table."""
        if not self.section(ds).get("ablations"):
            raise UserError(f"config section 'datasets.{ds}.ablations' is not set: no ablations to run")
        ablations = self.section(ds)["ablations"]
        return self.dense_dirs(ds) + self.method_dirs(ds, [ablations["reference"], *ablations["methods"]])

    def dataset_targets(self, ds: str) -> list[str]:
        """Everything one dataset's results consist of: tables, plots, MLflow summary, and every trained model."""
        targets = [f"results/{ds}_table.{ext}" for ext in ("csv", "md", "tex")] + [f"results/{ds}_per_seed.csv"]
        targets += [f"results/{ds}_{plot}.png" for plot in ("pareto", "macs_vs_difficulty", "speedup")]
        targets += [f"{run}/model.pt" for run in self.all_run_dirs(ds)]
        return targets + [f"results/tracking/{ds}/summary_run.txt"]

    def default_targets(self) -> list[str]:
        """Each default dataset's target and, listed again as targets, its models.

        A model only an up-to-date file consumes is an intermediate Snakemake need
        not rebuild once deleted; as a target it is retrained, with everything
        built on it.
        """
        targets = []
        for ds in self.cfg["default_datasets"]:
            targets += [f"results/{ds}_all.txt"] + [f"{run}/model.pt" for run in self.all_run_dirs(ds)]
        return targets

    def tuning_dirs(self, ds: str) -> list[str]:
        """runs/tuning/{dataset}/{backbone}/{method}-b{budget}/{recipe}/seed{seed}, every method, recipe and seed."""
        tuning = self.section(ds).get("tuning")
        if not tuning:
            raise UserError(f"config section 'datasets.{ds}.tuning' is not set: no recipe sweep to run")
        return [
            run_dir(ds, b, entry, label(tuning["budget"]), s, "runs/tuning", recipe)
            for b in self.section(ds)["backbones"]
            for entry in tuning["methods"]
            for recipe in tuning_recipes(tuning, entry)
            for s in tuning["seeds"]
        ]

    def augment_dirs(self, ds: str) -> list[str]:
        """Dense and every method, with the augmentation (runs/augment/...) and without (the default run's).

        "Off" is the default run's runs at the same budget: the check trains only its augmented runs.
        """
        aug = self.section(ds, "augmentation")
        budget = label(aug["budget"])
        dirs = []
        for b in self.section(ds)["backbones"]:
            for s in aug["seeds"]:
                dirs += [run_dir(ds, b, "dense", None, s, "runs/augment"), run_dir(ds, b, "dense", None, s)]
                for m in self.section(ds)["methods"]:
                    dirs += [run_dir(ds, b, m, budget, s, "runs/augment"), run_dir(ds, b, m, budget, s)]
        return dirs

    def budget_curve_dirs(self, ds: str) -> list[str]:
        """Every (method, epochs, seed) of the curve: the default run's folder where the epochs are the dataset's
        training budget, runs/budget/{dataset}/{backbone}/{method}-b{budget}/e{epochs}/seed{seed} elsewhere."""
        curve = self.section(ds, "training_budget")
        budget = label(curve["budget"])
        default_epochs = self.section(ds).get("finetune", {}).get("train", {}).get("epochs")
        return [
            run_dir(ds, b, m, budget, s) if e == default_epochs
            else run_dir(ds, b, m, budget, s, "runs/budget", f"e{e}")
            for b in self.section(ds)["backbones"]
            for m in curve["methods"]
            for e in curve["epochs"]
            for s in curve["seeds"]
        ]

    def seed_runs(self, ds: str, backbone: str) -> list[str]:
        """The method runs of one seed, the main table's (never ablations), as patterns: the dataset,
        backbone and seed are wildcards (a latency rule pins the first two), so every input function of a
        job sees them as it would in any other rule."""
        return [
            run_dir("{dataset}", "{backbone}", m, label(x), "{seed}")
            for m in self.section(ds)["methods"]
            for x in self.budgets(ds, backbone)
        ]

    def latency_groups(self) -> list[tuple[str, str]]:
        """(dataset, backbone) pairs that get a latency rule: every backbone of every dataset with methods."""
        datasets = self.cfg["datasets"].items()
        return [(ds, b) for ds, section in datasets if section.get("methods") for b in section["backbones"]]

    # ------------------------------------------------------------- manidp train arguments
    def _common_sets(self, ds: str, data_extra: dict | None = None) -> list[str]:
        section = self.section(ds)
        data = {**section.get("data", {}), **(data_extra or {})}
        if ds in FETCHED_DATA:
            # The workflow downloaded the files once: jobs only read them (parallel downloads
            # into one folder would race; when jobs check the data themselves they must be there).
            data = {**data, "download": False}
        return set_args("data", data) + set_args("runtime", section.get("runtime", {}))

    def dense_args(self, ds: str, data_extra: dict | None = None) -> list[str]:
        """The dense run's recipe and pretrained source."""
        dense = self.section(ds).get("dense", {})
        args = set_args("train", dense.get("train", {})) + self._common_sets(ds, data_extra)
        if dense.get("pretrained"):
            args += set_args("", {"pretrained": dense["pretrained"]})
        return args

    def method_args(self, ds: str, entry: str, lr=None, knobs=None, epochs=None, data_extra=None) -> list[str]:
        """Registered method, its options and the dataset's fine-tuning recipe (lr and knobs may be swept;
        the training-budget curve sets the epochs, the augmentation check adds data keys)."""
        section = self.section(ds)
        settings = {**section.get("ablations", {}).get("methods", {}), **section["methods"]}[entry]
        recipe = {**section.get("finetune", {}).get("train", {}), **settings.get("train", {})}
        if lr is not None:
            recipe["lr"] = lr
        if epochs is not None:
            recipe["epochs"] = epochs
        method = settings.get("method", entry)
        args = ["--method", method]
        if entry != method:
            # The entry names the result (its folder, its table row), so the run records it. An entry named
            # after its method needs no flag (the entry defaults to the method), so its job's params, which
            # Snakemake re-runs a job for, stay as they were.
            args += set_args("", {"entry": entry})
        args += set_args("", {"method_options": {**settings.get("options", {}), **(knobs or {})}})
        return args + set_args("train", recipe) + self._common_sets(ds, data_extra)

    def tuning_args(self, ds: str, entry: str, recipe: str) -> list[str]:
        """One setting of the sweep: validation split only, never the test split."""
        recipes = tuning_recipes(self.section(ds)["tuning"], entry)
        if recipe not in recipes:
            raise UserError(f"'{recipe}' is not a setting of the {entry} sweep; valid settings: {', '.join(recipes)}")
        lr, knobs = recipes[recipe]
        return self.method_args(ds, entry, lr, knobs) + set_args("", VALIDATION_ONLY)

    def augment_dense_args(self, ds: str) -> list[str]:
        """The dense recipe with the augmentation on, validation only."""
        return self.dense_args(ds, self.section(ds)["augmentation"]["data"]) + set_args("", VALIDATION_ONLY)

    def augment_method_args(self, ds: str, entry: str) -> list[str]:
        """One method at its recipe with the augmentation on, validation only."""
        args = self.method_args(ds, entry, data_extra=self.section(ds)["augmentation"]["data"])
        return args + set_args("", VALIDATION_ONLY)

    # ------------------------------------------------------------- resources
    def evaluate_only(self, ds: str) -> bool:
        """The dense model is only imported and evaluated (``dense.train.epochs: 0``, e.g. hub weights)."""
        return self.section(ds).get("dense", {}).get("train", {}).get("epochs") == 0

    def resources_of(self, ds: str, kind: str) -> dict:
        """Resources for one kind of job: the top-level ones, then the dataset's, key by key.

        Keys ``dense`` leaves unset fall back to ``train``: a dense model trained
        from scratch needs what a fine-tune needs. A dense model that is only
        imported and evaluated takes ``evaluate`` over those: it asks for far less.
        """
        top, own = self.cfg["resources"], self.section(ds).get("resources", {})
        kinds = [kind]
        if kind == "dense":
            kinds = ["train", "dense"] + (["evaluate"] if self.evaluate_only(ds) else [])
        merged = {}
        for name in kinds:
            merged.update(top.get(name, {}))
            merged.update(own.get(name, {}))
        return merged
