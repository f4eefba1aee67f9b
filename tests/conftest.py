"""Fixtures shared by every test: a synthetic RAVDESS in the real file format and its preprocessed cache.

    def test_something(synthetic_root, synthetic_cache): ...

`synthetic_root`: 4 actors (1-4) x 8 emotions x 2 takes, each take as 01- mp4 (160x120, 15 fps, 2 s, AAC sound),
02- mp4 (no sound) and 03- wav (48 kHz); `synthetic_cache`: that folder through prepare_cache (16 frames of
112x112, 64 x 361 log-mel), i.e. the real mp4 -> cache path. Both are built once per session; treat them as
read-only (copy them to tmp_path to modify). For a bigger cache without mp4 files, use
data.synthetic.make_synthetic_cache. Real data: `shared_data_dir()` in tests/shared_paths.py.
"""
from __future__ import annotations

import os

# One thread per test process, and threads that sleep instead of spinning while they wait: tests use tiny tensors
# that gain nothing from intra-op threads, and on a busy machine (shared CI) OpenMP's default spin-waiting makes
# 2-thread ops 5-20x slower. Set before torch is imported (OpenMP reads the variables once), and inherited by the
# scripts the tests start as subprocesses.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import importlib  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from data.preprocess import prepare_cache  # noqa: E402

torch.set_num_threads(1)
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


def imported_script(name: str) -> Iterator[ModuleType]:
    """For a fixture: the script `name` imported as a module; its UPPER_SNAKE constants, which tests set as
    --key=value would, are restored afterwards."""
    module = importlib.import_module(name)
    saved = {k: v for k, v in vars(module).items() if k.isupper()}
    yield module
    vars(module).update(saved)
