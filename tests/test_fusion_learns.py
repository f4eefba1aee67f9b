"""Each fusion strategy of MultimodalFERLite learns the synthetic RAVDESS-format data across actors."""
from __future__ import annotations

import pytest

from data.dataset import build_datasets, make_loaders
from data.ravdess import Split
from data.synthetic import make_synthetic_cache
from models import build_model
from training.runtime import setup_runtime
from training.stages import make_optimizer, train_mode
from training.step import evaluate, move_batch, train_step

FUSIONS = ("concat", "product", "gated", "cross_attention", "transformer")


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """8 actors x 8 emotions x 2 takes, 4 frames of 32 px: small enough to train five models in seconds."""
    return make_synthetic_cache(tmp_path_factory.mktemp("fusion_cache"), actors=range(1, 9), takes=2, n_frames=4,
                                size=32)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fusion_strategy_beats_chance_on_unseen_actors(fusion, small_cache):
    runtime = setup_runtime("cpu", "float32", seed=0)
    train, val, test = build_datasets(small_cache, Split(train=tuple(range(1, 7)), val=(), test=(7, 8)),
                                      visual="frames")
    train_loader, _, test_loader = make_loaders(train, val, test, batch_size=16, seed=0)
    model = build_model("lite", {"width": 32, "audio_channels": [8, 16, 16, 32], "frame_backbone": "tiny",
                                 "fusion": fusion, "fusion_layers": 1, "n_heads": 2, "audio_tokens": 4,
                                 "visual_tokens": 4, "dropout": 0.0, "encoder_dropout": 0.0, "audio_time_pool": 4})
    model.init_weights("scaled_residual", 0.5)
    optimizer = make_optimizer(model, lr=3e-3, weight_decay=0.0)
    scaler = runtime.make_scaler()
    for _ in range(12):  # epochs of 6 steps
        train_mode(model, [])
        for batch in train_loader:
            train_step(model, move_batch(batch, runtime.device), optimizer, scaler, runtime)
    accuracy = evaluate(model, test_loader, runtime)["accuracy"]
    # Measured here (one thread, 12 epochs): concat 62%, product 34%, gated 41%, cross_attention 44%, transformer
    # 44% (32 test clips). After 8 epochs the result hung on the thread count's rounding: transformer 62% with two
    # threads, 22% with one.
    assert accuracy >= 0.25, f"{fusion}: {accuracy:.1%} on unseen actors (chance 12.5%)"
