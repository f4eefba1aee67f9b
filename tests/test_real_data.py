"""The pipeline on the real data in shared/ (RAVDESS speech audio of actors 1-20, OpenFace action units, FER2013
faces). Skipped when shared/ is absent (a fresh clone)."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from data.dataset import RavdessDataset, build_datasets
from data.preprocess import Settings, find_face, prepare_cache
from data.ravdess import discover_clips, kfold_split, split_actors
from tests.shared_paths import shared_data_dir

SHARED = shared_data_dir()
AUDIO = SHARED / "ravdess_speech_16k" if SHARED else None
AU = SHARED / "ravdess_clip_features" / "au_mfcc.npz" if SHARED else None
FER = SHARED / "fer2013_48" if SHARED else None


def need(path: Path | None) -> Path:
    if path is None or not path.exists():
        pytest.skip("real data not available (../shared or $RAVDESS_SHARED)")
    return path


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    """Log-mel cache of the real recordings of actors 1 and 2 (120 clips), built from links to the FLACs."""
    root = tmp_path_factory.mktemp("real_root")
    for actor in ("Actor_01", "Actor_02"):
        (root / actor).mkdir()
        for flac in (need(AUDIO) / actor).iterdir():
            (root / actor / flac.name).symlink_to(flac)
    cache = tmp_path_factory.mktemp("real_cache")
    summary = prepare_cache(root, cache, workers=0, progress=False, log=lambda _: None)
    return cache, summary


def test_real_audio_clips_and_five_actor_disjoint_folds():
    clips = discover_clips(need(AUDIO))
    assert len(clips) == 1200 and all(c.audio_file.suffix == ".flac" and c.video_source is None for c in clips)
    counts = np.bincount([c.label for c in clips])
    assert counts[0] == 80 and all(counts[1:] == 160)
    folds = [kfold_split(range(1, 21), n_folds=5, fold=k) for k in range(5)]
    assert sorted(a for f in folds for a in f.test) == list(range(1, 21))
    for k, split in enumerate(folds):
        assert split.test == tuple(range(4 * k + 1, 4 * k + 5))
        parts = {part: {c.clip_id for c in clips if c.actor in getattr(split, part)}
                 for part in ("train", "val", "test")}
        assert len(parts["test"]) == 240 and not (parts["train"] & parts["test"] or parts["val"] & parts["test"])


def test_real_audio_preprocesses_without_failures(real_cache):
    cache, summary = real_cache
    assert summary.failures == [] and (summary.n_audio, summary.n_video) == (120, 0)
    ds = RavdessDataset(cache, visual=None)
    sample = ds[0]
    assert sample["audio"].shape == (1, 64, 361) and sample["has_audio"] and not sample["has_visual"]
    assert -14 < float(sample["audio"].min()) and float(sample["audio"].max()) < 10  # log of power in [-1, 1]


def test_real_action_units_join_the_audio_cache_by_take(real_cache):
    cache, _ = real_cache
    train, _, test = build_datasets(cache, split_actors(test_actors=[2], actors=[1, 2]), features_file=need(AU),
                                    visual="features")
    assert (len(train), len(test)) == (60, 60)
    sample = test[0]
    assert sample["features"].shape == (35,) and sample["has_visual"] and sample["has_audio"]
    assert all(test[i]["has_visual"] for i in range(len(test)))
    features_only = RavdessDataset(None, range(1, 21), features_file=need(AU), visual="features")
    assert len(features_only) == 1200 and not features_only[0]["has_audio"]


def test_real_faces_are_found_and_centred():
    """FER2013 faces (tight 48x48 crops) enlarged into a 1280x720 frame, as a RAVDESS speaker would be."""
    files = sorted((need(FER) / "val" / "neutral").glob("*.png"))[:30]
    rng = np.random.default_rng(0)
    found = 0
    for path in files:
        side = int(rng.uniform(220, 320))
        frame = np.full((720, 1280, 3), 128, np.uint8)
        x0, y0 = 640 - side // 2 + int(rng.integers(-150, 150)), 360 - side // 2 + int(rng.integers(-80, 80))
        frame[y0:y0 + side, x0:x0 + side] = cv2.resize(cv2.imread(str(path)), (side, side),
                                                       interpolation=cv2.INTER_CUBIC)
        box = find_face([frame] * 4, Settings())
        if box is not None:
            found += 1
            cx, cy, box_side = box
            assert abs(cx - (x0 + side / 2)) < 0.25 * side and abs(cy - (y0 + side / 2)) < 0.25 * side
            assert 0.4 * side < box_side < 1.6 * side  # the box may take in some of the flat surround
    assert found >= 10  # tight crops lack the head outline Haar likes; RAVDESS frames show the whole head
