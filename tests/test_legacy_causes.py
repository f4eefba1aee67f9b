"""Issue 12: each plausible cause of the original model's first-batch NaN, recreated by its legacy switch at tiny
width in float16 autocast on the CPU; `debug_gradients` must name the first non-finite module as `named_modules()`
does, and the stable path must stay finite on the same batch."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import soundfile as sf
import torch

import debug_gradients
from data import preprocess
from models.full import MultimodalFER
from models.lfm2 import GatedShortConv, InputDtypeRMSNorm, LFM2Stack, ScaledDotProductAttention
from models.layers import RMSNorm
from common.config import ConfigError
from training.runtime import Runtime

FP16 = Runtime(torch.device("cpu"), torch.float16)
# The first blocks of LFM2's layout (attention third), at a width a CPU runs in float16 in a fraction of a second.
TINY = {"width": 32, "n_segments": 4, "audio_channels": [4, 8, 8, 16], "frame_backbone": "tiny",
        "layout": ["conv", "conv", "attn", "conv"], "n_heads": 4, "n_kv_heads": 2, "mlp_hidden": 64}
LEGACY_BASE = {"qk_norm": False}  # the rest of the legacy recipe: default init, no warmup, no clipping, float16



def first_batch(n_frames: int = 161) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"audio": torch.randn(8, 1, 64, n_frames, generator=g), "frames": torch.randn(8, 2, 3, 16, 16, generator=g),
            "has_audio": torch.ones(8, dtype=torch.bool), "has_visual": torch.ones(8, dtype=torch.bool),
            "label": torch.randint(0, 8, (8,), generator=g)}


def first_step(cause: str, legacy: bool, folder) -> tuple:
    """One training step of the tiny full model on the first batch with `cause` in, the legacy or the stable
    recipe; returns (first non-finite event or None, the step record, the model)."""
    torch.manual_seed(0)
    recipe = LEGACY_BASE if legacy else {}
    model = MultimodalFER(**TINY, **recipe, **debug_gradients.cause_model_config(cause, legacy))
    model.init_weights("default" if legacy else "scaled_residual")
    batches = debug_gradients.cause_batches([first_batch()], debug_gradients.legacy_cause(cause)["inputs"], legacy,
                                            folder)
    monitor, steps = debug_gradients.watch(model, batches, FP16, lr=1e-4, warmup=0 if legacy else 10,
                                           clip=None if legacy else 1.0)
    return monitor.first_non_finite(), steps[0], model


@pytest.mark.parametrize("cause, module, module_type", [
    ("massive_activations", "fusion.blocks.1.mlp.product", "GatedProduct"),
    ("mask_fill", "fusion.blocks.2.operator.attention", "ScaledDotProductAttention"),
])
def test_legacy_switch_is_named_at_its_module_on_the_first_batch(cause, module, module_type, tmp_path):
    event, step, model = first_step(cause, legacy=True, folder=tmp_path)
    assert (event.step, event.phase, event.module, event.module_type) == (0, "forward", module, module_type)
    assert event.inputs_finite  # the module itself produced the NaN/inf
    assert module in dict(model.named_modules())
    stable_event, stable_step, _ = first_step(cause, legacy=False, folder=tmp_path)
    assert stable_event is None and np.isfinite(stable_step["loss"])


@pytest.mark.parametrize("cause", ["log_of_zero", "silent_clip"])
def test_non_finite_input_is_traced_to_the_data_and_the_cache_path_prevents_it(cause, tmp_path):
    event, step, model = first_step(cause, legacy=True, folder=tmp_path)
    # The first module to see the audio (its input norm) reports non-finite inputs: the data, not a layer, is at
    # fault.
    assert event.step == 0 and event.phase == "forward" and event.module == "audio_encoder.input_norm"
    assert not event.inputs_finite and event.module in dict(model.named_modules())
    stable_event, stable_step, _ = first_step(cause, legacy=False, folder=tmp_path)
    assert stable_event is None and np.isfinite(stable_step["loss"])


def test_legacy_inputs_are_made_by_the_real_preprocessing(tmp_path):
    legacy_padded = debug_gradients.input_logmel("zero_padded_audio", 161, legacy=True, folder=tmp_path)
    stable_padded = debug_gradients.input_logmel("zero_padded_audio", 161, legacy=False, folder=tmp_path)
    assert legacy_padded.shape == stable_padded.shape == (64, 161)
    assert np.isneginf(legacy_padded).any() and np.isfinite(stable_padded).all()  # log(0) vs log(0 + eps)
    assert np.isnan(debug_gradients.input_logmel("silent_audio", 161, legacy=True, folder=tmp_path)).all()
    # The cache writer marks a silent clip's audio absent (learned token) instead of standardising it.
    assert debug_gradients.input_logmel("silent_audio", 161, legacy=False, folder=tmp_path) is None


def test_cache_check_refuses_a_log_of_zero(tmp_path, monkeypatch):
    path = tmp_path / "short.wav"
    sf.write(path, debug_gradients.short_recording(), 16000, subtype="FLOAT")
    settings = preprocess.Settings(seconds=2.0)  # longer than the 1 s recording: zero padding
    assert np.isfinite(preprocess.audio_features(path, settings)).all()
    monkeypatch.setattr(preprocess, "log_mel", functools.partial(preprocess.log_mel, eps=0.0))  # legacy log
    with pytest.raises(preprocess.ClipError, match="non-finite log-mel"):
        preprocess.audio_features(path, settings)


def test_float16_norm_zeroes_a_massive_token_silently_instead_of_nan():
    x = torch.randn(2, 16, dtype=torch.float16)
    x[0, 3] = 2000.0  # a massive activation: its square (4e6) overflows float16
    legacy, stable = InputDtypeRMSNorm(16)(x), RMSNorm(16)(x)
    assert torch.equal(legacy[0], torch.zeros(16, dtype=torch.float16))  # the whole token is gone, no NaN
    assert torch.isfinite(legacy).all() and torch.equal(legacy[1] != 0, stable[1] != 0)
    assert stable[0, 3] > 3.9  # float32: the massive channel dominates the normalised token


def test_float16_norms_cause_gives_no_nan_on_the_first_batch(tmp_path):
    event, step, _ = first_step("float16_norms", legacy=True, folder=tmp_path)
    assert event is None and np.isfinite(step["loss"])


def test_repeated_calls_run_each_block_three_times_and_grow_the_residual_stream():
    torch.manual_seed(0)
    stack = LFM2Stack(32, ["conv", "attn"], n_heads=4, n_kv_heads=2, repeat_calls=3, qk_norm=False)
    calls = []
    stack.blocks[0].register_forward_hook(lambda *args: calls.append(1))
    stats = stack.activation_stats(torch.randn(2, 8, 32))
    assert len(calls) == 3
    per_call = [stats[f"block0.call{c}.act_max"] for c in range(3)]
    assert per_call[0] < per_call[1] < per_call[2]
    with pytest.raises(ValueError, match="repeat_calls"):
        LFM2Stack(32, ["conv"], n_heads=4, n_kv_heads=2, repeat_calls=0)


def test_a_fully_masked_row_is_nan_with_minus_1e9_in_float16_and_finite_with_boolean_masks():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float16) for _ in range(3))
    key_mask = torch.tensor([[False, False, True, True]])  # causal query 0 and 1 see only masked keys
    for fill, finite in ((-1e9, False), (float("-inf"), False), (-65504.0, True), (None, True)):
        out, _ = ScaledDotProductAttention(causal=True, mask_fill=fill)(q, k, v, key_mask)
        assert bool(torch.isfinite(out).all()) == finite, fill
    # float16's lowest value survives only while the row's scores are above -16: -65504 - 16 rounds to -inf.
    out, _ = ScaledDotProductAttention(causal=True, mask_fill=-65504.0)(-q.abs() * 8, k.abs() * 8, v, key_mask)
    assert not torch.isfinite(out).all()


def test_unknown_cause_gets_the_closest_name():
    with pytest.raises(ConfigError, match="did you mean mask_fill"):
        debug_gradients.legacy_cause("mask_fil")
    merged = debug_gradients.legacy_cause("all")
    assert set(merged["inputs"]) == set(debug_gradients.INPUT_SLOTS)
    assert merged["legacy"]["attention_mask_fill"] == -1e9 and merged["present"]["massive_activations"] > 0


# ------------------------------------------------------------------------------------ issue 10, item 8
def test_per_modality_convolution_never_mixes_the_last_audio_token_with_the_first_visual_one():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 16)  # audio_0..3, visual_0..3
    changed = x.clone()
    changed[:, 4] += 1.0  # visual_0
    joint, separate = GatedShortConv(16), GatedShortConv(16, n_sequences=2)
    separate.load_state_dict(joint.state_dict())
    assert not torch.allclose(joint(x)[:, 3], joint(changed)[:, 3])  # audio_3 sees visual_0 by index
    assert torch.equal(separate(x)[:, 3], separate(changed)[:, 3])
    assert not torch.allclose(separate(x)[:, 5], separate(changed)[:, 5])  # visual_1 still sees visual_0
    model = MultimodalFER(**TINY)
    assert model.fusion.blocks[0].operator.n_sequences == 2
    assert MultimodalFER(**TINY, conv_per_modality=False).fusion.blocks[0].operator.n_sequences == 1


def test_an_empty_face_box_is_an_error_never_a_nan_crop(monkeypatch):
    """Issue 12, cause 4c: a face box of side 0 cannot become a NaN crop here: OpenCV refuses to resize an empty
    crop, so `prepare_cache` lists the clip as failed; a box at the frame's edge is shifted inside, not shrunk."""
    frames = [np.full((120, 160, 3), 128, np.uint8)] * 2
    assert preprocess.crop_box(frames[0].shape, (2, 2, 40), 1.25) == (0, 0, 50)
    monkeypatch.setattr(preprocess, "find_face", lambda frames, settings: (80, 60, 0))
    with pytest.raises(preprocess.cv2.error):
        preprocess.face_crops(frames, preprocess.Settings(size=32))
