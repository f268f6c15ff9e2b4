"""What every command module of the command line provides, and checks they share."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from manidp.errors import UserError

__all__ = ["Command", "check_device", "check_output_file"]


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, how to add its arguments and what it runs.

    ``internal`` commands are steps the workflow runs for itself: callable, but
    not in the top-level listing.
    """

    name: str
    help: str
    add_arguments: Callable
    run: Callable
    internal: bool = False


def check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available on this machine; use --device cpu")


def check_output_file(flag: str, path: Path) -> None:
    from manidp.config import can_write_in

    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give the file to write")
    existing = next(p for p in [*path.parents, Path(".")] if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, so nothing can be written below it")
    if not can_write_in(existing) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path}: cannot write there; choose a place you can write to")
