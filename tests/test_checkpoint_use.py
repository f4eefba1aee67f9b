"""A run folder works wherever a checkpoint is asked for, and the feature standardisation of training travels with
the checkpoint (visualize_attention applies the model to features scaled as in training)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import visualize_attention
from data.synthetic import make_synthetic_cache
from models import build_model
from training.checkpoint import (feature_stats_entry, load_checkpoint, make_state, resolve_checkpoint,
                                 save_checkpoint, stored_feature_stats)
from common.config import ConfigError

TINY_FEATURE_LITE = {"width": 32, "audio_channels": [4, 8, 8, 16], "audio_tokens": 4, "visual_input": "features",
                     "feature_dim": 6, "visual_tokens": 4, "fusion": "cross_attention", "fusion_layers": 1,
                     "n_heads": 4, "mlp_ratio": 2}


def touch_checkpoint(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_a_run_folder_resolves_to_its_checkpoint(tmp_path):
    single = tmp_path / "simple"
    best = touch_checkpoint(single / "ckpt_best.pt")
    touch_checkpoint(single / "ckpt_last.pt")
    assert resolve_checkpoint(best) == best and resolve_checkpoint(single) == best
    only_last = touch_checkpoint(tmp_path / "early" / "ckpt_last.pt")
    assert resolve_checkpoint(tmp_path / "early") == only_last

    one_fold = tmp_path / "cv1"
    fold_best = touch_checkpoint(one_fold / "fold0" / "ckpt_best.pt")
    (one_fold / "figures").mkdir()
    assert resolve_checkpoint(one_fold) == fold_best

    several = tmp_path / "cv5"
    for fold in (0, 1, 10, 2):
        touch_checkpoint(several / f"fold{fold}" / "ckpt_best.pt")
    with pytest.raises(ConfigError, match=r"holds 4 cross-validation folds \(fold0, fold1, fold2, fold10\): "
                                          r"name one, e.g. .*cv5/fold0$"):
        resolve_checkpoint(several)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint in"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(ConfigError, match="checkpoint not found"):
        resolve_checkpoint(tmp_path / "missing")


def test_feature_statistics_round_trip_through_a_checkpoint(tmp_path):
    model = build_model("lite", TINY_FEATURE_LITE)
    mean, std = np.arange(6, dtype=np.float32), np.full(6, 2.0, np.float32)
    save_checkpoint(tmp_path / "c.pt", make_state(model, "lite", feature_stats=feature_stats_entry((mean, std))))
    restored = stored_feature_stats(load_checkpoint(tmp_path / "c.pt"))  # weights_only=True load
    assert np.array_equal(restored[0], mean) and np.array_equal(restored[1], std)
    assert feature_stats_entry(None) is None and stored_feature_stats(make_state(model, "lite")) is None


@pytest.fixture(scope="module")
def feature_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny cache (one actor, 8 clips) and a feature file whose 6 columns sit far from zero (mean 50, std 10)."""
    folder = tmp_path_factory.mktemp("features")
    cache = make_synthetic_cache(folder / "cache", actors=(1,), takes=1, n_frames=4, size=32, seconds=1.0)
    ids = [clip["clip_id"] for clip in json.loads((cache / "manifest.json").read_text())["clips"]]
    rng = np.random.default_rng(0)
    np.savez(folder / "au.npz", names=np.array([f"01-{i}" for i in ids]),
             visual_au=(50 + 10 * rng.standard_normal((len(ids), 6))).astype(np.float32))
    return cache, folder / "au.npz"


def test_visualize_attention_standardises_features_as_in_training(feature_data, tmp_path, monkeypatch):
    cache, features = feature_data
    torch.manual_seed(0)
    model = build_model("lite", TINY_FEATURE_LITE).eval()
    stats = (np.full(6, 50.0, np.float32), np.full(6, 10.0, np.float32))
    run_config = {"DATASET": "ravdess", "CACHE_DIR": str(cache), "VISUAL_INPUT": "features",
                  "FEATURE_FILE": str(features), "MODALITIES": ["audio", "visual"]}
    fold = tmp_path / "run" / "fold0"
    save_checkpoint(fold / "ckpt_best.pt", make_state(model, "lite", run_config=run_config,
                                                        feature_stats=feature_stats_entry(stats)))
    seen = []
    monkeypatch.setattr(type(model), "attention_maps",
                        lambda self, batch: seen.append(batch["features"].clone()) or [])
    # Only the run folder is named: the cache, the feature file and the statistics all come from the checkpoint.
    for key, value in {"CHECKPOINT": str(tmp_path / "run"), "OUTPUT_DIR": str(tmp_path / "out")}.items():
        monkeypatch.setattr(visualize_attention, key, value)
    with pytest.raises(ConfigError, match="attention pooling only"):  # no maps from the stub: stops after input
        visualize_attention.main()
    raw = torch.from_numpy(np.load(features)["visual_au"][0])
    torch.testing.assert_close(seen[0][0], (raw - 50) / 10)


def test_a_run_folder_gets_figures_only_when_it_draws_one(tmp_path):
    from training.runs import RunFolder

    run = RunFolder("train_simple_working", "simple", root=tmp_path)
    fold = run.sub("fold0")
    fold.plot_history([{"epoch": 1, "train_loss": 2.0, "val_loss": 2.1, "train_accuracy": 0.2, "val_accuracy": 0.1}])
    assert (fold.dir / "figures" / "training_curves.png").is_file()
    assert not (run.dir / "figures").exists()  # the cross-validation folder itself draws nothing
