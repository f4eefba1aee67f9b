"""MultimodalFERLite, its encoders and fusion strategies, and the face-encoder pretraining script.

Small widths and the tiny frame backbone go through the same code paths as the real configuration; one test
builds the real default configuration and checks its size.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pretrain_visual
from models import build_model
from models.encoders import AttentionPool, AudioEncoder, FeatureEncoder, FrameEncoder, drop_one_modality
from models.fusion import FUSION_STRATEGIES
from models.init import INIT_STRATEGIES
from models.lite import MultimodalFERLite
from training.checkpoint import load_checkpoint, make_state, rebuild_model, save_checkpoint
from training.stages import set_trainable

B, N_FRAMES, FRAME_SIZE, T, D = 4, 4, 32, 48, 35
TINY = {"width": 32, "audio_channels": [4, 8, 8, 16], "audio_tokens": 3, "visual_tokens": 2, "fusion_layers": 1,
        "n_heads": 2, "mlp_ratio": 2, "frame_backbone": "tiny", "dropout": 0.0, "encoder_dropout": 0.0}


def tiny_model(**overrides) -> MultimodalFERLite:
    torch.manual_seed(0)
    return MultimodalFERLite(**{**TINY, **overrides})


def make_batch(n: int = B, has_audio=None, has_visual=None, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "audio": torch.randn(n, 1, 64, T, generator=g),
        "frames": torch.randn(n, N_FRAMES, 3, FRAME_SIZE, FRAME_SIZE, generator=g),
        "features": torch.randn(n, D, generator=g),
        "has_audio": torch.ones(n, dtype=torch.bool) if has_audio is None else torch.tensor(has_audio),
        "has_visual": torch.ones(n, dtype=torch.bool) if has_visual is None else torch.tensor(has_visual),
        "label": torch.arange(n) % 8,
    }


# -------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("visual_input", ["frames", "features"])
@pytest.mark.parametrize("fusion", FUSION_STRATEGIES)
def test_logits_shape_every_fusion_and_visual_input(fusion: str, visual_input: str) -> None:
    model = tiny_model(fusion=fusion, visual_input=visual_input)
    assert model(make_batch()).shape == (B, 8)
    assert model.fusion.out_dim == model.classifier[0].in_features


def test_encoder_token_shapes() -> None:
    assert AudioEncoder(16, channels=(4, 8, 8, 16), n_tokens=5)(torch.randn(2, 1, 64, 361)).shape == (2, 5, 16)
    frames = torch.randn(2, 6, 3, FRAME_SIZE, FRAME_SIZE)
    assert FrameEncoder(16, "tiny")(frames).shape == (2, 6, 16)
    assert FrameEncoder(16, "tiny", n_tokens=3, input_size=24)(frames).shape == (2, 3, 16)
    assert FeatureEncoder(D, 16, n_tokens=2)(torch.randn(2, D)).shape == (2, 2, 16)


@pytest.mark.parametrize("modalities,fusion", [(("audio",), "concat"), (("visual",), "transformer")])
def test_single_modality_baselines(modalities: tuple, fusion: str) -> None:
    model = tiny_model(modalities=modalities, fusion=fusion, visual_input="features")
    batch = make_batch()
    del batch["features" if modalities == ("audio",) else "audio"]  # the other input is never read
    assert model(batch).shape == (B, 8)
    assert not hasattr(model, "visual_encoder" if modalities == ("audio",) else "audio_encoder")


def test_two_modality_fusion_with_one_modality_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="needs two modalities"):
        tiny_model(modalities=("audio",), fusion="cross_attention")


# ---------------------------------------------------------------------------------------- missing modality
@pytest.mark.parametrize("train", [False, True])
def test_missing_audio_uses_the_placeholder_not_the_content(train: bool) -> None:
    model = tiny_model(visual_input="features").train(train)
    batch = make_batch(has_audio=[False, True, True, True])
    changed = {**batch, "audio": batch["audio"].clone()}
    changed["audio"][0] = 1e3 * torch.randn(1, 64, T)  # garbage where the audio is absent
    zeroed = {**batch, "audio": batch["audio"].clone()}
    zeroed["audio"][0] = 0.0
    def forward(inputs: dict) -> torch.Tensor:  # the same draws of feature noise and dropout for each input
        torch.manual_seed(0)
        return model(inputs)

    with torch.no_grad():
        out, out_changed, out_zeroed = forward(batch), forward(changed), forward(zeroed)
    # Neither the missing sample nor the others (through BatchNorm batch statistics) see the absent content.
    torch.testing.assert_close(out, out_changed)
    torch.testing.assert_close(out, out_zeroed)
    tokens = model.tokens(batch)["audio"]
    torch.testing.assert_close(tokens[0], model.audio_missing.detach())


def test_batch_without_any_audio_runs_on_placeholders() -> None:
    model = tiny_model(visual_input="features")
    logits = model(make_batch(has_audio=[False] * B))
    assert torch.isfinite(logits).all()


def test_modality_dropout_never_drops_both() -> None:
    torch.manual_seed(0)
    audio = torch.tensor([True, True, False] * 2000)
    visual = torch.tensor([True, False, True] * 2000)
    kept_audio, kept_visual = drop_one_modality(audio, visual, p=0.5)
    assert (kept_audio | kept_visual).all()
    assert (kept_audio[1::3]).all() and (kept_visual[2::3]).all()  # a sole modality is never dropped
    both = audio & visual
    assert 0.4 < ((~kept_audio | ~kept_visual) & both).float().sum() / both.sum() < 0.6


# ----------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("visual_input", ["frames", "features"])
@pytest.mark.parametrize("fusion", FUSION_STRATEGIES)
def test_every_parameter_gets_a_finite_gradient(fusion: str, visual_input: str) -> None:
    model = tiny_model(fusion=fusion, visual_input=visual_input).train()
    # One sample lacks audio, one lacks the visual input, so both placeholders are used too.
    batch = make_batch(has_audio=[True, False, True, True], has_visual=[True, True, False, True])
    loss = F.cross_entropy(model(batch), batch["label"])
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("fusion", FUSION_STRATEGIES)
def test_each_fusion_overfits_a_tiny_random_batch(fusion: str) -> None:
    model = tiny_model(fusion=fusion, visual_input="features").train()
    batch = make_batch(n=8, seed=1)
    batch["label"] = torch.randperm(8) % 8
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):  # about 25 steps suffice for every strategy
        optimizer.zero_grad()
        loss = F.cross_entropy(model(batch), batch["label"])
        if loss.item() < 0.1:
            break
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    assert (model(batch).argmax(-1) == batch["label"]).all()


# ------------------------------------------------------------------------------------------ attention maps
@pytest.mark.parametrize("fusion", ["cross_attention", "transformer"])
def test_attention_maps_are_labelled_distributions(fusion: str) -> None:
    model = tiny_model(fusion=fusion, fusion_layers=2).eval()
    maps = model.attention_maps(make_batch())
    layers = [m.layer for m in maps]
    assert sum("fusion.layers" in name for name in layers) == (4 if fusion == "cross_attention" else 2)
    for m in maps:
        b, h, lq, lk = m.weights.shape
        assert (b, h) == (B, 2) and (lq, lk) == (len(m.query_labels), len(m.key_labels))
        torch.testing.assert_close(m.weights.sum(-1), torch.ones(b, h, lq))
    if fusion == "cross_attention":
        audio_to_visual = maps[0]
        assert audio_to_visual.query_labels == ["audio_0", "audio_1", "audio_2"]
        assert audio_to_visual.key_labels == ["visual_0", "visual_1"]
    else:
        assert maps[0].query_labels == ["audio_0", "audio_1", "audio_2", "visual_0", "visual_1"]


def test_attention_maps_match_the_forward_pass() -> None:
    model = tiny_model(fusion="transformer").eval()
    batch = make_batch()
    tokens = model.tokens(batch)
    fused = model.fusion(tokens["audio"], tokens["visual"])  # fused SDPA kernel
    fused_explicit, maps = model.fusion._run(tokens, need_weights=True)  # explicit float32 path, same result
    torch.testing.assert_close(fused, fused_explicit, rtol=1e-4, atol=1e-5)
    assert maps[-1].layer == "pool" and maps[-1].query_labels == ["pool_query"]


def test_attention_pool_weights_say_which_token_counts() -> None:
    pool = AttentionPool(8, n_heads=2)
    tokens = torch.randn(3, 5, 8)
    pooled, weights = pool(tokens, return_weights=True)
    assert pooled.shape == (3, 8) and weights.shape == (3, 2, 1, 5)
    torch.testing.assert_close(pooled, pool(tokens))


# --------------------------------------------------------------------------------------------------- init
@pytest.mark.parametrize("strategy", INIT_STRATEGIES)
def test_init_strategies_apply(strategy: str) -> None:
    model = tiny_model(fusion="cross_attention")
    before = model.fusion.layers[0].audio_to_visual.query.weight.clone()
    model.init_weights(strategy, gain=0.5)
    after = model.fusion.layers[0].audio_to_visual.query.weight
    assert torch.equal(before, after) == (strategy == "default")
    residual_out = model.fusion.layers[0].audio_to_visual.out.weight
    if strategy == "zero_residual":
        assert residual_out.abs().sum() == 0
    assert torch.isfinite(model(make_batch())).all()


def test_unknown_init_strategy_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown init strategy"):
        tiny_model().init_weights("orthogonal")


# ----------------------------------------------------------------------------------- configs and freezing
def test_default_config_has_10_to_20m_parameters_and_rebuilds() -> None:
    model = MultimodalFERLite()
    breakdown = model.parameter_breakdown()
    assert 10e6 <= breakdown["total"] <= 20e6, breakdown
    assert breakdown["total"] == sum(v for k, v in breakdown.items() if k != "total")
    config = json.loads(json.dumps(model.config))  # plain types, as stored in a checkpoint
    rebuilt = build_model("lite", config)
    assert rebuilt.parameter_breakdown() == breakdown


def test_cpu_preset_runs_on_audio_and_action_units(monkeypatch) -> None:
    import train_lite_model

    for key, value in {**train_lite_model._PRESETS["cpu"], "VISUAL_INPUT": "features"}.items():
        monkeypatch.setattr(train_lite_model, key, value)
    model = MultimodalFERLite(**train_lite_model.model_config(D)).train()
    batch = make_batch()
    batch["audio"] = torch.randn(B, 1, 64, 361)
    assert model(batch).shape == (B, 8)
    assert model.parameter_breakdown()["total"] < 1e6


def test_stage_one_freezes_the_encoders_only() -> None:
    model = tiny_model()
    set_trainable(model, ("fusion", "classifier"))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    encoders = {id(p) for name in ("audio_encoder", "visual_encoder") for p in getattr(model, name).parameters()}
    assert trainable == {id(p) for p in model.parameters()} - encoders
    assert model.audio_missing.requires_grad


# ------------------------------------------------------------------------------------- pretrained weights
def test_resnet18_imagenet_weights_load_from_the_hub_cache(tmp_path: Path) -> None:
    from torchvision.models import ResNet18_Weights, resnet18

    saved = resnet18()
    (tmp_path / "checkpoints").mkdir()
    torch.save(saved.state_dict(), tmp_path / "checkpoints" / Path(ResNet18_Weights.DEFAULT.url).name)
    old_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))  # where torchvision looks before downloading, as after a Colab download
    try:
        encoder = FrameEncoder(16, "resnet18", pretrained=True)
    finally:
        torch.hub.set_dir(old_dir)
    torch.testing.assert_close(encoder.backbone.conv1.weight, saved.conv1.weight)
    assert encoder.pretrained
    # Lite.init_weights must not overwrite pretrained backbone weights.
    model = MultimodalFERLite(**{**TINY, "frame_backbone": "resnet18"})
    model.visual_encoder = encoder
    model.init_weights("xavier")
    torch.testing.assert_close(encoder.backbone.conv1.weight, saved.conv1.weight)


def test_resnet18_weights_from_an_explicit_path_and_a_clear_offline_error(tmp_path: Path, monkeypatch) -> None:
    from torchvision.models import ResNet18_Weights, resnet18

    path = tmp_path / "resnet18.pth"
    saved = resnet18()
    torch.save(saved.state_dict(), path)
    encoder = FrameEncoder(16, "resnet18", pretrained_path=str(path))
    torch.testing.assert_close(encoder.backbone.layer4[1].conv2.weight, saved.layer4[1].conv2.weight)

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="could not download ImageNet ResNet-18 weights.*offline"):
        FrameEncoder(16, "resnet18", pretrained=True)


# ----------------------------------------------------------------------------------------- face pretraining
def write_image_folder(root: Path, classes=("angry", "happy"), per_class: int = 4) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(root / split / name / f"{i}.png")


def test_face_batches_are_imagenet_normalised_single_frame_clips(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    images, labels, classes = pretrain_visual.load_split(tmp_path, "train")
    assert images.shape == (8, 48, 48) and images.dtype == torch.uint8 and classes == ["angry", "happy"]
    for augment in (False, True):
        batches = pretrain_visual.FaceBatches(images, labels, 5, torch.device("cpu"), 40, augment=augment)
        batch = next(iter(batches))
        assert batch["frames"].shape == (5, 1, 3, 40, 40) and len(batches) == 2
        channel_means = batch["frames"].mean(dim=(0, 1, 3, 4))
        # Grey replicated to RGB then ImageNet-normalised: the three channels differ only by mean/std.
        assert not torch.allclose(channel_means[0], channel_means[2])


def test_fer2013_csv_is_read_with_its_usage_split(tmp_path: Path) -> None:
    pixels = " ".join(["128"] * 48 * 48)
    rows = ["emotion,pixels,Usage", f"3,{pixels},Training", f"6,{pixels},Training", f"0,{pixels},PublicTest",
            f"1,{pixels},PrivateTest"]
    path = tmp_path / "fer2013.csv"
    path.write_text("\n".join(rows) + "\n")
    images, labels, classes = pretrain_visual.load_split(path, "train")
    assert images.shape == (2, 48, 48) and labels.tolist() == [3, 6] and classes[3] == "happy"
    _, val_labels, _ = pretrain_visual.load_split(path, "val")
    assert val_labels.tolist() == [0]


def test_pretrain_script_checkpoint_loads_into_the_lite_model(tmp_path: Path, monkeypatch) -> None:
    write_image_folder(tmp_path / "fer")
    for key, value in {"DATA_ROOT": str(tmp_path / "fer"), "BACKBONE": "tiny", "EPOCHS": 1, "BATCH_SIZE": 4,
                       "WIDTH": 16, "OUTPUT_DIR": str(tmp_path / "out"), "RUN_NAME": "t", "NUM_THREADS": 0}.items():
        monkeypatch.setattr(pretrain_visual, key, value)
    pretrain_visual.main()
    checkpoint = tmp_path / "out" / "pretrain_visual" / "t" / "ckpt_best.pt"
    metrics = json.loads((checkpoint.parent / "metrics.json").read_text())
    log = [json.loads(line) for line in (checkpoint.parent / "log.jsonl").read_text().splitlines()]
    assert metrics["epochs"] == 1 and metrics["best_val_accuracy"] == log[0]["val_accuracy"]
    assert (metrics["best_val_accuracy"] * 8).is_integer()  # a share of the 8 validation images

    model = tiny_model()  # frames, tiny backbone
    info = model.load_face_pretrained(checkpoint)
    assert info["image_size"] == 48 and info["class_names"] == ["angry", "happy"]
    saved = torch.load(checkpoint, weights_only=True)["model"]
    torch.testing.assert_close(model.visual_encoder.backbone.stem[0].weight, saved["encoder.backbone.stem.0.weight"])

    with pytest.raises(ValueError, match="holds a 'tiny' backbone, this encoder uses 'small'"):
        FrameEncoder(16, "small").load_face_pretrained(checkpoint)


def test_pretrain_crash_dump_can_be_rebuilt_for_replay(tmp_path: Path, monkeypatch) -> None:
    write_image_folder(tmp_path / "fer")
    # An absurd learning rate: the first step blows the weights up, the next loss is NaN.
    for key, value in {"DATA_ROOT": str(tmp_path / "fer"), "BACKBONE": "tiny", "EPOCHS": 1, "BATCH_SIZE": 4,
                       "WIDTH": 16, "OUTPUT_DIR": str(tmp_path / "out"), "RUN_NAME": "t", "LR": 1e30,
                       "WARMUP_EPOCHS": 0, "CLIP_NORM": 0.0, "AMP_DTYPE": "float32"}.items():
        monkeypatch.setattr(pretrain_visual, key, value)
    with pytest.raises(SystemExit, match="debug_gradients.py --replay="):
        pretrain_visual.main()
    dump = load_checkpoint(tmp_path / "out" / "pretrain_visual" / "t" / "crash" / "crash.pt")
    assert dump["model_name"] == "face_encoder" and dump["progress"]["step"] >= 1 and "scaler" in dump
    model = rebuild_model(dump)
    assert model(dump["batch"]).shape == (len(dump["batch"]["label"]), 2)


def test_face_checkpoint_of_the_wrong_kind_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "lite.pt"
    model = tiny_model()
    save_checkpoint(path, make_state(model, "lite"))
    with pytest.raises(ValueError, match="is not a face-encoder checkpoint"):
        model.load_face_pretrained(path)
    with pytest.raises(ValueError, match="need visual_input='frames'"):
        tiny_model(visual_input="features").load_face_pretrained(path)
