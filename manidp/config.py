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
import functools
import hashlib
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from manidp.errors import UserError
from manidp.runid import RunId

__all__ = ["defaults", "recipes", "resolve", "validate", "run_schema", "schema_validator", "check_runnable",
           "load_yaml", "yaml_load", "yaml12_numbers", "parse_assignment", "comparable", "config_hash",
           "config_differences", "finished_run", "check_out_folder", "check_run_folder", "can_write_in", "run_id",
           "default_out_dir"]


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


# ----------------------------------------------------------------- the run schema
# Every key a run takes, with its type, range and help text, in one file that the workflow's schema refers to.
RUN_SCHEMA = "run.schema.yaml"
_TYPE_WORDS = {"string": "a string", "boolean": "true or false", "object": "a mapping", "array": "a list",
               "null": "null"}
_BOUNDS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))


def _finite_number(checker, value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole_number(checker, value) -> bool:
    # JSON Schema counts 1.0 as an integer; an epoch count or a seed given as 1.0 stays refused.
    return isinstance(value, int) and not isinstance(value, bool)


@functools.lru_cache(maxsize=None)
def _validator_class():
    """Draft 2020-12 with the numbers a run can use: finite ones, and integers that are ints."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    types = base.TYPE_CHECKER.redefine_many({"number": _finite_number, "integer": _whole_number})
    return jsonschema.validators.extend(base, type_checker=types)


@functools.lru_cache(maxsize=None)
def run_schema() -> dict:
    """The run config's JSON Schema (``manidp/configs/run.schema.yaml``)."""
    return _load_packaged(RUN_SCHEMA)


def schema_validator(schema_file: str | Path):
    """A validator of the YAML schema ``schema_file`` whose relative ``$ref``s name other YAML files (the
    workflow's schema refers to the run schema), resolved next to it as ``snakemake.utils.validate`` does."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    import jsonschema
    from referencing import Registry, Resource

    def retrieve(uri: str) -> Resource:
        return Resource.from_contents(yaml_load(Path(url2pathname(urlparse(uri).path)).read_text()))

    path = Path(schema_file).resolve()
    schema = {**yaml_load(path.read_text()), "$id": path.as_uri()}
    return jsonschema.validators.validator_for(schema)(schema, registry=Registry(retrieve=retrieve))


def _definition(node: dict) -> dict:
    """``node``, or the run schema's definition its ``$ref`` (``#/$defs/...``) names."""
    while "$ref" in node:
        target = run_schema()
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _key_of(path) -> tuple[str, dict]:
    """The config key under ``path`` that a message names (a list's item belongs to its list), with its schema."""
    node, keys = run_schema(), []
    for part in path:
        node = _definition(node)
        properties, other = node.get("properties", {}), node.get("additionalProperties")
        if isinstance(part, int) or (part not in properties and not isinstance(other, dict)):
            break
        node = properties.get(part, other)
        keys.append(part)
    return ".".join(keys), _definition(node)


def _yaml_text(value) -> str:
    if isinstance(value, list):
        return f"[{', '.join(_yaml_text(v) for v in value)}]"
    return yaml.safe_dump(value, default_flow_style=True).splitlines()[0].removesuffix(" ...")


def _numbers(kind: str, schema: dict, plural: bool) -> str:
    noun = {"integer": ("an integer", "integers"), "number": ("a number", "numbers")}[kind][plural]
    bounds = [f"{word} {schema[key]:g}" for key, word in _BOUNDS if key in schema]
    return " ".join([noun, " and ".join(bounds)]).strip()


def _expected(schema: dict, plural: bool = False) -> str:
    """What a key takes, in words read from its schema: 'an integer >= 1 or null', 'a list of integers >= 0'."""
    if "enum" in schema:
        return f"one of the valid values: {', '.join(_yaml_text(v) for v in schema['enum'])}"
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    words = []
    for kind in kinds:
        if kind in ("integer", "number"):
            words.append(_numbers(kind, schema, plural))
        elif kind == "string" and schema.get("pattern") == r"\S":
            words.append("a non-empty string")
        elif kind == "array" and "items" in schema:
            words.append(f"a list of {_expected(schema['items'], plural=True)}")
        else:
            words.append("a boolean" if kind == "boolean" and len(kinds) > 2 else _TYPE_WORDS[kind])
    return " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 2 else words)


def _show(value) -> str:
    return repr(value) if not isinstance(value, str) else f"'{value}'"


def _value_at(cfg: dict, keys: list[str]):
    for key in keys:
        cfg = cfg[key]
    return cfg


def _schema_message(error, cfg: dict) -> str:
    """One line naming the key, the bad value, what the key takes and what it is for."""
    key, schema = _key_of(error.absolute_path)
    if error.validator == "additionalProperties":
        unknown = sorted(set(error.instance) - set(schema.get("properties", {})))
        where = f"{key}." if key else ""
        return f"unknown config key '{where}{unknown[0]}'; valid keys here: {', '.join(sorted(schema['properties']))}"
    value = _value_at(cfg, key.split(".") if key else [])
    help_text = f". {key}: {schema['description']}" if "description" in schema else ""
    return f"config key '{key}' must be {_expected(schema)}, got {_show(value)}{help_text}"


def validate(cfg: dict) -> None:
    """Check every key against the run schema (one message naming the first bad key), then the keys that
    depend on each other."""
    error = next(_validator_class()(run_schema()).iter_errors(cfg), None)
    if error is not None:
        raise UserError(_schema_message(error, cfg))
    train = cfg["train"]
    if train["nesterov"] and train["momentum"] == 0:
        raise UserError("config key 'train.nesterov' is true but 'train.momentum' is 0: set a momentum "
                        "or nesterov: false")
    if train["schedule"] == "step" and not train["milestones"]:
        raise UserError("config key 'train.schedule' is step but 'train.milestones' is empty: give the epochs "
                        "at which the learning rate drops")


def _option_schema(default) -> dict:
    """A method option's schema: its default's type (a method declares its options by their defaults)."""
    kinds = ((bool, {"type": "boolean"}), (int, {"type": "integer"}), (float, {"type": "number"}),
             (str, {"type": "string", "pattern": r"\S"}), (list, {"type": "array"}), (dict, {"type": "object"}))
    return next((schema for kind, schema in kinds if isinstance(default, kind)), {})


def _method_options_error(cls, options: dict) -> Optional[str]:
    """A method option whose value does not have its default's type."""
    for key, value in options.items():
        default = cls.default_options.get(key)
        if default is None:
            continue
        schema = _option_schema(default)
        if not _validator_class()(schema).is_valid(value):
            return (f"config key 'method_options.{key}' of method '{cls.name}' must be {_expected(schema)}, "
                    f"got {_show(value)}")
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
    that names it (so a run keeps its hash whatever entry, or none, it was trained under), and of the
    ``data`` block only the keys set away from their packaged default: a data key added later (for a
    new dataset, at a default that changes nothing) leaves every saved run's config and hash as they
    were."""
    out = {k: v for k, v in cfg.items() if k not in ("out", "tracking", "runtime", "entry")}
    if isinstance(out.get("data"), dict):
        packaged = _packaged_data_defaults()
        out["data"] = {k: v for k, v in out["data"].items() if k not in packaged or v != packaged[k]}
        if not out["data"]:
            del out["data"]
    return out


@functools.lru_cache(maxsize=None)
def _packaged_data_defaults() -> dict:
    """The packaged ``data`` defaults, parsed once (every run's hash reads them; callers never modify them)."""
    return defaults()["data"]


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
    shown_a, shown_b = _flat(old), _flat(new)  # a data key at its default is left out above, but shown
    missing = object()
    return [f"{key}: {shown_a.get(key, '(unset)')!r} -> {shown_b.get(key, '(unset)')!r}"
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
