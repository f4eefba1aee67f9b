"""Where the real data in shared/ is, for tests that use it and skip cleanly without it.

shared/ sits beside the repository (`../shared` from the repo root); the environment variable RAVDESS_SHARED
overrides that location (it names the shared folder itself, the one holding `data/`).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the repository root, for every test that needs it


def shared_data_dir() -> Path | None:
    """`<shared>/data` (holding ravdess_speech_16k/, ravdess_clip_features/, fer2013_48/), or None if absent."""
    shared = Path(os.environ.get("RAVDESS_SHARED") or REPO.parent / "shared").expanduser()
    data = shared / "data"
    return data if data.is_dir() else None
