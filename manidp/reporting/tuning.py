"""The recipe sweep on validation-only runs: mean/std/n per configuration and the chosen recipe per method."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from manidp.errors import UserError
from manidp.reporting.runs import is_number, read_json

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["tuning_table"]


def _validation_run(run_dir: Path) -> dict:
    """One sweep run's configuration and validation numbers; refuses anything that saw the test split."""
    path = run_dir / "metrics.json"
    m = read_json(path)
    test_keys = sorted(k for k in m if k.startswith("test_"))
    if test_keys or (run_dir / "instances_test.csv").exists():
        held = ", ".join(test_keys) if test_keys else "instances_test.csv"
        raise UserError(f"{run_dir} holds test-split results ({held}): recipes are chosen on validation only; "
                        f"sweep with validation-only runs (--set eval_splits=[val])")
    diverged = m.get("status") == "diverged"
    if not diverged and not (is_number(m.get("val_top1")) and is_number(m.get("val_macs_reduction"))):
        raise UserError(f"{path} lacks val_top1 or val_macs_reduction: the tuning table needs each run's "
                        f"validation numbers; re-run it to the end")
    config = m.get("config")
    train = config.get("train") if isinstance(config, dict) else None
    if not isinstance(train, dict) or not is_number(train.get("lr")) or not all(
            k in config for k in ("method", "budget", "method_options", "seed")):
        raise UserError(f"{path} lacks the resolved config (method, budget, method_options, seed, train.lr): "
                        f"re-run it with this version of manidp train")
    return {"method": config["method"], "budget": config["budget"], "lr": float(train["lr"]),
            "method_options": json.dumps(config["method_options"] or {}, sort_keys=True),
            "seed": config["seed"], "diverged": diverged,
            "val_top1": float("nan") if diverged else float(m["val_top1"]),
            "val_macs_reduction": float("nan") if diverged else float(m["val_macs_reduction"]),
            "run_dir": str(run_dir)}


def tuning_table(run_dirs: Iterable[str | Path], tolerance: float = 0.02) -> "pd.DataFrame":
    """Mean/std/n of validation top-1 and reduction per (method, budget, lr, method_options); the choice per method.

    The chosen recipe of a method (at a budget) is the configuration with the
    highest mean validation top-1 among those whose mean validation MACs
    reduction lies within ``tolerance`` of the budget; where none does, the
    one closest to the budget, flagged as a fallback. A configuration with a
    diverged seed (``metrics.json`` status "diverged") is never chosen: a
    recipe that fails on one seed in three is not one to publish. Its means
    are over the seeds that finished, and ``n_diverged`` says how many did not.
    """
    import pandas as pd

    if not is_number(tolerance) or tolerance < 0:
        raise UserError(f"--tolerance must be a non-negative fraction of the dense MACs (got {tolerance})")
    runs = pd.DataFrame([_validation_run(Path(d)) for d in run_dirs])
    if runs.empty:
        raise UserError("no run folders given: pass --runs DIR ...")
    keys = ["method", "budget", "lr", "method_options"]
    twice = runs[runs.duplicated(keys + ["seed"], keep=False)]
    if len(twice):
        raise UserError("two run folders hold the same configuration and seed (" + ", ".join(twice["run_dir"]) +
                        "): pass each run once")
    rows = []
    for (method, budget, lr, options), group in runs.groupby(keys, dropna=False, sort=True):
        target = 0.0 if pd.isna(budget) else float(budget)
        reduction = group["val_macs_reduction"].mean()
        n_diverged = int(group["diverged"].sum())
        rows.append({"method": method, "budget": None if pd.isna(budget) else budget, "lr": lr,
                     "method_options": options, "n_seeds": len(group), "n_diverged": n_diverged,
                     "seeds": " ".join(str(s) for s in sorted(group["seed"])),
                     "val_top1_mean": group["val_top1"].mean(), "val_top1_std": group["val_top1"].std(ddof=1),
                     "val_macs_reduction_mean": reduction,
                     "val_macs_reduction_std": group["val_macs_reduction"].std(ddof=1),
                     "budget_gap": abs(reduction - target),
                     "within_tolerance": bool(abs(reduction - target) <= tolerance + 1e-9),  # 0.4-0.3 > 0.1
                     "chosen": False, "fallback": False,
                     "choice": f"diverged in {n_diverged} of {len(group)} seeds: never chosen" if n_diverged else "",
                     "runs": " ".join(group["run_dir"])})
    table = pd.DataFrame(rows)
    for _, group in table.groupby(["method", "budget"], dropna=False, sort=False):
        group = group[group["n_diverged"] == 0]
        if group.empty:
            continue  # every configuration diverged: the rows say so, and nothing is chosen
        within = group[group["within_tolerance"]]
        if len(within):
            best = within.sort_values("val_top1_mean", ascending=False, kind="stable").index[0]
            table.loc[best, "choice"] = f"highest validation top-1 within {tolerance:g} of the budget"
        else:
            best = group.sort_values(["budget_gap", "val_top1_mean"], ascending=[True, False], kind="stable").index[0]
            table.loc[best, "choice"] = (f"FALLBACK: no configuration within {tolerance:g} of the budget; "
                                         f"closest validation reduction")
            table.loc[best, "fallback"] = True
        table.loc[best, "chosen"] = True
    return table.drop(columns="budget_gap")
