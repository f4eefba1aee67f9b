"""Data problems say their real cause (a file given as DATA_ROOT, a cache in which every clip failed), and the
preprocessing workers do not outlive their parent."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.preprocess import prepare_cache
from data.ravdess import DataError
from data.setup import DataSettings, make_split, prepare_data
from tests.shared_paths import REPO


def script_settings(**values) -> DataSettings:
    """train_simple_working.py's data settings (its constants, passed by keyword) with `values` changed."""
    import dataclasses

    import train_simple_working

    return dataclasses.replace(train_simple_working.data_settings(), **values)


def test_data_root_that_is_a_file_is_named_a_file(tmp_path):
    wav = tmp_path / "03-01-03-01-01-01-01.wav"
    wav.write_bytes(b"")
    with pytest.raises(DataError, match="DATA_ROOT .* is a file: give the folder"):
        prepare_data(script_settings(dataset="ravdess", data_root=str(wav), output_dir=str(tmp_path)))


def test_a_cache_whose_clips_all_failed_says_so_not_that_the_actor_list_is_empty(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("03-01-03-01-01-01-01.wav", "03-01-05-01-01-01-02.wav"):
        (root / name).write_bytes(b"not a sound file")
    prepare_cache(root, tmp_path / "cache", workers=0, progress=False, log=lambda _: None)
    with pytest.raises(DataError, match=r"holds no usable clip: all 2 clips failed in preprocessing \(e\.g\. "
                                        r"01-03-01-01-01-01: cannot read"):
        make_split(tmp_path / "cache", "auto", n_folds=2, fold=0, n_val_actors=0)


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def test_preprocessing_workers_end_with_a_killed_parent(synthetic_root, tmp_path):
    code = ("import sys; from data.preprocess import prepare_cache; "
            "prepare_cache(sys.argv[1], sys.argv[2], workers=2, progress=False)")
    parent = subprocess.Popen([sys.executable, "-c", code, str(synthetic_root), str(tmp_path / "cache")],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not any((tmp_path / "cache" / "clips").glob("*.npz")):
            time.sleep(0.1)  # the workers are running once the first clip is written
        workers = [pid for pid in _children(parent.pid) if _alive(pid)]
        assert workers, "the pool never started"
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)]


def test_quick_start_media_are_deleted_once_cached_and_preprocessing_has_its_own_worker_count(tmp_path,
                                                                                              monkeypatch):
    import data.setup as setup

    calls = []
    real_prepare = setup.prepare_cache
    monkeypatch.setattr(setup, "SYNTHETIC_ACTORS", (1, 2))
    monkeypatch.setattr(setup, "prepare_cache",
                        lambda *args, **kwargs: calls.append(kwargs["workers"]) or real_prepare(*args, **kwargs))
    # NUM_WORKERS=0 (DataLoader in the main process) must not mean "preprocess on every CPU".
    settings = script_settings(output_dir=str(tmp_path), num_workers=0, prepare_workers=1)
    cache = prepare_data(settings)
    assert calls == [1] and json.loads((cache / "manifest.json").read_text())["complete"]
    assert not (tmp_path / "synthetic_ravdess").exists()  # ~100 MB of generated media not left behind
    monkeypatch.setattr(setup, "make_synthetic_ravdess", lambda *a, **k: pytest.fail("regenerated"))
    assert prepare_data(settings) == cache and calls == [1]
