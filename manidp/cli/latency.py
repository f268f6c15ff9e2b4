"""The command that times deployed models: ``latency``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from manidp._files import atomic_write_text
from manidp.cli._command import Command
from manidp.errors import UserError
from manidp._defaults import DEFAULT_SLICE_CACHE_MB, DTYPE_NAMES

__all__ = ["COMMANDS"]


def _add_arguments(p) -> None:
    p.add_argument("run_dir", nargs="+", help="finished run folder(s) (each holds model.pt), timed one after "
                   "the other in this process against the same dense model")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES)
    p.add_argument("--instances", type=int, default=32, help="first N test instances (default 32)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--plan-instances", type=int, default=8,
                   help="first N validation instances the deployed form is planned and warmed on (default 8)")
    p.add_argument("--inductor", action=argparse.BooleanOptionalAction, default=True,
                   help="try torch.compile (Inductor, with freezing) as a dense-reference candidate on the CPU; "
                        "--no-inductor leaves it out (it compiles for seconds to a minute)")
    p.add_argument("--omp-wait-policy", choices=("active", "passive"),
                   help="how torch's idle OpenMP threads wait between operators: active spins (a core kept "
                        "for the timing, as latency deployments run), passive sleeps; sets OMP_WAIT_POLICY for "
                        "this process (default: the environment's, else the runtime's own)")
    p.add_argument("--dense", help="dense run folder whose weights the dense model uses")
    p.add_argument("--slice-cache-mb", type=float, default=DEFAULT_SLICE_CACHE_MB,
                   help=f"memory cap of the deployed form's weight-slice cache (default {DEFAULT_SLICE_CACHE_MB:g})")
    p.add_argument("--out", help="JSON file to write, for one run folder (default: print only)")
    p.add_argument("--out-name", help="file name to write inside each run folder (e.g. latency_cpu-2t.json); "
                   "several run folders need it")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text + "\n")  # a killed job never leaves half a report


def _run(args) -> int:
    if args.out and args.out_name:
        raise UserError("give --out (one run folder) or --out-name (a file in each run folder), not both")
    if args.out and len(args.run_dir) > 1:
        raise UserError(f"--out names one file but {len(args.run_dir)} run folders were given; "
                        f"use --out-name NAME to write NAME inside each run folder")
    if args.out_name and (Path(args.out_name).name != args.out_name or args.out_name in (".", "..")):
        raise UserError(f"--out-name {args.out_name}: give a file name, not a path (it is written inside each "
                        f"run folder)")
    # Every folder is checked before the first is timed: a typo fails in a second, not after minutes.
    for run_dir in args.run_dir:
        if not (Path(run_dir) / "model.pt").is_file():
            raise UserError(f"{run_dir}/model.pt not found: give finished run folders (manidp train writes them)")
    if args.omp_wait_policy:
        _set_wait_policy(args.omp_wait_policy)
    from manidp.latency import latency_report  # torch, timm and the gated blocks: only when timing

    dense_cache: dict = {}  # one dense model and reference for every run timed against it
    for run_dir in args.run_dir:
        report = latency_report(run_dir, args.device, args.threads, args.batch_size, args.dtype, args.instances,
                                args.repeats, args.warmup, args.dense, args.slice_cache_mb, dense_cache,
                                args.plan_instances, args.inductor)
        text = json.dumps(report, indent=2)
        if args.out:
            _write(Path(args.out), text)
        elif args.out_name:
            _write(Path(run_dir) / args.out_name, text)
        print(text)
    return 0


def _set_wait_policy(policy: str) -> None:
    """OMP_WAIT_POLICY for this process. The OpenMP runtime reads it once, when torch loads it: a caller
    that loaded torch already (in-process use) must set it in the environment instead."""
    if os.environ.get("OMP_WAIT_POLICY", "").lower() == policy:
        return
    if "torch" in sys.modules:
        raise UserError(f"--omp-wait-policy {policy}: torch is already loaded in this process, so its OpenMP "
                        f"runtime has read its wait policy; set OMP_WAIT_POLICY={policy.upper()} in the "
                        f"environment instead, or run manidp latency as its own command")
    os.environ["OMP_WAIT_POLICY"] = policy.upper()


COMMANDS = (
    Command("latency", "batch-1 latency of a run's deployed model vs its dense backbone", _add_arguments, _run),
)
