"""Packaging: pyproject.toml and environment.yml declare the same requirements, and a plain install can report."""
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _normalized(requirement: str) -> str:
    """name[extras]specifier, comparable across files (case, spacing, order of extras and clauses)."""
    req = Requirement(requirement)
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{canonicalize_name(req.name)}{extras}{','.join(sorted(str(s) for s in req.specifier))}"


def test_environment_yml_matches_pyproject():
    """Same names, extras and version floors: e.g. snakemake[reports] and the Slurm plugin >= 2.7.1 in both."""
    wanted = {_normalized(r) for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_normalized(r) for r in pip_section if not r.startswith("-e")}
    assert listed == wanted
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.replace(" ", "") == "python>=3.11" or python.startswith("python=3.1")
    assert any(r.startswith("-e") for r in pip_section), "conda users install the package itself too"


def _resolved(requirements: list[str]) -> set[str]:
    """Every distribution a set of requirements pulls in, following installed metadata (extras included)."""
    seen: set[tuple[str, frozenset]] = set()
    queue = [Requirement(r) for r in requirements]
    while queue:
        req = queue.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        for line in metadata.requires(req.name) or []:
            dependency = Requirement(line)
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                queue.append(dependency)
    return {name for name, _ in seen}


def _extra_requirements(distribution: str, extra: str) -> set[str]:
    return {
        canonicalize_name(Requirement(line).name)
        for line in metadata.requires(distribution) or []
        if Requirement(line).marker is not None and Requirement(line).marker.evaluate({"extra": extra})
        and not Requirement(line).marker.evaluate({"extra": ""})
    }


def test_plain_install_has_what_the_report_needs():
    """`pip install -e .` (no dev extra) resolves to everything `snakemake --report` needs (pygments).

    The README's first command runs the workflow, whose profile writes the
    HTML report after the run; without snakemake's `reports` extra the report
    fails on a plain install while the dev extra hides it in the tests.
    """
    report_needs = _extra_requirements("snakemake", "reports")
    assert "pygments" in report_needs
    plain = _resolved(PROJECT["dependencies"])
    assert report_needs <= plain, f"a plain install misses {sorted(report_needs - plain)}"


def test_slurm_plugin_floor():
    """Before 2.7.1 a gpu=N job runs N times; before 2.0.1 the profile's slurm-status-command does not exist."""
    plugin = next(Requirement(r) for r in PROJECT["dependencies"] if r.startswith("snakemake-executor-plugin-slurm"))
    assert "2.7.0" not in plugin.specifier and "2.7.1" in plugin.specifier
    profile = yaml.safe_load((ROOT / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["retries"] >= 1 and profile["keep-going"] is True


def test_workflow_environment_installs_this_package(tmp_path):
    """The rules' conda environment pip-installs this clone, through the variable the workflow sets.

    conda hands the environment's pip section to pip as a requirements file
    (pip expands ${VAR} there); this runs the same file through pip, no install.
    """
    env = yaml.safe_load((ROOT / "workflow" / "envs" / "manidp.yaml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(pip_section) + "\n")
    common = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    assert 'os.environ.setdefault("MANIDP_PACKAGE", f"-e {Path(workflow.basedir).parent}")' in common
    env_vars = {**os.environ, "MANIDP_PACKAGE": f"-e {ROOT}"}
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation",
                             "--no-index", "-r", str(requirements)], capture_output=True, text=True, env=env_vars,
                            timeout=300)
    assert result.returncode == 0 and "Would install manidp-" in result.stdout, result.stdout + result.stderr
    assert PROJECT["license"]["text"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_package_data_ships_every_data_file_the_package_reads():
    """A non-editable install carries what the code opens at run time: reference tables, configs and the
    compiled ops' C++ source (without it the deployed gates would silently fall back to ATen ops)."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["manidp"]
    shipped = {path for pattern in globs for path in (ROOT / "manidp").glob(pattern)}
    from manidp import kernels

    assert kernels.SOURCE in shipped
    for folder, suffix in (("reference", ".csv"), ("configs", ".yaml")):
        assert all(path in shipped for path in (ROOT / "manidp" / folder).glob(f"*{suffix}"))
