"""Writing run files safely: atomic replacement, one clear line on a full disk, one writer per run folder.

A run folder is the source of truth for a result, and folders are shared
(cluster homes, copied result trees), so two rules hold for every file the
benchmark writes into one:

* a file is replaced whole or not at all: written to a temporary file in the
  same folder, flushed to disk, then renamed over the old one; a failed write
  (a full disk) removes the temporary file and leaves the previous version;
* only one process trains into a folder at a time: :func:`run_folder_lock`.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import uuid
from pathlib import Path
from typing import Iterator

from manidp.errors import UserError

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_save", "run_folder_lock", "result_id", "RESULT_FILE"]

#: The run folder's own identity (a UUID written when the folder first holds a run): two folders trained
#: with the same flags are two results, never one MLflow run.
RESULT_FILE = "result.json"
_LOCK_FILE = ".manidp.lock"
_OWNER_FILE = ".manidp.owner"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically; a failure leaves the old file and no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left writing {path}; free some space and re-run the same command "
                            "(the previous version of the file is intact)") from None
        raise UserError(f"cannot write {path} ({err.strerror or err})") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` through memory, so a full disk is an ``OSError`` with its errno (torch's own file
    writer reports it as an unnamed RuntimeError)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def result_id(folder: str | Path) -> str:
    """The folder's result id, created on first use.

    A folder copied elsewhere (its file names another folder that still holds
    the same id) gets a fresh id, so the copy and the original never share one
    MLflow run; a folder that was moved keeps its id.
    """
    folder = Path(folder)
    record = folder / RESULT_FILE
    here = str(folder.resolve())
    try:
        saved = json.loads(record.read_text())
        known = str(saved["result_id"])
        origin = Path(saved.get("folder", here))
    except (OSError, ValueError, KeyError, TypeError):
        known, origin = None, None
    if known and (str(origin) == here or not _holds_result(origin, known)):
        if str(origin) != here:  # moved: record where it lives now
            atomic_write_text(record, json.dumps({"result_id": known, "folder": here}) + "\n")
        return known
    new = uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps({"result_id": new, "folder": here}) + "\n")
    return new


def _holds_result(folder: Path, rid: str) -> bool:
    try:
        return json.loads((folder / RESULT_FILE).read_text()).get("result_id") == rid
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def run_folder_lock(folder: str | Path) -> Iterator[None]:
    """Hold ``folder`` for this process while it trains there; a second process is refused at once.

    Only the first rank of a ``torchrun`` job takes it (every rank runs the
    same command on the same folder). The lock is an OS file lock, released
    when the process dies, so a killed run never leaves the folder blocked.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / _LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            owner = f"process {int((folder / _OWNER_FILE).read_text().strip())}"
        except (OSError, ValueError):
            owner = "another process"
        raise UserError(f"{folder} is in use by {owner}; wait for it to finish, or choose another --out") from None
    try:
        (folder / _OWNER_FILE).write_text(f"{os.getpid()}\n")
        yield
    finally:
        with contextlib.suppress(OSError):
            (folder / _OWNER_FILE).unlink()
        lock.release()
