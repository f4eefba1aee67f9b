"""Several processes preparing one cache (data/preprocess.py, data/prepare_ravdess.py): they take turns through the
cache's lock, a temp file is removed only when its writer is gone, and a clip the cache cannot take stops the run
with an error naming it. tune.py's side (two searches on one empty folder) is in tests/test_tune.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common import files
from data import preprocess
from data.dataset import load_manifest
from data.ravdess import DataError
from tests.shared_paths import REPO
from tests.test_preprocess import copy_take, prepare

TAKES = ("01-03-01-01-01-01", "01-04-01-01-01-01", "01-05-01-01-01-01", "01-03-02-01-01-01", "01-01-01-02-01-01")

# prepare_ravdess.py whose first clip's temp file, once written, stays until the file $RELEASE exists: a second
# process started meanwhile meets a temp file that is being written (the case that lost clips in issue 26).
HELD_WRITE = '''
import os, runpy, sys, time
sys.path.insert(0, {repo!r})
import numpy
_savez, _held = numpy.savez, []


def held_savez(file, *args, **arrays):
    _savez(file, *args, **arrays)
    file.flush()
    deadline = time.time() + 120
    while not _held and not os.path.exists(os.environ["RELEASE"]) and time.time() < deadline:
        time.sleep(0.05)
    _held.append(1)


numpy.savez = held_savez
sys.argv = ["prepare_ravdess.py", *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
'''


def make_root(synthetic_root: Path, root: Path, takes: tuple[str, ...] = TAKES) -> Path:
    for take in takes:
        copy_take(synthetic_root, root, take, "13")  # the mp4 with sound and the wav, as RAVDESS has them
    return root


def prepare_command(root: Path, cache: Path, *extra: str) -> list[str]:
    return [f"--root={root}", f"--cache={cache}", "--progress=False", *extra]


def test_two_processes_prepare_one_new_cache_and_both_have_every_clip(synthetic_root, synthetic_cache, tmp_path):
    root, cache = make_root(synthetic_root, tmp_path / "root"), tmp_path / "cache"
    release = tmp_path / "release"
    code = HELD_WRITE.format(repo=str(REPO), script=str(REPO / "data/prepare_ravdess.py"))
    args = prepare_command(root, cache, "--workers=0")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RELEASE": str(release)}
    first = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env)
    deadline = time.time() + 60
    while not list((cache / "clips").glob("*.tmp")):  # the first process is writing its first clip
        assert first.poll() is None and time.time() < deadline, first.communicate()[0]
        time.sleep(0.02)
    second = subprocess.Popen([sys.executable, str(REPO / "data/prepare_ravdess.py"), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in second.stdout:  # until it waits for the first (or, unlocked, has finished on its own)
        seen.append(line)
        if "waiting for another process" in line:
            break
    release.touch()
    outputs = [first.communicate(timeout=120)[0], "".join(seen) + second.communicate(timeout=120)[0]]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    assert f"{len(TAKES)} clips ready ({len(TAKES)} new, 0 already cached), 0 failures" in outputs[0], outputs
    assert f"waiting for another process to finish preparing {cache} ..." in outputs[1], outputs[1]
    assert outputs[1].count("waiting for another process") == 1
    assert f"{len(TAKES)} clips ready (0 new, {len(TAKES)} already cached), 0 failures" in outputs[1], outputs[1]

    manifest = load_manifest(cache)
    assert manifest["complete"] and manifest["failures"] == []
    assert sorted(e["clip_id"] for e in manifest["clips"]) == sorted(TAKES)
    assert sorted(p.name for p in (cache / "clips").iterdir()) == sorted(f"{t}.npz" for t in TAKES)  # no temp left
    for take in TAKES:  # the same content as one process alone writes
        with np.load(cache / "clips" / f"{take}.npz") as a, np.load(synthetic_cache / "clips" / f"{take}.npz") as b:
            assert json.loads(str(a["meta"])) == json.loads(str(b["meta"]))
            assert np.array_equal(a["frames"], b["frames"]) and np.allclose(a["logmel"], b["logmel"], atol=1e-4)


def test_only_the_temp_files_of_gone_writers_are_removed(synthetic_root, tmp_path):
    root, cache = make_root(synthetic_root, tmp_path / "root", TAKES[:1]), tmp_path / "cache"
    clips = cache / "clips"
    clips.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    temps = {"dead": f"{TAKES[1]}.npz.{files.HOST}.{int(dead.stdout)}.tmp",  # its process has exited
             "live": f"{TAKES[2]}.npz.{files.HOST}.{os.getpid()}.tmp",  # this process: still writing
             "elsewhere": f"{TAKES[3]}.npz.other-machine.example.org.{os.getpid()}.tmp",  # can't be checked: young
             "old": f"{TAKES[4]}.npz.other-machine.example.org.12.tmp",  # older than STALE_TEMP_SECONDS
             "unowned": "stale.123.tmp"}  # a name without an owner (an older version's), old
    for name in temps.values():
        (clips / name).write_bytes(b"half")
    hours_ago = time.time() - 2 * files.STALE_TEMP_SECONDS
    for kind in ("old", "unowned"):
        os.utime(clips / temps[kind], (hours_ago, hours_ago))
    assert files.temp_writer(clips / temps["dead"]) == int(dead.stdout)
    assert files.temp_writer(clips / temps["elsewhere"]) is None  # another machine's pid says nothing here

    prepare(root, cache)
    left = {kind for kind, name in temps.items() if (clips / name).exists()}
    assert left == {"live", "elsewhere"}
    assert (clips / f"{TAKES[0]}.npz").exists()


def test_a_clip_the_cache_cannot_take_fails_the_run_naming_it(synthetic_root, tmp_path):
    root, cache = make_root(synthetic_root, tmp_path / "root", TAKES[:3]), tmp_path / "cache"
    # A folder where the clip's file must go: its rename fails (IsADirectoryError), as a full disk's write would.
    (cache / "clips" / f"{TAKES[1]}.npz").mkdir(parents=True)
    command = [sys.executable, str(REPO / "data/prepare_ravdess.py"), *prepare_command(root, cache, "--workers=2")]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode != 0, run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and TAKES[1] in errors[0] and "could not write" in errors[0], run.stderr
    assert "Traceback" not in run.stderr
    with pytest.raises(DataError, match="incomplete"):  # no training run takes this cache as finished
        load_manifest(cache)
    assert not list((cache / "clips").glob("*.tmp"))
