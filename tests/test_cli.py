"""The console command: listings, and one clear message (exit 2, no traceback) per mistake."""
from __future__ import annotations

import pytest

from manidp.cli import main


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


def test_print_config_shows_resolved_keys():
    result = _run("train", "--print-config", "--budget", "0.4", "--set", "train.lr=0.01")
    assert result.returncode == 0 and "budget: 0.4" in result.stdout and "lr: 0.01" in result.stdout
