"""Preprocessing into the cache (data/preprocess.py, data/prepare_ravdess.py): the real mp4 -> cache path on the
synthetic fixture, audio/video-only data, each kind of bad input, resuming, workers and the script."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf

from common import files
from data import preprocess
from data.dataset import load_manifest
from data.preprocess import (Settings, audio_features, crop_box, find_face, fix_length, prepare_cache,
                             sample_frame_indices)
from data.ravdess import DataError
from data.synthetic import Take, draw_face, render_audio
from tests.shared_paths import REPO

TAKE = "01-03-01-01-01-01"  # actor 1, happy: present in the synthetic fixture as 01-, 02- and 03- files


def quiet(_: str) -> None:
    pass


def prepare(root: Path, cache: Path, **kw) -> preprocess.Summary:
    return prepare_cache(root, cache, workers=0, progress=False, log=quiet, **kw)


def entries(cache: Path) -> dict[str, dict]:
    return {e["clip_id"]: e for e in json.loads((cache / "manifest.json").read_text())["clips"]}


def copy_take(src_root: Path, dst: Path, take: str, modalities: str = "123", actor_dir: str = "Actor_01") -> None:
    for m in modalities:
        ext = "wav" if m == "3" else "mp4"
        src = src_root / actor_dir / f"0{m}-{take}.{ext}"
        (dst / actor_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst / actor_dir / src.name)


# ----------------------------------------------------------------------------------------------- the real path

def test_cache_from_synthetic_mp4_has_one_sample_per_take(synthetic_cache):
    manifest = load_manifest(synthetic_cache)
    clips = manifest["clips"]
    assert len(clips) == 4 * 8 * 2 and manifest["failures"] == []  # 01- and 02- mp4 + 03- wav -> one clip
    assert all(e["has_audio"] and e["has_video"] and e["face_found"] for e in clips)
    e = entries(synthetic_cache)[TAKE]
    assert e["audio_source"] == f"Actor_01/03-{TAKE}.wav" and e["video_source"] == f"Actor_01/01-{TAKE}.mp4"
    assert (e["label"], e["actor"]) == (2, 1)
    with np.load(synthetic_cache / "clips" / f"{TAKE}.npz") as z:
        assert z["logmel"].shape == (64, 361) and z["logmel"].dtype == np.float32
        assert np.isfinite(z["logmel"]).all()
        assert z["frames"].shape == (16, 112, 112, 3) and z["frames"].dtype == np.uint8
        frames = z["frames"]
    # The crop is centred on the face: skin (not background) at the centre, in RGB order.
    centre = frames[:, 40:72, 40:72].reshape(-1, 3).mean(0)
    assert centre[0] > centre[2]  # the synthetic skin tones are red-heavy; the backgrounds are not all


def test_find_face_locates_a_drawn_face_and_reports_none_without_one():
    frame = np.full((360, 640, 3), 110, np.uint8)
    draw_face(frame, 420, 170, 80, (140, 170, 220), (30, 30, 40), [0.0] * 6)
    cx, cy, side = find_face([frame] * 4, Settings())
    assert abs(cx - 420) < 15 and abs(cy - 170) < 25 and 80 < side < 220
    assert find_face([np.full((360, 640, 3), 110, np.uint8)] * 4, Settings()) is None
    x0, y0, s = crop_box((360, 640), (630, 10, 200), 1.25)  # face at the corner: shifted inside, not shrunk
    assert (x0 + s, y0, s) == (640, 0, 250)
    assert crop_box((360, 640), None, 1.25) == (140, 0, 360)  # centre crop


def test_frames_and_audio_cover_the_same_centred_window():
    idx = sample_frame_indices(150, 30.0, 4, 3.6)  # 5 s video: window 0.7-4.3 s
    assert list(idx) == [int((0.7 + (k + 0.5) * 0.9) * 30) for k in range(4)]
    wave = np.arange(5 * 100, dtype=np.float32)  # 5 s at 100 Hz: the crop keeps 0.7-4.3 s
    assert fix_length(wave, 360)[0] == 70
    padded = fix_length(np.ones(10, np.float32), 14)
    assert list(padded) == [0, 0] + [1] * 10 + [0, 0]
    assert list(sample_frame_indices(3, 30.0, 6, 3.6)) == [0, 0, 1, 1, 2, 2]  # shorter than N frames


def test_stereo_48k_audio_equals_its_mono_16k_version(tmp_path):
    wave = render_audio(Take(1, 5, 2, 1, 1), 2.0, 48000)
    sf.write(tmp_path / "mono48.wav", wave, 48000, subtype="PCM_16")
    sf.write(tmp_path / "stereo48.wav", np.stack([wave, wave], 1), 48000, subtype="PCM_16")
    sf.write(tmp_path / "mono16.flac", render_audio(Take(1, 5, 2, 1, 1), 2.0, 16000), 16000)
    mono, stereo, low = (audio_features(tmp_path / n, Settings()) for n in ("mono48.wav", "stereo48.wav",
                                                                              "mono16.flac"))
    assert np.allclose(mono, stereo, atol=1e-4)
    voiced = mono > -8  # compare where there is sound; the 16 kHz render differs only in its noise draw
    assert np.corrcoef(mono[voiced], low[voiced])[0, 1] > 0.9


def test_sound_track_of_the_mp4_is_used_without_wav_and_matches_it(synthetic_root, synthetic_cache, tmp_path):
    copy_take(synthetic_root, tmp_path / "root", TAKE, "1")
    prepare(tmp_path / "root", tmp_path / "cache")
    e = entries(tmp_path / "cache")[TAKE]
    assert e["has_audio"] and e["audio_source"] == f"Actor_01/01-{TAKE}.mp4"
    with np.load(tmp_path / "cache/clips" / f"{TAKE}.npz") as a, np.load(synthetic_cache / f"clips/{TAKE}.npz") as b:
        from_mp4, from_wav = a["logmel"], b["logmel"]
    voiced = from_wav > -8  # AAC vs PCM of the same take
    assert np.corrcoef(from_mp4[voiced], from_wav[voiced])[0, 1] > 0.9


def test_audio_only_and_video_only_data_mark_the_missing_modality_absent(synthetic_root, tmp_path):
    copy_take(synthetic_root, tmp_path / "audio", TAKE, "3")
    copy_take(synthetic_root, tmp_path / "video", TAKE, "2")
    audio = prepare(tmp_path / "audio", tmp_path / "ca")
    video = prepare(tmp_path / "video", tmp_path / "cv")
    assert (audio.n_audio, audio.n_video, video.n_audio, video.n_video) == (1, 0, 0, 1)
    with np.load(tmp_path / "ca/clips" / f"{TAKE}.npz") as z:
        assert "frames" not in z.files and "logmel" in z.files
    with np.load(tmp_path / "cv/clips" / f"{TAKE}.npz") as z:
        assert "logmel" not in z.files and "frames" in z.files
    e = entries(tmp_path / "cv")[TAKE]
    assert not e["has_audio"] and e["has_video"] and e["notes"] == []  # a 02- file has no sound by design
    # Asking for audio only from the same files: the video is not decoded.
    prepare(tmp_path / "audio", tmp_path / "ca2", modalities=("audio",))
    assert not entries(tmp_path / "ca2")[TAKE]["has_video"]


# ------------------------------------------------------------------------------------------------ bad input

def write_video(path: Path, frames: int = 20, face: bool = False) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 15, (160, 120))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        frame = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
        if face:
            draw_face(frame, 80, 60, 35, (140, 170, 220), (30, 30, 40), [0.0] * 6)
        writer.write(frame)
    writer.release()


@pytest.fixture(scope="module")
def bad_root(synthetic_root, tmp_path_factory):
    """One folder with a clip for each kind of bad input (actor 5) beside one good take (actor 1)."""
    root = tmp_path_factory.mktemp("bad")
    copy_take(synthetic_root, root, TAKE)
    bad = root / "Actor_05"
    bad.mkdir()
    good_mp4 = synthetic_root / "Actor_01" / f"01-{TAKE}.mp4"
    wave = render_audio(Take(5, 1, 1, 1, 1), 2.0, 48000)
    (bad / "01-01-01-01-01-01-05.mp4").write_bytes(os.urandom(4000))                       # corrupt mp4
    sf.write(bad / "03-01-01-01-01-01-05.wav", wave, 48000)
    (bad / "01-01-02-01-01-01-05.mp4").write_bytes(good_mp4.read_bytes()[:len(good_mp4.read_bytes()) // 2])
    faststart = bad / "faststart.tmp.mp4"                                                    # moov first, cut data
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(good_mp4), "-c", "copy", "-movflags", "+faststart",
                    str(faststart)], check=True)
    (bad / "01-01-03-01-01-01-05.mp4").write_bytes(faststart.read_bytes()[:faststart.stat().st_size // 2])
    sf.write(bad / "03-01-03-01-01-01-05.wav", wave, 48000)
    faststart.unlink()
    shutil.copy(synthetic_root / "Actor_01" / f"02-{TAKE}.mp4", bad / "01-01-04-01-01-01-05.mp4")  # no sound track
    sf.write(bad / "03-01-05-01-01-01-05.wav", np.zeros(0, np.float32), 48000)               # zero-length, alone
    sf.write(bad / "03-01-06-01-01-01-05.wav", np.zeros(48000, np.float32), 48000)           # silent, with video
    write_video(bad / "01-01-06-01-01-01-05.mp4", face=True)
    (bad / "03-01-07-01-01-01-05.wav").write_bytes(b"")                                      # 0-byte file
    write_video(bad / "02-01-08-01-01-01-05.mp4")                                            # face never found
    (bad / "03-01-08-01-01-01-05.wav").write_bytes((root / "Actor_01" / f"03-{TAKE}.wav").read_bytes())
    (bad / "03-01-09-01-01-01-05.wav").write_bytes(b"")                                      # malformed name
    return root


@pytest.fixture(scope="module")
def bad_result(bad_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("bad_cache")
    return prepare(bad_root, cache), cache


def test_bad_inputs_are_failures_with_reasons_or_notes_never_a_crash(bad_result):
    summary, cache = bad_result
    failures = dict(summary.failures)
    assert failures.keys() == {"01-02-01-01-01-05", "01-05-01-01-01-05", "01-07-01-01-01-05"}
    # truncated with the index at the end, and no wav: ffmpeg cannot even open it, for the sound or the frames
    assert "cannot read 01-01-02-01-01-01-05.mp4: Invalid data" in failures["01-02-01-01-01-05"]
    assert "zero-length" in failures["01-05-01-01-01-05"]                        # nothing else to use
    assert "cannot read" in failures["01-07-01-01-01-05"]                        # empty file
    assert not any((cache / "clips" / f"{c}.npz").exists() for c in failures)
    assert summary.n_clips == 9 and len(entries(cache)) == 6
    assert len(summary.skipped_files) == 1 and "03-01-09-01-01-01-05.wav" in summary.skipped_files[0][0]
    manifest = load_manifest(cache)
    assert {f["clip_id"] for f in manifest["failures"]} == failures.keys()


def test_an_unreadable_mp4_costs_only_the_video_of_its_take(bad_result):
    """Issue 26: a take whose mp4 is corrupt or truncated keeps its good wav (an audio-only run used to lose it)."""
    summary, cache = bad_result
    e = entries(cache)
    corrupt, truncated = e["01-01-01-01-01-05"], e["01-03-01-01-01-05"]
    assert corrupt["has_audio"] and not corrupt["has_video"] and corrupt["face_found"] is None
    assert corrupt["notes"] == ["video absent: cannot open video 01-01-01-01-01-01-05.mp4 (corrupt, truncated or "
                                "not a video)"]
    assert truncated["has_audio"] and not truncated["has_video"]
    assert "video absent:" in truncated["notes"][0] and "ended after" in truncated["notes"][0]
    with np.load(cache / "clips/01-01-01-01-01-05.npz") as z:
        assert "logmel" in z.files and "frames" not in z.files  # absent, not zero-filled
    assert "video absent: cannot open video" in str(summary)


def test_missing_sound_and_missing_face_are_marked_and_listed(bad_result):
    summary, cache = bad_result
    e = entries(cache)
    no_track, silent, no_face = e["01-04-01-01-01-05"], e["01-06-01-01-01-05"], e["01-08-01-01-01-05"]
    assert not no_track["has_audio"] and no_track["has_video"] and "no sound track" in no_track["notes"][0]
    assert not silent["has_audio"] and silent["has_video"] and "silent" in silent["notes"][0]
    assert no_face["has_audio"] and no_face["face_found"] is False
    with np.load(cache / "clips/01-04-01-01-01-05.npz") as z:
        assert "logmel" not in z.files  # absent, not zero-filled
    text = str(summary)
    assert "no face found: centre crop" in text and "01-08-01-01-01-05" in text and "clips/s" in text
    assert "3 failures" in text and "skipped files (1)" in text


def test_missing_root_and_root_without_ravdess_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "nope", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no RAVDESS files"):
        prepare(tmp_path / "empty", tmp_path / "cache")
    with pytest.raises(DataError, match="modalities"):
        prepare(tmp_path / "empty", tmp_path / "cache", modalities=("sound",))


# ---------------------------------------------------------------------------------------------- resume, workers

def test_rerun_skips_finished_clips_and_redoes_missing_ones(synthetic_root, tmp_path):
    for take in (TAKE, "01-04-01-01-01-01"):
        copy_take(synthetic_root, tmp_path / "root", take)
    cache = tmp_path / "cache"
    assert prepare(tmp_path / "root", cache).n_new == 2
    (cache / "clips" / f"{TAKE}.npz").unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (cache / "clips" / f"{TAKE}.npz.{files.HOST}.{int(dead.stdout)}.tmp").write_bytes(b"half")  # killed run's
    again = prepare(tmp_path / "root", cache)
    assert (again.n_new, again.n_cached) == (1, 1) and not list((cache / "clips").glob("*.tmp"))
    with pytest.raises(DataError, match="other settings.*size: 112 -> 64"):
        prepare(tmp_path / "root", cache, size=64)
    with pytest.raises(DataError, match="other settings.*seconds: 3.6 -> 3.0"):
        prepare(tmp_path / "root", cache, seconds=3.0)


def test_frame_settings_do_not_invalidate_a_cache_without_video(synthetic_root, tmp_path):
    copy_take(synthetic_root, tmp_path / "root", TAKE, "3")
    prepare(tmp_path / "root", tmp_path / "cache")
    assert prepare(tmp_path / "root", tmp_path / "cache", size=64, n_frames=8).n_cached == 1


def test_interrupted_run_leaves_no_partial_file_and_resumes(synthetic_root, tmp_path, monkeypatch):
    takes = [TAKE, "01-04-01-01-01-01", "01-05-01-01-01-01"]
    for take in takes:
        copy_take(synthetic_root, tmp_path / "root", take, "3")
    cache, real_write, calls = tmp_path / "cache", np.savez, []

    def savez_then_interrupt(file, **arrays):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C in the middle of writing the second clip
            file.write(b"partial")
            raise KeyboardInterrupt
        real_write(file, **arrays)

    monkeypatch.setattr(preprocess.np, "savez", savez_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "root", cache)
    monkeypatch.undo()
    assert [p.name for p in (cache / "clips").iterdir()] == [f"{TAKE}.npz"]
    with pytest.raises(DataError, match="incomplete"):
        load_manifest(cache)
    summary = prepare(tmp_path / "root", cache)
    assert (summary.n_cached, summary.n_new) == (1, 2) and load_manifest(cache)["complete"]
    assert not list((cache / "clips").glob("*.tmp"))


def test_script_with_worker_processes_matches_in_process_result(synthetic_root, synthetic_cache, tmp_path):
    for take in (TAKE, "01-04-01-01-01-01", "01-05-01-01-01-02"):
        copy_take(synthetic_root, tmp_path / "root", take, "13", actor_dir=f"Actor_0{take[-1]}")
    cmd = [sys.executable, str(REPO / "data/prepare_ravdess.py"), f"--root={tmp_path / 'root'}",
           f"--cache={tmp_path / 'cache'}", "--workers=2", "--progress=False"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "3 clips ready (3 new, 0 already cached), 0 failures" in run.stdout and "clips/s" in run.stdout
    for take in ("01-04-01-01-01-01", "01-05-01-01-01-02"):
        with np.load(tmp_path / "cache/clips" / f"{take}.npz") as a, \
                np.load(synthetic_cache / "clips" / f"{take}.npz") as b:
            assert np.array_equal(a["frames"], b["frames"]) and np.allclose(a["logmel"], b["logmel"], atol=1e-4)
    bad = subprocess.run(cmd[:2] + [f"--root={tmp_path / 'nope'}"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: data root")


def test_rerun_on_a_finished_cache_leaves_the_manifest_untouched(synthetic_root, tmp_path):
    """Folds started as parallel processes all call prepare_cache on one finished cache: no rewrite, no race."""
    import shutil

    from data.preprocess import prepare_cache

    root = tmp_path / "root"
    shutil.copytree(synthetic_root / "Actor_01", root / "Actor_01")
    cache = tmp_path / "cache"
    prepare_cache(root, cache, workers=0, progress=False, log=lambda _: None)
    manifest = cache / "manifest.json"
    before = manifest.stat().st_mtime_ns
    summary = prepare_cache(root, cache, workers=0, progress=False, log=lambda _: None)
    assert summary.n_new == 0 and manifest.stat().st_mtime_ns == before
