"""Atomic file writes shared by checkpoints, run folders, the data cache and the search outputs, and the removal of
the temporary files that killed writers leave."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable

import numpy as np

HOST = socket.gethostname()
STALE_TEMP_SECONDS = 3600  # s, a temp file this old is a dead writer's even when its owner cannot be checked


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_name(path: Path) -> Path:
    """The writer's own temp name for `path`: `<name>.<host>.<pid>.tmp`, so that a process never takes another's
    file for a dead one's (`is_stale_temp`), and parallel writers of one file (the folds of a cross-validation all
    write its config.json) never share one."""
    return path.with_name(f"{path.name}.{HOST}.{os.getpid()}.tmp")


def temp_writer(tmp: Path) -> int | None:
    """The pid that wrote `tmp` when it is a `temp_name` of this machine, else None."""
    stem, _, pid = tmp.name.removesuffix(".tmp").rpartition(".")
    return int(pid) if tmp.name.endswith(".tmp") and pid.isdigit() and stem.endswith(f".{HOST}") else None


def is_stale_temp(tmp: Path) -> bool:
    """True for a temp file whose writer is gone: its pid on this machine no longer exists, or it is older than
    STALE_TEMP_SECONDS (another machine's writer, or a name without an owner). A live writer's file is kept."""
    try:
        age = time.time() - tmp.stat().st_mtime
    except FileNotFoundError:  # its writer renamed it meanwhile
        return False
    pid = temp_writer(tmp)
    return (pid is not None and not process_alive(pid)) or age > STALE_TEMP_SECONDS


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temp files in `folder` of writers that are gone (killed runs); return them."""
    stale = [tmp for tmp in Path(folder).glob("*.tmp") if is_stale_temp(tmp)]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename it over `path`: a crash never leaves a
    half-written file under the real name. The temporary name is the process's own (`temp_name`); on any failure,
    Ctrl-C included, it is removed, and a killed writer's is removed by the next `remove_stale_temps` there."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """`np.savez` of `arrays` to `path` exactly (no ".npz" appended), through `atomic_write`."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, write)
