"""Atomic file writes shared by checkpoints, run folders, the data cache and the search outputs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename it over `path`: a crash never leaves a
    half-written file under the real name. The temporary name is the process's own, because parallel processes
    write the same file (the folds of one cross-validation all write its config.json); on any failure, Ctrl-C
    included, the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))
