"""The Dataset over the cache and feature files, augmentation, and the builders (data/dataset.py)."""
import json
import shutil

import numpy as np
import pytest
import torch

from data.dataset import (IMAGENET_MEAN, IMAGENET_STD, AudioAugment, RavdessDataset, augment_frames, build_datasets,
                          load_features, make_loaders, spec_augment)
from data.ravdess import DataError, kfold_split, split_actors
from data.synthetic import make_synthetic_cache, takes_for


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """A small directly rendered cache: actors 1-6, 2 takes, 4 frames of 32x32."""
    return make_synthetic_cache(tmp_path_factory.mktemp("small"), actors=range(1, 7), takes=2, n_frames=4, size=32)


def write_features(path, takes, dim=5, nan_take=None, **overrides):
    names = [f"01-{t.name(3)[3:]}" for t in takes]
    rng = np.random.default_rng(0)
    data = {"names": np.array(names), "visual_au": rng.normal(3.0, 2.0, (len(names), dim)),
            "emotion": np.array([t.emotion for t in takes]), "actor": np.array([t.actor for t in takes])}
    if nan_take is not None:
        data["visual_au"][names.index(f"01-{nan_take}")] = np.nan
    data.update(overrides)
    np.savez(path, **data)
    return path


def test_sample_and_batch_follow_the_contract(synthetic_cache):
    ds = RavdessDataset(synthetic_cache)
    sample = ds[0]
    assert sample["audio"].shape == (1, 64, 361) and sample["audio"].dtype == torch.float32
    assert sample["frames"].shape == (16, 3, 112, 112) and sample["frames"].dtype == torch.float32
    assert sample["has_audio"].dtype == torch.bool and sample["has_audio"] and sample["has_visual"]
    assert sample["label"].dtype == torch.int64 and sample["actor"].dtype == torch.int64
    with np.load(synthetic_cache / "clips" / f"{sample['clip_id']}.npz") as z:
        raw = torch.from_numpy(z["frames"]).permute(0, 3, 1, 2).float() / 255
        assert torch.equal(sample["audio"][0], torch.from_numpy(z["logmel"]))
    assert torch.allclose(sample["frames"], (raw - IMAGENET_MEAN) / IMAGENET_STD, atol=1e-5)
    train, val, test = build_datasets(synthetic_cache, kfold_split(range(1, 5), n_folds=2, fold=0, n_val_actors=1))
    batch = next(iter(make_loaders(train, val, test, batch_size=4)[0]))
    assert batch["audio"].shape == (4, 1, 64, 361) and batch["frames"].shape == (4, 16, 3, 112, 112)
    assert batch["has_audio"].shape == (4,) and batch["has_visual"].dtype == torch.bool
    assert batch["label"].dtype == torch.int64 and len(batch["clip_id"]) == 4


def test_build_datasets_is_actor_disjoint_and_augments_train_only(small_cache):
    split = kfold_split(range(1, 7), n_folds=3, fold=1, n_val_actors=1)
    train, val, test = build_datasets(small_cache, split, spec_augment=True, frame_augment=True)
    assert test.actors == [3, 4] and val.actors == [5] and train.actors == [1, 2, 6]
    assert len(train) + len(val) + len(test) == 6 * 16
    assert train.spec_augment and train.frame_augment and not (val.spec_augment or test.frame_augment)
    with pytest.raises(DataError, match=r"no clips for the test actors \[21, 22, 23, 24\].*\[1, 2, 3, 4, 5, 6\]"):
        build_datasets(small_cache, split_actors(test_actors=[21, 22, 23, 24], actors=range(1, 25)))


def test_a_missing_modality_is_flagged_and_the_placeholder_is_zeros(small_cache, tmp_path):
    video_only = make_synthetic_cache(tmp_path / "v", actors=(1,), takes=1, n_frames=4, size=32,
                                      modalities=("video",))
    sample = RavdessDataset(video_only)[0]
    assert not sample["has_audio"] and sample["has_visual"]
    assert sample["audio"].shape == (1, 64, 361) and not sample["audio"].any()
    audio_view = RavdessDataset(small_cache, modalities=("audio",))[0]   # frames requested, visual switched off
    assert audio_view["has_audio"] and not audio_view["has_visual"] and not audio_view["frames"].any()
    no_visual = RavdessDataset(small_cache, visual=None)[0]
    assert "frames" not in no_visual and "features" not in no_visual and not no_visual["has_visual"]


def test_spec_augment_masks_with_the_mean_and_keeps_shape():
    torch.manual_seed(0)
    x = torch.randn(1, 64, 361)
    y = spec_augment(x, AudioAugment(freq_masks=2, time_masks=2, time_shift_seconds=0.0))
    assert y.shape == x.shape and not torch.equal(x, y) and torch.equal(x, x.clone())  # input untouched
    changed = y != x
    assert torch.allclose(y[changed], x.mean().expand(int(changed.sum())))


def test_frame_augmentation_is_the_same_for_every_frame_of_a_clip():
    torch.manual_seed(1)
    frame = torch.rand(1, 3, 32, 32)
    out = augment_frames(frame.repeat(4, 1, 1, 1))
    assert out.shape == (4, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    assert all(torch.equal(out[0], out[i]) for i in range(1, 4)) and not torch.equal(out[0], frame[0])


def test_feature_file_gives_standardised_visual_features_by_clip(small_cache, tmp_path):
    takes = takes_for(range(1, 7), takes=2)
    missing, broken = takes[0].name(3)[3:], takes[1].name(3)[3:]
    path = write_features(tmp_path / "au.npz", takes[2:] + [takes[1]], nan_take=broken)
    split = kfold_split(range(1, 7), n_folds=3, fold=0, n_val_actors=1)
    train, val, test = build_datasets(small_cache, split, features_file=path, visual="features")
    samples = {s["clip_id"]: s for s in (test[i] for i in range(len(test)))}
    assert samples[missing]["features"].shape == (5,) and not samples[missing]["has_visual"]
    assert not samples[broken]["has_visual"] and samples[broken]["has_audio"]
    assert all(s["has_visual"] for c, s in samples.items() if c not in (missing, broken))
    train_features = torch.stack([train[i]["features"] for i in range(len(train))])
    assert torch.allclose(train_features.mean(0), torch.zeros(5), atol=1e-4)   # train statistics only
    assert torch.allclose(train_features.std(0, unbiased=False), torch.ones(5), atol=1e-3)
    features_only = RavdessDataset(None, [2], features_file=path, visual="features")
    assert len(features_only) == 16 and not features_only[0]["has_audio"] and features_only[0]["has_visual"]


def test_feature_file_errors(tmp_path):
    takes = takes_for([1], takes=1)
    with pytest.raises(DataError, match="does not exist"):
        load_features(tmp_path / "none.npz")
    bad = write_features(tmp_path / "bad.npz", takes, emotion=np.array([2] + [t.emotion for t in takes[1:]]))
    with pytest.raises(DataError, match="row 0 is named 01-01-01-01-01-01-01 but has emotion 2"):
        load_features(bad)
    twice = write_features(tmp_path / "twice.npz", takes + takes[:1])
    with pytest.raises(DataError, match="two rows"):
        load_features(twice)
    with pytest.raises(DataError, match="'names' and 'visual_au'"):
        np.savez(tmp_path / "other.npz", x=np.zeros(3))
        load_features(tmp_path / "other.npz")


def test_unfinished_or_missing_cache_is_refused(small_cache, tmp_path):
    with pytest.raises(DataError, match="not a cache"):
        RavdessDataset(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(small_cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(DataError, match="incomplete"):
        RavdessDataset(copy)


def test_loaders_shuffle_reproducibly_and_avoid_a_last_batch_of_one(small_cache):
    train, val, test = build_datasets(small_cache, kfold_split(range(1, 7), n_folds=3, fold=0, n_val_actors=1))
    order = [[c for b in make_loaders(train, val, test, batch_size=7, seed=3)[0] for c in b["clip_id"]]
             for _ in range(2)]
    assert order[0] == order[1] and order[0] != sorted(order[0]) and len(order[0]) == len(train) == 48
    assert sum(len(b["label"]) for b in make_loaders(train, val, test, batch_size=47)[0]) == 47  # not 47 + 1
