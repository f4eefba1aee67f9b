"""Person calibration (data/calibration.py): statistics per person from that person's clips only, no label in them
(except the neutral mode's pick), K clips means K, test persons never in training, profiles through predict.py,
and a model trained with calibration predicting with and without a profile."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from data.calibration import (NEUTRAL_LABEL, PRIOR_CLIPS, CalibrationSettings, PersonProfile, calibration_indices,
                              profile_from_inputs)
from data.dataset import build_datasets
from data.ravdess import DataError, Split
from tests.conftest import imported_script
from tests.shared_paths import REPO, shared_data_dir

ALL = CalibrationSettings(mode="person", clips=0, source="any", seed=0)
N_DIMS = 8  # one feature dimension per emotion


def person_feature_file(path: Path, actors=range(1, 7), offset_scale: float = 10.0, seed: int = 0,
                        changed_actor: int | None = None) -> Path:
    """Per-clip features of several people: each person has a large offset and scale of their own; the emotion is
    a small bump on one dimension relative to that person's range. `changed_actor`'s rows are scrambled."""
    rng = np.random.default_rng(seed)
    names, rows = [], []
    for actor in actors:
        offset, scale = rng.normal(0, offset_scale, N_DIMS), rng.uniform(0.5, 3.0, N_DIMS)
        for emotion in range(1, 9):
            for statement in (1, 2):
                for repetition in (1, 2):
                    signal = np.eye(N_DIMS)[emotion - 1] * 2.0 + rng.normal(0, 0.2, N_DIMS)
                    row = offset + scale * signal
                    if actor == changed_actor:
                        row = rng.normal(0, 100, N_DIMS)
                    names.append(f"01-01-{emotion:02d}-01-{statement:02d}-{repetition:02d}-{actor:02d}")
                    rows.append(row)
    np.savez(path, names=np.array(names), visual_au=np.array(rows, np.float32))
    return path


def features_split(feature_file: Path, calibration: CalibrationSettings | None, test=(5, 6), val=()):
    train_actors = [a for a in range(1, 7) if a not in test and a not in val]
    split = Split(train=tuple(train_actors), val=tuple(val), test=tuple(test))
    return build_datasets(None, split, features_file=feature_file, modalities=("visual",), visual="features",
                          calibration=calibration)


def nearest_centroid_accuracy(train, test) -> float:
    x_train = torch.stack([train[i]["features"] for i in range(len(train))]).numpy()
    y_train = np.array(train.labels)
    centroids = np.stack([x_train[y_train == c].mean(0) for c in range(8)])
    x_test = torch.stack([test[i]["features"] for i in range(len(test))]).numpy()
    predicted = np.argmin(((x_test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    return float((predicted == np.array(test.labels)).mean())


def test_calibration_removes_the_difference_between_people(tmp_path):
    """People with their own offsets: a classifier of the training people fails on new ones without calibration and
    succeeds with it."""
    file = person_feature_file(tmp_path / "features.npz")
    train, _, test = features_split(file, None)
    uncalibrated = nearest_centroid_accuracy(train, test)
    train, _, test = features_split(file, ALL)
    calibrated = nearest_centroid_accuracy(train, test)
    assert uncalibrated < 0.5 and calibrated > 0.95, (uncalibrated, calibrated)


def test_statistics_are_each_persons_own_and_never_cross_into_training(tmp_path):
    """A test person's clips change neither the training samples nor the population statistics, and each person's
    profile is the statistics of that person's rows alone."""
    file = person_feature_file(tmp_path / "a.npz")
    changed = person_feature_file(tmp_path / "b.npz", changed_actor=5)
    train_a, _, test_a = features_split(file, ALL)
    train_b, _, test_b = features_split(changed, ALL)
    for i in range(len(train_a)):
        assert torch.equal(train_a[i]["features"], train_b[i]["features"])
    for kind, (mean, std) in train_a.population.items():
        assert np.array_equal(mean, train_b.population[kind][0]) and np.array_equal(std, train_b.population[kind][1])
    assert not torch.equal(test_a[0]["features"], test_b[0]["features"])  # actor 5 itself did change
    assert sorted(train_a.profiles) == [1, 2, 3, 4] and sorted(test_a.profiles) == [5, 6]
    rows = np.stack([train_a.raw_inputs(i)["features"] for i, r in enumerate(train_a.records) if r.actor == 3])
    mean, std = train_a.profiles[3].stats["features"]
    np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(std, rows.std(0), rtol=1e-4, atol=1e-4)


def test_no_label_reaches_the_statistics_except_the_neutral_pick():
    actors = [1] * 16 + [2] * 16
    labels = list(range(8)) * 4
    shuffled = list(np.random.default_rng(1).permutation(labels))
    for settings in (ALL, CalibrationSettings(mode="person", clips=5, source="any", seed=3)):
        assert calibration_indices(actors, labels, settings) == calibration_indices(actors, shuffled, settings)
    neutral = CalibrationSettings(mode="person", clips=0, source="neutral", seed=0)
    picked = calibration_indices(actors, labels, neutral)
    assert all(labels[i] == NEUTRAL_LABEL for indices in picked.values() for i in indices)
    assert {a: len(v) for a, v in picked.items()} == {1: 2, 2: 2}


def test_k_clips_means_k_per_person_with_a_fixed_seed(tmp_path):
    file = person_feature_file(tmp_path / "features.npz")
    settings = CalibrationSettings(mode="person", clips=8, source="any", seed=0)
    train, _, test = features_split(file, settings)
    assert {a: p.n_clips for a, p in {**train.profiles, **test.profiles}.items()} == {a: 8 for a in range(1, 7)}
    again, _, _ = features_split(file, settings)
    assert np.array_equal(train.profiles[2].stats["features"][0], again.profiles[2].stats["features"][0])
    other_seed, _, _ = features_split(file, CalibrationSettings(mode="person", clips=8, source="any", seed=1))
    assert not np.array_equal(train.profiles[2].stats["features"][0], other_seed.profiles[2].stats["features"][0])
    assert len(test) == 64  # every clip is still tested


def test_neutral_calibration_clips_are_not_scored(tmp_path):
    file = person_feature_file(tmp_path / "features.npz")
    neutral = CalibrationSettings(mode="person", clips=0, source="neutral", seed=0)
    train, val, test = features_split(file, neutral, val=(4,))
    assert len(train) == 96 and all(p.mean_only for p in train.profiles.values())  # training keeps its clips
    assert len(test) == 64 - 2 * 4 and NEUTRAL_LABEL not in test.labels
    assert len(val) == 32 - 4 and test.profiles[5].n_clips == 4


def test_calibration_constants_are_checked():
    with pytest.raises(DataError, match="CALIBRATION must be one of"):
        CalibrationSettings(mode="persons", clips=0, source="any", seed=0)
    with pytest.raises(DataError, match="CALIBRATION_SOURCE"):
        CalibrationSettings(mode="person", clips=0, source="calm", seed=0)
    with pytest.raises(DataError, match="CALIBRATION_CLIPS"):
        CalibrationSettings(mode="person", clips=-4, source="any", seed=0)


def test_log_mel_and_frame_statistics_are_per_band_and_per_channel(synthetic_cache):
    split = Split(train=(2, 3, 4), val=(), test=(1,))
    train, _, test = build_datasets(synthetic_cache, split, modalities=("audio", "visual"), visual="frames",
                                    calibration=ALL)
    profile = test.profiles[1]
    logmels = np.stack([test.raw_inputs(i)["logmel"] for i in range(len(test))])  # (clips, mels, T)
    np.testing.assert_allclose(profile.stats["logmel"][0], logmels.mean(axis=(0, 2)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(profile.stats["logmel"][1], logmels.std(axis=(0, 2)), rtol=1e-3, atol=1e-3)
    assert profile.stats["frames"][0].shape == (3,)
    # calibrated onto the population: the person's mean becomes the population's, per band
    sample = test[0]["audio"][0].numpy()
    calibrated = np.stack([test[i]["audio"][0].numpy() for i in range(len(test))])
    np.testing.assert_allclose(calibrated.mean(axis=(0, 2)), train.population["logmel"][0], atol=1e-3)
    assert sample.shape == logmels.shape[1:]


def test_profile_round_trips_and_a_few_clips_lean_on_the_population(tmp_path):
    profile = profile_from_inputs("ana", [{"features": np.array([1.0, 5.0])}, {"features": np.array([3.0, 5.0])}])
    loaded = PersonProfile.load(profile.save(tmp_path / "ana.npz"))
    assert loaded.person == "ana" and loaded.n_clips == 2
    np.testing.assert_array_equal(loaded.stats["features"][0], [2.0, 5.0])
    population = {"features": (np.array([0.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32))}
    x = np.array([3.0, 6.0], np.float32)
    # 2 clips against PRIOR_CLIPS = 8 of the population: variance (2 * 1 + 8 * 4) / 10 and (2 * 0 + 8 * 1) / 10
    moved = loaded.calibrate("features", x, population)
    assert moved == pytest.approx([1 / np.sqrt(3.4) * 2, 1 / np.sqrt(0.8)])  # a still dimension does not blow up
    # the same statistics from many clips are the person's own: std 1 of the first dimension
    assert replace(loaded, n_clips=8000).calibrate("features", x, population)[0] == pytest.approx(2.0, rel=0.005)
    with pytest.raises(DataError, match="not a person profile"):
        PersonProfile.load(tmp_path.joinpath("bad.npz").write_bytes(b"no") and tmp_path / "bad.npz")


@pytest.fixture(scope="module")
def calibrated_run(synthetic_root, synthetic_cache, tmp_path_factory) -> Path:
    """A SimpleCNN trained for one epoch with CALIBRATION=person on the synthetic fixture (audio only)."""
    out = tmp_path_factory.mktemp("calibrated_run")
    for module in imported_script("train_simple_working"):
        vars(module).update({"DATASET": "ravdess", "DATA_ROOT": str(synthetic_root), "CACHE_DIR": str(synthetic_cache),
                             "OUTPUT_DIR": str(out), "N_FOLDS": 4, "FOLD": 0, "N_VAL_ACTORS": 0, "BATCH_SIZE": 16,
                             "NUM_WORKERS": 0, "DEVICE": "cpu", "EPOCHS": 1, "MODALITIES": ("audio",),
                             "CALIBRATION": "person", "RUN_NAME": "calibrated"})
        torch.manual_seed(0)
        module.main()
    return out / "train_simple_working" / "calibrated" / "fold0"


def run_predict(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "predict.py", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_a_calibrated_model_predicts_with_and_without_a_profile(calibrated_run, synthetic_root, tmp_path):
    state = torch.load(calibrated_run / "ckpt_best.pt", weights_only=True)
    assert state["calibration"]["settings"]["mode"] == "person"
    assert state["calibration"]["population"]["logmel"]["mean"].shape == (64,)
    metrics = json.loads((calibrated_run / "metrics.json").read_text())
    assert sum(map(sum, metrics["confusion"])) == 16  # actor 1's clips, each tested once
    person = sorted((synthetic_root).glob("**/03-*-01.wav"))  # actor 1's sound files
    target = str(person[0])
    plain = run_predict(target, f"--checkpoint={calibrated_run}", f"--output={tmp_path / 'plain.json'}")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.count("training population's statistics") == 1
    built = run_predict(target, f"--checkpoint={calibrated_run}", f"--calibrate={','.join(map(str, person))}",
                        f"--save_profile={tmp_path / 'actor1.npz'}", f"--output={tmp_path / 'built.json'}")
    assert built.returncode == 0, built.stderr
    assert f"person profile '{person[0].stem}'" in built.stdout and (tmp_path / "actor1.npz").is_file()
    reused = run_predict(target, f"--checkpoint={calibrated_run}", f"--profile={tmp_path / 'actor1.npz'}",
                         f"--output={tmp_path / 'reused.json'}")
    assert reused.returncode == 0, reused.stderr
    probs = {name: json.loads((tmp_path / f"{name}.json").read_text())["predictions"][0]["probabilities"]
             for name in ("plain", "built", "reused")}
    assert probs["built"] == pytest.approx(probs["reused"], abs=1e-6)  # the profile round-trips
    assert probs["built"] != pytest.approx(probs["plain"], abs=1e-4)  # and it changes the input
    assert json.loads((tmp_path / "reused.json").read_text())["calibration"].startswith("person profile")


def test_a_calibrated_model_is_scored_with_and_without_calibration(calibrated_run, monkeypatch):
    """benchmarks/calibration_without_profile.py: calibrated as in training it gives the run's own test accuracy;
    without calibration the test clips reach the model as they are, so its inputs differ; the third score is on the
    test clips less the neutral ones (the neutral-calibrated rows' test set)."""
    from benchmarks import calibration_without_profile as check

    loaders = []
    real_evaluate = check.evaluate
    monkeypatch.setattr(check, "evaluate", lambda model, loader, *args: loaders.append(loader)
                        or real_evaluate(model, loader, *args))
    calibrated, uncalibrated, without_neutral = check.fold_accuracies(calibrated_run.parent, calibrated_run)
    assert calibrated == pytest.approx(json.loads((calibrated_run / "metrics.json").read_text())["accuracy"])
    assert 0.0 <= uncalibrated <= 1.0 and 0.0 <= without_neutral <= 1.0
    batches = [next(iter(loader)) for loader in loaders]
    assert not torch.allclose(batches[0]["audio"], batches[1]["audio"])
    test_labels = list(loaders[1].dataset.labels)
    scored_labels = [int(label) for batch in loaders[2] for label in batch["label"]]
    assert NEUTRAL_LABEL in test_labels
    assert scored_labels == [label for label in test_labels if label != NEUTRAL_LABEL]


def test_predict_calibration_flags_are_checked(calibrated_run, tmp_path):
    both = run_predict("x.wav", "--calibrate=a", "--profile=b.npz")
    assert both.returncode == 2 and both.stderr.strip().startswith("error: give --calibrate")
    missing = run_predict("x.wav", f"--checkpoint={calibrated_run}", f"--profile={tmp_path / 'none.npz'}")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.skipif(shared_data_dir() is None, reason="../shared is absent")
def test_real_person_calibration_of_one_actor(calibrated_run, tmp_path):
    """The acceptance command on real RAVDESS speech: a folder of one actor's flacs calibrates one of them."""
    actor = shared_data_dir() / "ravdess_speech_16k" / "Actor_03"
    files = sorted(actor.glob("*.flac"))
    done = run_predict(f"--calibrate={actor}", str(files[0]), f"--checkpoint={calibrated_run}")
    assert done.returncode == 0, done.stderr
    assert "person profile 'Actor_03'" in done.stdout and "from 60 clip(s)" in done.stdout


def test_visualize_attention_calibrates_a_cache_clip_as_in_training(tmp_path, monkeypatch):
    """A checkpoint trained with calibration: visualize_attention standardises the clip by its actor's clips and
    maps it onto the stored population, as training did."""
    import visualize_attention
    from data.synthetic import make_synthetic_cache
    from models import build_model
    from training.checkpoint import calibration_entry, feature_stats_entry, make_state, save_checkpoint
    from common.config import ConfigError

    cache = make_synthetic_cache(tmp_path / "cache", actors=(1,), takes=1, n_frames=4, size=32, seconds=1.0)
    ids = [clip["clip_id"] for clip in json.loads((cache / "manifest.json").read_text())["clips"]]
    rows = (50 + 10 * np.random.default_rng(0).standard_normal((len(ids), 6))).astype(np.float32)
    np.savez(tmp_path / "au.npz", names=np.array([f"01-{i}" for i in ids]), visual_au=rows)
    torch.manual_seed(0)
    model = build_model("lite", {"width": 32, "audio_channels": [4, 8, 8, 16], "audio_tokens": 4,
                                 "visual_input": "features", "feature_dim": 6, "visual_tokens": 4,
                                 "fusion": "cross_attention", "fusion_layers": 1, "n_heads": 4, "mlp_ratio": 2})
    population = {"features": (np.full(6, 40.0, np.float32), np.full(6, 5.0, np.float32))}
    run_config = {"DATASET": "ravdess", "CACHE_DIR": str(cache), "VISUAL_INPUT": "features",
                  "FEATURE_FILE": str(tmp_path / "au.npz"), "MODALITIES": ["audio", "visual"]}
    save_checkpoint(tmp_path / "run" / "ckpt_best.pt", make_state(
        model.eval(), "lite", run_config=run_config, feature_stats=feature_stats_entry(population["features"]),
        calibration=calibration_entry((ALL, population))))
    seen = []
    monkeypatch.setattr(type(model), "attention_maps", lambda self, batch: seen.append(batch["features"]) or [])
    for key, value in {"CHECKPOINT": str(tmp_path / "run"), "OUTPUT_DIR": str(tmp_path / "out")}.items():
        monkeypatch.setattr(visualize_attention, key, value)
    with pytest.raises(ConfigError, match="attention pooling only"):  # the stub gives no maps: stops after input
        visualize_attention.main()
    n = len(ids)  # the person's variance weighs n clips against PRIOR_CLIPS of the population's (std 5)
    std = np.sqrt((n * rows.std(0) ** 2 + PRIOR_CLIPS * 5.0 ** 2) / (n + PRIOR_CLIPS))
    torch.testing.assert_close(seen[0][0], torch.from_numpy((rows[0] - rows.mean(0)) / std), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(shared_data_dir() is None, reason="../shared is absent")
def test_face_colour_statistics_differ_more_between_people_than_within_a_clip(monkeypatch):
    """The measurement behind the per-person frame normalisation, on the real portraits and clip."""
    from benchmarks import frame_calibration_check

    monkeypatch.setattr(frame_calibration_check, "SAMPLE_DIR", str(shared_data_dir() / "ravdess_video_sample"))
    result = frame_calibration_check.main()
    assert result["actors"] == 20 and result["clip_frames"] == 99
    assert (result["between_actors_std"] > 5 * result["within_clip_std"]).all()


@pytest.mark.skipif(shared_data_dir() is None, reason="../shared is absent")
def test_few_calibration_clips_lean_on_the_population(monkeypatch):
    """The check behind PRIOR_CLIPS on the real AUs: with 4 clips per person, a variance shrunk by 8 population
    clips classifies better than the person's nearly raw one (P = 1), and both better than no calibration."""
    from benchmarks import calibration_prior_check as check

    for key, value in {"FEATURE_FILE": str(shared_data_dir() / "ravdess_clip_features" / "au_mfcc.npz"),
                       "CLIPS": (4,), "PRIORS": (1, 8), "DRAWS": 1}.items():
        monkeypatch.setattr(check, key, value)
    result = check.main()
    assert result[4][8] > result[4][1] > result["none"]


def test_a_profile_is_applied_as_the_model_was_trained():
    profile = profile_from_inputs("ana", [{"logmel": np.ones((64, 10))}, {"logmel": np.zeros((64, 10))}])
    population = {"logmel": (np.zeros(64, np.float32), np.ones(64, np.float32))}
    assert profile.for_model(ALL.to_json(), population) is profile
    neutral = CalibrationSettings(mode="person", clips=0, source="neutral", seed=0).to_json()
    assert profile.for_model(neutral, population).mean_only and not profile.mean_only
    with pytest.raises(DataError, match="has logmel statistics of shape"):
        profile.for_model(ALL.to_json(), {"logmel": (np.zeros(32, np.float32), np.ones(32, np.float32))})
