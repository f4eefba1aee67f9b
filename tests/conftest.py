"""Fixtures shared by every test: a synthetic RAVDESS in the real file format and its preprocessed cache.

    def test_something(synthetic_root, synthetic_cache): ...

`synthetic_root`: 4 actors (1-4) x 8 emotions x 2 takes, each take as 01- mp4 (160x120, 15 fps, 2 s, AAC sound),
02- mp4 (no sound) and 03- wav (48 kHz); `synthetic_cache`: that folder through prepare_cache (16 frames of
112x112, 64 x 361 log-mel), i.e. the real mp4 -> cache path. Both are built once per session; treat them as
read-only (copy them to tmp_path to modify). For a bigger cache without mp4 files, use
data.synthetic.make_synthetic_cache. Real data: `shared_data_dir()` in tests/shared_paths.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from data.preprocess import prepare_cache
from data.synthetic import make_synthetic_ravdess

SYNTHETIC_ACTORS = (1, 2, 3, 4)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic_ravdess")
    make_synthetic_ravdess(root, actors=SYNTHETIC_ACTORS, takes=2)
    return root


@pytest.fixture(scope="session")
def synthetic_cache(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("synthetic_cache")
    prepare_cache(synthetic_root, cache, workers=0, progress=False, log=lambda _: None)
    return cache
