"""The console command: listings, and one clear message (exit 2, no traceback) per mistake.

The bad-input tests walk every flag of every subcommand and every config key
(through --set and through a config file) with wrong types, out-of-range and
malformed values: each must give exit 2 and one line, before anything is
written.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from manidp.cli import main
from manidp.config import defaults


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _run(*args):
    """Run the console entry point in-process (an escaping exception fails the test)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return _Result(code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("listing,expected", [("datasets", "digits-c"), ("backbones", "cifar_resnet20"),
                                              ("methods", "dense")])
def test_listings(listing, expected):
    result = _run(listing)
    assert result.returncode == 0 and expected in result.stdout.split()


@pytest.mark.parametrize("args,message", [
    (("train", "--dataset", "mnist"), "unknown dataset 'mnist'; valid datasets: cifar10, cifar100, digits-c"),
    (("train", "--backbone", "resnet_x"), "unknown backbone 'resnet_x'"),
    (("train", "--method", "magic"), "unknown method 'magic'; valid methods: "),
    (("train", "--set", "train.lrr=1"), "unknown config key 'train.lrr'"),
    (("train", "--config", "/nonexistent.yaml"), "config file not found"),
    (("train", "--dataset", "imagenet", "--set", "data.imagenet_path=/nonexistent"), "data.imagenet_path"),
    (("macs", "nope_net"), "unknown backbone"),
    (("evaluate", "/nonexistent/run"), "not found"),
])
def test_bad_input_gets_one_clear_message(tmp_path, args, message):
    result = _run(*args, "--out", str(tmp_path / "o")) if args[0] == "train" else _run(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "metrics.json").exists()


# ----------------------------------------------------------------- every config key and flag
def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("method_options", "tags"):
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


CONFIG_KEYS = _leaf_keys(defaults())

# Out of range, or not one of the valid values: (assignment, what the message says).
OUT_OF_RANGE = [
    ("budget=1", "'budget' must be a number >= 0 and < 1 or null"), ("budget=-0.1", "'budget'"),
    ("seed=-1", "'seed' must be an integer >= 0"), ("seed=1.5", "'seed' must be an integer"),
    ("train.epochs=-1", "'train.epochs' must be an integer >= 0"), ("train.epochs=1.5", "'train.epochs'"),
    ("train.batch_size=0", "'train.batch_size' must be an integer >= 1"),
    ("train.eval_batch_size=0", "'train.eval_batch_size'"),
    ("train.lr=0", "'train.lr' must be a number > 0"), ("train.lr=-1e-3", "'train.lr'"),
    ("train.lr=.nan", "'train.lr'"), ("train.lr=.inf", "'train.lr'"), ("train.min_lr=-1", "'train.min_lr'"),
    ("train.momentum=1", "'train.momentum' must be a number >= 0 and < 1"),
    ("train.weight_decay=-1e-4", "'train.weight_decay' must be a number >= 0"),
    ("train.label_smoothing=1", "'train.label_smoothing'"),
    ("train.schedule=linear", "valid values: cosine, step, constant"),
    ("train.warmup_epochs=-1", "'train.warmup_epochs'"), ("train.milestones=[-1]", "'train.milestones'"),
    ("train.gamma=0", "'train.gamma' must be a number > 0"), ("train.grad_clip=0", "'train.grad_clip'"),
    ("runtime.device=tpu", "valid values: auto, cpu, cuda"), ("runtime.precision=fp16", "'runtime.precision'"),
    ("runtime.channels_last=1", "'runtime.channels_last'"), ("runtime.workers=-1", "'runtime.workers'"),
    ("runtime.threads=0", "'runtime.threads' must be an integer >= 1 or null"),
    ("runtime.progress=tqdm", "'runtime.progress'"), ("data.root=", "'data.root' must be a non-empty string"),
    ("data.image_size=0", "'data.image_size'"), ("data.imagenet_val_holdout=0", "'data.imagenet_val_holdout'"),
    ("data.split_seed=-1", "'data.split_seed'"), ("data.digits_c_seed=-1", "'data.digits_c_seed'"),
    ("data.max_train=0", "'data.max_train'"), ("data.max_eval=-5", "'data.max_eval'"),
    ("eval_splits=[test]", "'eval_splits' must be one of the valid values: [val, test], [test, val], [val]"),
    ("dataset=mnist", "unknown dataset 'mnist'"), ("backbone=resnet_x", "unknown backbone 'resnet_x'"),
    ("method=magic", "unknown method 'magic'"), ("method_options.nope=1", "has no option(s) nope"),
    ("init_from=/nonexistent/dense", "'init_from' names /nonexistent/dense, which does not exist"),
    ("pretrained=/nonexistent.pt", "'pretrained' is neither 'hub' nor an existing file"),
    ("train.nesterov=true --set train.momentum=0", "'train.nesterov' is true but 'train.momentum' is 0"),
    ("train.schedule=step", "'train.milestones' is empty"),
]


def _wrong_type(key: str) -> str:
    """A value of the wrong type for ``key`` (a list fits no scalar or mapping key)."""
    return "abc" if key == "train.milestones" else "[1, 2]"


def _one_line_exit_2(result, expected: str = "") -> None:
    assert result.returncode == 2, (result.returncode, result.stdout[-500:], result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert expected in lines[0], lines[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory; the test asserts that nothing appears in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("key", CONFIG_KEYS)
def test_every_config_key_refuses_a_wrong_type(workdir, key):
    result = _run("train", "--set", f"{key}={_wrong_type(key)}")
    _one_line_exit_2(result, f"config key '{key}'")
    assert _files(workdir) == []


@pytest.mark.parametrize("assignment,message", OUT_OF_RANGE)
def test_every_config_key_refuses_out_of_range_values(workdir, assignment, message):
    method = ["--method", "manidp", "--budget", "0.5"] if "method_options" in assignment else []
    result = _run("train", *method, *[arg for part in assignment.split(" --set ") for arg in ("--set", part)])
    _one_line_exit_2(result, message)
    assert _files(workdir) == []


@pytest.mark.parametrize("assignment,message", OUT_OF_RANGE[:20])
def test_config_file_values_are_checked_like_set(workdir, assignment, message):
    keys, value = assignment.split("=", 1)
    tree: dict = yaml.safe_load(value) if value else None
    for key in reversed(keys.split(".")):
        tree = {key: tree}
    config = workdir / "bad.yaml"
    config.write_text(f"# {assignment}\n" + yaml.safe_dump(tree))
    _one_line_exit_2(_run("train", "--config", str(config)), message)
    assert _files(workdir) == ["bad.yaml"]


def _setup_files(root: Path) -> dict[str, Path]:
    (root / "a_file").write_text("not a folder\n")
    (root / "a_folder").mkdir()
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "broken.yaml").write_text("train: {lr: [\n")
    unfinished = root / "unfinished"
    unfinished.mkdir()
    (unfinished / "model.pt").write_bytes(b"")
    (unfinished / "metrics.json").write_text('{"test_top1": 9')  # truncated
    return {"file": root / "a_file", "folder": root / "a_folder", "unfinished": unfinished}


NO_GPU = not torch.cuda.is_available()

# (arguments, what the message says); {file}, {folder}, {unfinished} name prepared paths.
BAD_FLAGS = [
    (("train", "--threads", "-1"), "--threads must be >= 1, got -1"),
    (("train", "--threads", "0"), "--threads must be >= 1, got 0"),
    (("train", "--threads", "two"), "argument --threads: invalid int value: 'two'"),
    (("train", "--epochs", "-1"), "--epochs must be >= 0"),
    (("train", "--epochs", "1e3"), "argument --epochs: invalid int value"),
    (("train", "--seed", "-3"), "--seed must be >= 0"),
    (("train", "--budget", "1.5"), "--budget is a requested MACs reduction in [0, 1), got 1.5"),
    (("train", "--budget", "half"), "argument --budget: invalid float value"),
    (("train", "--device", "foo"), "argument --device: invalid choice: 'foo'"),
    (("train", "--out", "{file}"), "is an existing file; give a folder for the run"),
    (("train", "--out", "{file}/run"), "is a file, so the run folder cannot be created there"),
    (("train", "--out", "/proc/manidp/run"), "cannot write in /proc"),
    (("train", "--config", "missing.yaml"), "config file not found: missing.yaml"),
    (("train", "--config", "list.yaml"), "must hold a mapping of keys, not list"),
    (("train", "--config", "broken.yaml"), "config file broken.yaml is not valid YAML"),
    (("train", "--set", "noequals"), "--set expects key=value, got 'noequals'"),
    (("train", "--set", "=1"), "--set expects key=value with a dotted key"),
    (("train", "--set", "train.lr={"), "--set train.lr: cannot parse value '{'"),
    (("train", "--set", "train.lrr=1"), "unknown config key 'train.lrr'"),
    (("train", "--init-from", "/nonexistent/dense"), "'init_from' names /nonexistent/dense"),
    (("train", "--init-from", "{folder}"), "holds no model.pt"),
    (("train", "--bogus"), "unrecognized arguments: --bogus"),
    (("evaluate", "/nonexistent/run"), "/nonexistent/run not found"),
    (("evaluate", "{folder}"), "holds no model.pt"),
    (("evaluate", "{unfinished}", "--device", "foo"), "argument --device: invalid choice: 'foo'"),
    (("evaluate", "{unfinished}", "--split", "train"), "argument --split: invalid choice: 'train'"),
    (("evaluate", "{unfinished}", "--out", "{folder}"), "--out {folder} is a folder; give the file to write"),
    (("evaluate", "{unfinished}", "--out", "/proc/x.csv"), "cannot write there"),
    pytest.param(("evaluate", "{unfinished}", "--device", "cuda"), "no CUDA device is available",
                 marks=pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")),
    (("latency", "{unfinished}", "--threads", "-2"), "--threads must be >= 1, got -2"),
    (("latency", "{unfinished}", "--threads", "0"), "--threads must be >= 1, got 0"),
    (("latency", "{unfinished}", "--batch-size", "0"), "--batch-size must be >= 1"),
    (("latency", "{unfinished}", "--instances", "0"), "--instances must be >= 1"),
    (("latency", "{unfinished}", "--repeats", "0"), "--repeats must be >= 1"),
    (("latency", "{unfinished}", "--warmup", "-1"), "--warmup must be >= 0"),
    (("latency", "{unfinished}", "--device", "tpu"), "argument --device: invalid choice: 'tpu'"),
    (("latency", "{unfinished}", "--dtype", "fp8"), "argument --dtype: invalid choice: 'fp8'"),
    (("latency", "{unfinished}", "--out", "/proc/x.json"), "cannot write there"),
    (("latency", "{unfinished}", "--out", "{folder}"), "is a folder; give the file to write"),
    (("macs", "cifar_resnet20", "--input-size", "0"), "--input-size must be >= 1"),
    (("macs", "cifar_resnet20", "--input-size", "big"), "argument --input-size: invalid int value"),
    (("macs", "cifar_resnet20", "--in-chans", "0"), "--in-chans must be >= 1"),
    (("macs", "cifar_resnet20", "--num-classes", "-10"), "--num-classes must be >= 1"),
    (("macs", "nope_net"), "unknown backbone 'nope_net'"),
    (("tracking", "export"), "argument action: invalid choice: 'export'"),
    (("tracking", "import"), "tracking import needs a run folder"),
    (("tracking", "import", "/nonexistent/run"), "holds no finished run"),
    (("tracking", "import", "{unfinished}"), "holds no finished run"),
    (("tracking", "init", "{folder}"), "tracking init takes no run folder"),
    (("tracking-summary", "--dataset", "digits-c", "--runs", "{unfinished}", "--out", "{folder}"),
     "is a folder; give the file to write"),
    (("nosuch",), "argument COMMAND: invalid choice: 'nosuch'"),
]


@pytest.mark.parametrize("args,message", BAD_FLAGS)
def test_every_flag_refuses_bad_values(workdir, args, message):
    paths = _setup_files(workdir)

    def fill(text: str) -> str:
        for name, path in paths.items():
            text = text.replace(f"{{{name}}}", str(path))
        return text

    before = _files(workdir)
    result = _run(*map(fill, args))
    _one_line_exit_2(result, fill(message))
    assert _files(workdir) == before


def test_yaml_1_2_numbers_in_set_and_config_files(workdir):
    (workdir / "lr.yaml").write_text("train:\n  lr: 1e-2\n  weight_decay: 5e-4\n")
    result = _run("train", "--print-config", "--config", "lr.yaml", "--set", "train.min_lr=1.0e-6",
                  "--set", "train.gamma=1e-1")
    assert result.returncode == 0, result.stderr
    train = yaml.safe_load(result.stdout)["train"]
    assert train["lr"] == 0.01 and train["weight_decay"] == 5e-4 and train["min_lr"] == 1e-6
    assert train["gamma"] == 0.1
    assert _run("train", "--print-config", "--set", "train.lr=1e6").returncode == 0


# ----------------------------------------------------------------- finished folders
def _same_command(out: Path, cache: Path, *extra: str) -> tuple[str, ...]:
    """The CLI form of conftest's small_run_config."""
    return ("train", "--out", str(out), "--epochs", "2", "--threads", "2", "--set", "train.batch_size=64",
            "--set", "data.max_train=512", "--set", "data.max_eval=256", "--set", f"data.cache_dir={cache}",
            "--set", "tracking.enabled=false", "--set", "runtime.progress=log", *extra)


def test_finished_folder_with_a_changed_config_lists_the_keys(dense_run, data_cache):
    before = (dense_run / "metrics.json").stat().st_mtime_ns
    same = _run(*_same_command(dense_run, data_cache))
    assert same.returncode == 0 and "already finished" in same.stdout
    changed = _run(*_same_command(dense_run, data_cache, "--epochs", "5", "--set", "train.lr=0.5"))
    _one_line_exit_2(changed, "holds a finished run with a different config")
    assert "train.epochs: 2 -> 5" in changed.stderr and "train.lr: 0.1 -> 0.5" in changed.stderr
    assert "--force" in changed.stderr
    assert (dense_run / "metrics.json").stat().st_mtime_ns == before


def test_force_retrains_a_finished_folder(tmp_path, dense_run, data_cache):
    out = tmp_path / "copy"
    shutil.copytree(dense_run, out)
    (out / "latency_cpu-1t.json").write_text("{}")  # measured on the old model: goes with it
    result = _run(*_same_command(out, data_cache, "--epochs", "1", "--force"))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "metrics.json").read_text())["epochs_trained"] == 1
    assert not (out / "latency_cpu-1t.json").exists()


def test_truncated_metrics_is_not_a_finished_run(tmp_path, dense_run):
    from manidp.config import finished_run

    out = tmp_path / "copy"
    shutil.copytree(dense_run, out)
    assert finished_run(out)
    text = (out / "metrics.json").read_text()
    (out / "metrics.json").write_text(text[: len(text) // 2])
    assert not finished_run(out)


def test_print_config_shows_resolved_keys():
    result = _run("train", "--print-config", "--budget", "0.4", "--set", "train.lr=0.01")
    assert result.returncode == 0 and "budget: 0.4" in result.stdout and "lr: 0.01" in result.stdout


# ----------------------------------------------------------------- help a newcomer can use
_USER_COMMANDS = ("train", "evaluate", "macs", "tracking")


@pytest.mark.parametrize("command", _USER_COMMANDS)
def test_every_flag_says_what_it_does_and_its_default(command):
    from manidp.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest == "help" or not action.option_strings:
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        flag_only = action.nargs == 0 or action.default == []
        assert flag_only or "(default" in action.help, f"{command} {action.option_strings[0]}: no default shown"


def test_train_help_points_to_the_listings_and_shows_packaged_defaults():
    text = " ".join(_run("train", "--help").stdout.split())
    assert "'manidp methods' lists them (default: dense)" in text
    assert "'manidp backbones' lists" in text and "(default: cifar_resnet20)" in text
    assert "(default: digits-c)" in text


def test_top_level_help_lists_user_commands_only_and_no_markup():
    from manidp.cli import INTERNAL_COMMANDS

    text = _run("--help").stdout
    assert "``" not in text and "train" in text and "latency" in text
    for name in INTERNAL_COMMANDS:
        assert name not in text
        assert _run(name, "--help").returncode == 0  # still callable by the workflow


@pytest.mark.parametrize("backbone,size,macs", [("cifar_resnet20", 32, 40_551_040), ("resnet18", 224, None)])
def test_macs_uses_the_backbones_native_input_size_and_says_so(backbone, size, macs):
    done = _run("macs", backbone)
    assert done.returncode == 0 and f"@ {size}x{size}" in done.stdout
    assert f"native {size} px" in done.stderr
    result = json.loads(_run("macs", backbone, "--json").stdout)
    assert result["input_size"] == size and (macs is None or result["macs"] == macs)
