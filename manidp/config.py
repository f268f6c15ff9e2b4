"""Resolved run configuration: packaged defaults, dataset recipe, user file, flags.

The resolved config is a plain nested dict, written as ``config.yaml`` beside
every run's outputs and logged to MLflow as params. Unknown keys, wrong types
and out-of-range values are refused with one message naming the key, before
any work starts.

YAML is read with YAML 1.2 numbers (``1e-3``, ``1e6`` are floats, as in
Python), in config files, in ``--set key=value`` and, through
:func:`yaml12_numbers`, in the workflow's config.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import yaml

from manidp.errors import UserError
from manidp.runid import RunId

__all__ = ["defaults", "recipes", "resolve", "validate", "check_runnable", "load_yaml", "yaml_load",
           "yaml12_numbers", "parse_assignment", "comparable", "config_hash", "config_differences",
           "finished_run", "check_out_folder", "check_run_folder", "can_write_in", "run_id", "default_out_dir"]


# ----------------------------------------------------------------- YAML 1.2 numbers
# YAML 1.2's core-schema float: an exponent needs no dot ("1e6") and no sign ("1e-2" and "1e+2" alike).
_FLOAT_12 = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_FLOAT_12_STRICT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)$")


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1) that also reads YAML 1.2 / Python floats such as ``1e-3``."""


Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Parse YAML text with YAML 1.2 numbers (``1e6`` is a float, not a string)."""
    return yaml.load(text, Loader=Yaml12Loader)


def yaml12_numbers(tree: Any) -> Any:
    """Turn strings that YAML 1.1 left unparsed but YAML 1.2 reads as floats (``'1e-3'``) into floats, in place.

    For config trees another YAML reader loaded (Snakemake's ``config``); returns ``tree``.
    """
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in list(items):
        if isinstance(value, str) and _FLOAT_12_STRICT.match(value):
            tree[key] = float(value)
        else:
            yaml12_numbers(value)
    return tree


def _load_packaged(name: str) -> dict:
    text = resources.files("manidp.configs").joinpath(name).read_text()
    return yaml_load(text)


def defaults() -> dict:
    cfg = _load_packaged("defaults.yaml")
    cfg.pop("recipes")
    return cfg


def recipes() -> dict:
    return _load_packaged("defaults.yaml")["recipes"]


def merge(base: dict, override: dict, path: str = "", strict: bool = True) -> dict:
    """Deep-merge ``override`` into a copy of ``base``; unknown keys are errors when strict."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}{key}"
        if strict and key not in base:
            raise UserError(f"unknown config key '{where}'; valid keys here: {', '.join(sorted(base))}")
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            # free-form sections take any key, but several layers (--set a.x, --set a.y) still add up
            out[key] = merge(out[key], value, where + ".", strict and key not in _FREE_FORM)
        else:
            out[key] = copy.deepcopy(value)
    return out


# Sections whose keys are not fixed in advance.
_FREE_FORM = {"method_options", "tags"}


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """``train.lr=0.05`` -> (["train", "lr"], 0.05), the value parsed as YAML (1.2 numbers)."""
    if "=" not in text:
        raise UserError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise UserError(f"--set expects key=value with a dotted key such as train.lr, got '{text}'")
    try:
        value = yaml_load(raw) if raw else None
    except yaml.YAMLError as err:
        raise UserError(f"--set {key}: cannot parse value '{raw}': {_yaml_problem(err)}") from None
    return keys, value


def _yaml_problem(err: Exception) -> str:
    """PyYAML's error on one line: what is wrong and where."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or " ".join(str(err).split())
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def _nest(keys: list[str], value: Any) -> dict:
    out: Any = value
    for key in reversed(keys):
        out = {key: out}
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def resolve(
    file_overrides: Optional[dict] = None,
    assignments: Iterable[str] = (),
    flags: Optional[dict] = None,
) -> dict:
    """Build the resolved config. ``flags`` are named CLI flags (``None`` = unset)."""
    layers = [file_overrides or {}]
    layers += [_nest(*parse_assignment(a)) for a in assignments]
    layers += [_nest(k.split("."), v) for k, v in (flags or {}).items() if v is not None]
    # The dataset (and so its recipe) is known only after reading every layer.
    dataset = defaults()["dataset"]
    for layer in layers:
        dataset = layer.get("dataset", dataset)
    cfg = defaults()
    if not isinstance(dataset, str):
        raise UserError(f"config key 'dataset' must be a name, got {dataset!r}")
    recipe = recipes().get(dataset, {})
    cfg = merge(cfg, recipe, strict=True)
    for layer in layers:
        cfg = merge(cfg, layer)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------- value rules
# A rule returns None for a good value, else what the value must be.
Rule = Callable[[Any], Optional[str]]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False,
            high_open: bool = False, integer: bool = False, nullable: bool = False, what: str = "") -> Rule:
    """A number within bounds; ``what`` replaces the generated description ("an integer >= 0")."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    expected = what or " ".join(["an integer" if integer else "a number", " and ".join(bounds)]).strip()
    expected += " or null" if nullable else ""

    def check(value):
        if value is None and nullable:
            return None
        if not _is_number(value) or (integer and not isinstance(value, int)):
            return expected
        if low is not None and (value < low or (low_open and value == low)):
            return expected
        if high is not None and (value > high or (high_open and value == high)):
            return expected
        return None

    return check


def _flag(value) -> Optional[str]:
    return None if isinstance(value, bool) else "true or false"


def _text(nullable: bool = False) -> Rule:
    expected = "a non-empty string" + (" or null" if nullable else "")

    def check(value):
        if value is None and nullable:
            return None
        return None if isinstance(value, str) and value.strip() else expected

    return check


def _choice(*valid) -> Rule:
    expected = f"one of the valid values: {', '.join(str(v).lower() for v in valid)}"

    def check(value):
        return None if any(value == v and type(value) is type(v) for v in valid) else expected

    return check


def _int_list(value) -> Optional[str]:
    good = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    return None if good else "a list of integers >= 0"


def _eval_splits(value) -> Optional[str]:
    good = (isinstance(value, list) and value and "val" in value and set(value) <= {"val", "test"}
            and len(set(value)) == len(value))
    return None if good else "[val, test] or [val] (validation only)"


def _mapping(value) -> Optional[str]:
    return None if isinstance(value, dict) else "a mapping"


_RULES: dict[str, Rule] = {
    "dataset": _text(), "backbone": _text(), "method": _text(), "entry": _text(nullable=True),
    "method_options": _mapping,
    "budget": _number(0, 1, high_open=True, nullable=True, what="a requested MACs reduction in [0, 1)"),
    "seed": _number(0, integer=True),
    "out": _text(nullable=True), "init_from": _text(nullable=True), "pretrained": _text(nullable=True),
    "difficulty_from": _text(nullable=True),
    "eval_splits": _eval_splits,
    "train.epochs": _number(0, integer=True),
    "train.batch_size": _number(1, integer=True),
    "train.eval_batch_size": _number(1, integer=True),
    "train.lr": _number(0, low_open=True),
    "train.min_lr": _number(0),
    "train.momentum": _number(0, 1, high_open=True),
    "train.nesterov": _flag,
    "train.weight_decay": _number(0),
    "train.label_smoothing": _number(0, 1, high_open=True),
    "train.schedule": _choice("cosine", "step", "constant"),
    "train.warmup_epochs": _number(0, integer=True),
    "train.milestones": _int_list,
    "train.gamma": _number(0, low_open=True),
    "train.grad_clip": _number(0, low_open=True, nullable=True),
    "runtime.device": _choice("auto", "cpu", "cuda"),
    "runtime.precision": _choice("auto", "fp32", "bf16"),
    "runtime.channels_last": _choice("auto", True, False),
    "runtime.workers": _number(0, integer=True),
    "runtime.threads": _number(1, integer=True, nullable=True),
    "runtime.deterministic": _flag,
    "runtime.progress": _choice("auto", "bar", "log"),
    "data.root": _text(),
    "data.download": _flag,
    "data.imagenet_path": _text(nullable=True),
    "data.image_size": _number(1, integer=True),
    "data.imagenet_val_holdout": _number(1, integer=True),
    "data.split_seed": _number(0, integer=True),
    "data.digits_c_seed": _number(0, integer=True),
    "data.cache_dir": _text(nullable=True),
    "data.max_train": _number(1, integer=True, nullable=True),
    "data.max_eval": _number(1, integer=True, nullable=True),
    "data.augment_rotation_deg": _number(0),
    "data.augment_shift_px": _number(0),
    "tracking.enabled": _flag,
    "tracking.uri": _text(nullable=True),
    "tracking.experiment": _text(nullable=True),
    "tracking.parent_run_id": _text(nullable=True),
    "tracking.tags": _mapping,
    "tracking.log_model": _flag,
}


def _rule_from_default(default) -> Rule:
    """For keys without their own rule: the type of the packaged default."""
    if isinstance(default, bool):
        return _flag
    if isinstance(default, int):
        return _number(integer=True)
    if isinstance(default, float):
        return _number()
    if isinstance(default, str):
        return _text()
    if isinstance(default, list):
        return lambda v: None if isinstance(v, list) else "a list"
    if isinstance(default, dict):
        return _mapping
    return lambda v: None


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in _FREE_FORM:
            yield from _leaves(value, name + ".")
        else:
            yield name, value


def _lookup(cfg: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(cfg, dict) or key not in cfg:
            return None
        cfg = cfg[key]
    return cfg


def _show(value) -> str:
    return repr(value) if not isinstance(value, str) else f"'{value}'"


def validate(cfg: dict) -> None:
    """Check every key's type and range (one message naming the first bad key)."""
    template = defaults()
    for name, default in _leaves(template):
        parent = _lookup(cfg, name.rsplit(".", 1)[0]) if "." in name else cfg
        if not isinstance(parent, dict):
            raise UserError(f"config key '{name.rsplit('.', 1)[0]}' must be a mapping, got {_show(parent)}")
        value = parent.get(name.rsplit(".", 1)[-1])
        expected = _RULES.get(name, _rule_from_default(default))(value)
        if expected:
            raise UserError(f"config key '{name}' must be {expected}, got {_show(value)}")
    for name, value in cfg["tracking"]["tags"].items():
        if isinstance(value, (dict, list)):
            raise UserError(f"config key 'tracking.tags.{name}' must be a single value, got {_show(value)}")
    train = cfg["train"]
    if train["nesterov"] and train["momentum"] == 0:
        raise UserError("config key 'train.nesterov' is true but 'train.momentum' is 0: set a momentum "
                        "or nesterov: false")
    if train["schedule"] == "step" and not train["milestones"]:
        raise UserError("config key 'train.schedule' is step but 'train.milestones' is empty: give the epochs "
                        "at which the learning rate drops")


def _method_options_error(cls, options: dict) -> Optional[str]:
    """A method option whose value does not have its default's type."""
    for key, value in options.items():
        default = cls.default_options.get(key)
        if default is None:
            continue
        expected = _rule_from_default(default)(value)
        if expected:
            return f"config key 'method_options.{key}' of method '{cls.name}' must be {expected}, got {_show(value)}"
    return None


def check_runnable(cfg: dict) -> dict:
    """Names, method options, input paths and the device, checked before any work.

    Returns ``cfg`` with the method's options completed by their defaults (as
    the run folder's ``config.yaml`` records them).
    """
    import timm

    from manidp.data import DATASETS
    from manidp.methods import METHODS, load_all
    from manidp.models import build_backbone

    DATASETS.get(cfg["dataset"])
    if not timm.is_model(cfg["backbone"]):
        build_backbone(cfg["backbone"], 10)  # raises the registry's message, with close matches
    load_all()
    cls = METHODS.get(cfg["method"])
    problem = _method_options_error(cls, cfg["method_options"])
    if problem:
        raise UserError(problem)
    options = cls(cfg["method_options"], cfg["budget"]).options
    for key in ("init_from", "difficulty_from"):
        if cfg[key] is not None and not Path(cfg[key]).exists():
            raise UserError(f"config key '{key}' names {cfg[key]}, which does not exist")
    if cfg["init_from"] is not None and Path(cfg["init_from"]).is_dir() \
            and not (Path(cfg["init_from"]) / "model.pt").is_file():
        raise UserError(f"init_from folder {cfg['init_from']} holds no model.pt: train that run to the end first")
    if cfg["pretrained"] not in (None, "hub") and not Path(cfg["pretrained"]).is_file():
        raise UserError(f"config key 'pretrained' is neither 'hub' nor an existing file: {cfg['pretrained']}")
    if cfg["runtime"]["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("runtime.device is 'cuda' but no CUDA device is available; use --device cpu (or auto)")
    return {**cfg, "method_options": options}


# ----------------------------------------------------------------- result identity
def comparable(cfg: dict) -> dict:
    """The config keys that determine a result: everything but where it goes, how it runs and the entry
    that names it (so a run keeps its hash whatever entry, or none, it was trained under)."""
    return {k: v for k, v in cfg.items() if k not in ("out", "tracking", "runtime", "entry")}


def config_hash(cfg: dict) -> str:
    """Short hash of :func:`comparable` (part of a result's identity)."""
    text = json.dumps(comparable(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every result-determining key that differs."""
    a, b = _flat(comparable(old)), _flat(comparable(new))
    missing = object()
    return [f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}"
            for key in sorted(set(a) | set(b)) if a.get(key, missing) != b.get(key, missing)]


def _saved_config(out: Path) -> Optional[dict]:
    try:
        saved = yaml_load((out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return saved if isinstance(saved, dict) else None


def finished_run(out: Path) -> bool:
    """Whether ``out`` holds a finished run: a model and a complete (parseable) ``metrics.json``."""
    try:
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metrics, dict) and (Path(out) / "model.pt").is_file()


def can_write_in(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (tried, since permissions alone miss read-only mounts)."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".manidp-probe-"):
            return True
    except OSError:
        return False


def check_out_folder(out: Path) -> None:
    """Refuse an ``--out`` that cannot become a run folder (a file, or a place this user cannot write)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; give a folder for the run")
    existing = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, so the run folder cannot be created there")
    if not can_write_in(existing):
        raise UserError(f"--out {out}: cannot write in {existing}; choose a folder you can write to")


def check_run_folder(out: Path, cfg: dict, force: bool = False) -> Optional[str]:
    """Refuse a run folder that cannot take this run; return "finished" if it already holds it.

    ``cfg`` carries the method's completed options (:func:`check_runnable`). A
    folder holding a finished or a resumable run with a different config is
    refused, listing the keys that differ, unless ``force`` (retrain there).
    """
    out = Path(out)
    check_out_folder(out)
    if force:
        return None
    finished = finished_run(out)
    if not finished and not (out / "checkpoint.pt").is_file():
        return None
    saved = _saved_config(out)
    changed = config_differences(saved, cfg) if saved is not None else ["config.yaml is missing or unreadable"]
    if changed:
        state = "a finished run" if finished else "an unfinished run"
        raise UserError(f"{out} holds {state} with a different config ({'; '.join(changed)}); add --force to "
                        "retrain it there, or choose another --out")
    return "finished" if finished else None


def run_id(cfg: dict) -> RunId:
    """The identity of the run ``cfg`` describes; its entry is the method's name unless the config names one
    (configs saved before the ``entry`` key existed have none)."""
    return RunId(dataset=cfg["dataset"], backbone=cfg["backbone"], entry=cfg.get("entry") or cfg["method"],
                 method=cfg["method"], budget=cfg["budget"], seed=cfg["seed"], config_hash=config_hash(cfg))


def default_out_dir(cfg: dict) -> Path:
    return Path(run_id(cfg).folder())
