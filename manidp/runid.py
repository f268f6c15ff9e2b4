"""A result's one identity: what a run is, from which its folder, its MLflow tags and its table row follow.

The engine records it in ``metrics.json`` (``run_id``) and every reader takes it
from there, so a run folder may be moved or renamed without changing what it
holds. Plain Python only: the Snakefile imports it at parse time through
:mod:`manidp.plan`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

from manidp.errors import UserError

__all__ = ["RunId", "label"]


def label(value) -> str:
    """How a value appears in folder names: numbers as the package names budgets (0.4, 0.55, 5e-05)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(label(v) for v in value) or "none"
    return str(value)


@dataclass(frozen=True)
class RunId:
    """One result: the config ``entry`` that names it, the registered ``method`` it runs, and the rest.

    ``entry`` differs from ``method`` where a config entry runs a method with
    other options under its own name; tables show the entry. ``budget`` is
    None for the dense model. ``config_hash`` is None until the resolved
    config is known (a folder planned before any run).
    """

    dataset: str
    backbone: str
    entry: str
    method: str
    budget: Optional[float]
    seed: int
    config_hash: Optional[str] = None

    def folder(self, root: str = "runs", setting: Optional[str] = None) -> str:
        """{root}/{dataset}/{backbone}/{entry}[-b{budget}][/{setting}]/seed{seed}.

        The default is the package's layout; the workflow's checks put their runs
        under another root (runs/tuning, runs/augment, runs/budget) with the
        setting that sets them apart (a recipe, a number of epochs). The plan
        also builds folder patterns, with Snakemake wildcards (``"{seed}"``) and
        budgets already written as labels in place of values.
        """
        name = self.entry if self.budget is None else f"{self.entry}-b{label(self.budget)}"
        within = f"{setting}/" if setting is not None else ""
        return f"{root}/{self.dataset}/{self.backbone}/{name}/{within}seed{self.seed}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data) -> "RunId":
        """The identity ``to_dict`` wrote; a missing or foreign key is refused (a damaged record)."""
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls) if f.name != "config_hash"]
        if not isinstance(data, dict) or any(key not in data for key in required) or set(data) - set(names):
            raise UserError(f"run_id {data!r} is not a run identity: it needs the keys {', '.join(required)} "
                            "(and optionally config_hash), and no others")
        return cls(**data)
