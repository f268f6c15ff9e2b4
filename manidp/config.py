"""Resolved run configuration: packaged defaults, dataset recipe, user file, flags.

The resolved config is a plain nested dict, written as ``config.yaml`` beside
every run's outputs and logged to MLflow as params. Unknown keys and wrong
types are refused with one message naming the key.
"""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from manidp.errors import UserError

_SCALAR_TYPES = (bool, int, float, str, type(None))


def _load_packaged(name: str) -> dict:
    text = resources.files("manidp.configs").joinpath(name).read_text()
    return yaml.safe_load(text)


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
    """``train.lr=0.05`` -> (["train", "lr"], 0.05), the value parsed as YAML."""
    if "=" not in text:
        raise UserError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as err:
        raise UserError(f"--set {key}: cannot parse value '{raw}': {err}") from None
    return key.strip().split("."), value


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
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {err}") from None
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
    recipe = recipes().get(dataset, {})
    cfg = merge(cfg, recipe, strict=True)
    for layer in layers:
        cfg = merge(cfg, layer)
    validate(cfg)
    return cfg


def _check(cfg: dict, template: dict, path: str = "") -> None:
    for key, ref in template.items():
        value, where = cfg[key], f"{path}{key}"
        if isinstance(ref, dict):
            if not isinstance(value, dict):
                raise UserError(f"config key '{where}' must be a mapping, got {value!r}")
            if key not in _FREE_FORM:
                _check(value, ref, where + ".")
        elif isinstance(ref, bool):
            if not isinstance(value, bool):
                raise UserError(f"config key '{where}' must be true or false, got {value!r}")
        elif isinstance(ref, (int, float)) and not isinstance(ref, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"config key '{where}' must be a number, got {value!r}")
        elif isinstance(ref, list) and not isinstance(value, list):
            raise UserError(f"config key '{where}' must be a list, got {value!r}")


def validate(cfg: dict) -> None:
    """Type-check against the defaults and check the values with fixed choices."""
    _check(cfg, defaults())
    choices = {
        ("train", "schedule"): ("cosine", "step", "constant"),
        ("runtime", "device"): ("auto", "cpu", "cuda"),
        ("runtime", "precision"): ("auto", "fp32", "bf16"),
        ("runtime", "progress"): ("auto", "bar", "log"),
    }
    for (section, key), valid in choices.items():
        if cfg[section][key] not in valid:
            raise UserError(f"config key '{section}.{key}' is {cfg[section][key]!r}; valid values: {', '.join(valid)}")
    if cfg["runtime"]["channels_last"] not in ("auto", True, False):
        raise UserError("config key 'runtime.channels_last' must be auto, true or false")
    budget = cfg["budget"]
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget < 1):
        raise UserError(f"config key 'budget' is a requested MACs reduction in [0, 1), got {budget!r}")
    if cfg["train"]["epochs"] < 0 or cfg["train"]["batch_size"] < 1:
        raise UserError("config keys 'train.epochs' must be >= 0 and 'train.batch_size' >= 1")
    for key in ("dataset", "backbone", "method"):
        if not isinstance(cfg[key], str):
            raise UserError(f"config key '{key}' must be a name, got {cfg[key]!r}")
    if not isinstance(cfg["seed"], int) or isinstance(cfg["seed"], bool):
        raise UserError(f"config key 'seed' must be an integer, got {cfg['seed']!r}")
    splits = cfg["eval_splits"]
    if not splits or "val" not in splits or not set(splits) <= {"val", "test"} or len(set(splits)) != len(splits):
        raise UserError(f"config key 'eval_splits' must be [val, test] or [val] (validation only), got {splits!r}")


def default_out_dir(cfg: dict) -> Path:
    method = cfg["method"] if cfg["budget"] is None else f"{cfg['method']}-b{cfg['budget']:g}"
    return Path("runs") / cfg["dataset"] / cfg["backbone"] / method / f"seed{cfg['seed']}"
