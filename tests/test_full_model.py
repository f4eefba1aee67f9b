"""MultimodalFER and its LFM2 fusion blocks: the real-size model once, then small widths through the same code."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
from models.full import MultimodalFER
from models.init import INIT_STRATEGIES
from models.lfm2 import GatedShortConv, GroupedQueryAttention, LFM2Block, LFM2Stack, RotaryEmbedding, apply_rotary

SMALL = dict(width=32, n_segments=4, audio_channels=(4, 8, 8, 16), frame_backbone="tiny",
             layout=["conv", "attn", "conv", "attn"], n_heads=4, n_kv_heads=2, mlp_hidden=64)


def make_batch(batch_size: int = 3, n_frames: int = 4, size: int = 32, time: int = 64, features: bool = False,
               seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {"audio": torch.randn(batch_size, 1, 64, time, generator=g),
             "has_audio": torch.ones(batch_size, dtype=torch.bool),
             "has_visual": torch.ones(batch_size, dtype=torch.bool),
             "label": torch.randint(0, 8, (batch_size,), generator=g)}
    if features:
        batch["features"] = torch.randn(batch_size, 35, generator=g)
    else:
        batch["frames"] = torch.randn(batch_size, n_frames, 3, size, size, generator=g)
    return batch


def small_model(**overrides) -> MultimodalFER:
    torch.manual_seed(0)
    return MultimodalFER(**{**SMALL, **overrides})


def rope(length: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return RotaryEmbedding(head_dim)(torch.arange(length))


# --------------------------------------------------------------------------------------------- real size
def test_default_full_model_size_and_one_training_step():
    torch.manual_seed(0)
    model = MultimodalFER()
    breakdown = model.parameter_breakdown()
    assert 140e6 <= breakdown["total"] <= 160e6
    assert breakdown["total"] == sum(v for k, v in breakdown.items() if k != "total")
    model.init_weights("scaled_residual")
    # Two small frames and a short log-mel keep the ResNet-18 and the audio CNN cheap; the fusion is full size.
    batch = make_batch(batch_size=2, n_frames=2, size=64, time=48)
    loss = F.cross_entropy(model(batch), batch["label"])
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert model.fusion.blocks[-1].mlp.down.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ block types
@pytest.mark.parametrize("kind", ["conv", "attn"])
def test_block_keeps_shape(kind):
    block = LFM2Block(kind, width=32, n_heads=4, n_kv_heads=2, mlp_hidden=64)
    out, weights = block(torch.randn(2, 7, 32), rope(7, 8), need_weights=True)
    assert out.shape == (2, 7, 32)
    assert (weights is not None) == (kind == "attn")


def test_layout_string_and_errors():
    assert LFM2Stack(16, "conv, attn", n_heads=2, n_kv_heads=1).layout == ["conv", "attn"]
    with pytest.raises(ValueError, match="layout"):
        LFM2Stack(16, ["conv", "mamba"], n_heads=2, n_kv_heads=1)


def test_causal_conv_does_not_see_the_future_and_centred_sees_one_step():
    torch.manual_seed(0)
    x = torch.randn(1, 10, 16)
    later = x.clone()
    later[:, 6:] += torch.randn(1, 4, 16)  # change tokens 6..9 only
    causal = GatedShortConv(16, padding="causal")
    assert torch.allclose(causal(x)[:, :6], causal(later)[:, :6])
    assert not torch.allclose(causal(x)[:, 6], causal(later)[:, 6])
    centred = GatedShortConv(16, padding="centred")
    centred.load_state_dict(causal.state_dict())
    assert torch.allclose(centred(x)[:, :5], centred(later)[:, :5])
    assert not torch.allclose(centred(x)[:, 5], centred(later)[:, 5])  # token 5 sees token 6
    with pytest.raises(ValueError, match="padding"):
        GatedShortConv(16, padding="same")


def test_grouped_query_attention_equals_attention_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = GroupedQueryAttention(32, n_heads=4, n_kv_heads=2)
    assert gqa.k_proj.out_features == gqa.v_proj.out_features == 2 * 8
    mha = GroupedQueryAttention(32, n_heads=4, n_kv_heads=4)
    state = gqa.state_dict()
    for name in ("k_proj.weight", "v_proj.weight"):
        state[name] = state[name].view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    x, r = torch.randn(2, 6, 32), rope(6, 8)
    assert torch.allclose(gqa(x, r)[0], mha(x, r)[0], atol=1e-6)


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    rotary = RotaryEmbedding(16)

    def score(m: int, n: int) -> torch.Tensor:
        cos, sin = rotary(torch.tensor([m, n]))
        return (apply_rotary(q, cos[:1], sin[:1]) * apply_rotary(k, cos[1:], sin[1:])).sum()

    assert torch.allclose(score(3, 1), score(10, 8), atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


def test_qk_norm_bounds_attention_logits_and_can_be_turned_off():
    torch.manual_seed(0)
    x, r = torch.randn(2, 6, 32), rope(6, 8)
    for qk_norm in (True, False):
        attn = GroupedQueryAttention(32, n_heads=4, n_kv_heads=2, qk_norm=qk_norm)
        with torch.no_grad():  # weights that grew 100x during training
            attn.q_proj.weight.mul_(100)
            attn.k_proj.weight.mul_(100)
        largest = attn.logits(x, r).abs().max()
        # With unit-RMS queries and keys a logit is at most sqrt(head_dim) = 2.83, whatever the weights.
        assert (largest <= 8 ** 0.5 + 1e-4) == qk_norm
    assert MultimodalFER(**{**SMALL, "qk_norm": False}).fusion.blocks[1].operator.q_norm.__class__.__name__ == \
        "Identity"


# ---------------------------------------------------------------------------------------------- init
@pytest.mark.parametrize("strategy", INIT_STRATEGIES)
def test_every_init_strategy_gives_finite_logits(strategy):
    model = small_model()
    model.init_weights(strategy)
    model.eval()
    logits = model(make_batch())
    assert logits.shape == (3, 8) and torch.isfinite(logits).all()


def test_zero_residual_makes_every_block_the_identity():
    model = small_model()
    model.init_weights("zero_residual")
    x, r = torch.randn(2, 8, 32), rope(8, 8)
    for block in model.fusion.blocks:
        assert torch.equal(block(x, r)[0], x)


def test_scaled_residual_scales_output_projections_by_depth():
    depth = len(SMALL["layout"])
    xavier, scaled = small_model(), small_model()
    torch.manual_seed(1)
    xavier.init_weights("xavier")
    torch.manual_seed(1)
    scaled.init_weights("scaled_residual")
    ratio = scaled.fusion.blocks[0].mlp.down.weight / xavier.fusion.blocks[0].mlp.down.weight
    assert torch.allclose(ratio, torch.full_like(ratio, (2 * depth) ** -0.5))
    assert torch.equal(scaled.fusion.blocks[0].mlp.up.weight, xavier.fusion.blocks[0].mlp.up.weight)


def test_encoder_strategy_initialises_only_the_encoders():
    scaled, mixed = small_model(visual_input="features"), small_model(visual_input="features")
    torch.manual_seed(1)
    scaled.init_weights("scaled_residual")
    torch.manual_seed(1)
    mixed.init_weights("scaled_residual", encoder_strategy="kaiming")
    conv = next(m for m in mixed.audio_encoder.modules() if isinstance(m, torch.nn.Conv2d))
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.3)  # Kaiming, not Xavier x 0.5
    linear = mixed.visual_encoder.mlp[0]
    assert linear.weight.std().item() == pytest.approx((2 / linear.in_features) ** 0.5, rel=0.3)
    for name in ("fusion", "pool", "classifier"):  # drawn after the encoders: same distribution, other draws
        for key, weight in getattr(scaled, name).state_dict().items():
            if key.endswith("weight") and weight.dim() == 2 and weight.numel() >= 256:
                other = getattr(mixed, name).state_dict()[key]
                assert other.std().item() == pytest.approx(weight.std().item(), rel=0.2), f"{name}.{key}"
    scaled_conv = next(m for m in scaled.audio_encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert scaled_conv.weight.std().item() < conv.weight.std().item() / 2


def test_init_keeps_a_pretrained_frame_backbone():
    model = small_model()
    model.visual_encoder.pretrained = True  # as after ImageNet weights or load_face_pretrained
    backbone = {k: v.clone() for k, v in model.visual_encoder.backbone.state_dict().items()}
    projection = model.visual_encoder.proj[1].weight.clone()
    model.init_weights("xavier")
    assert all(torch.equal(v, model.visual_encoder.backbone.state_dict()[k]) for k, v in backbone.items())
    assert not torch.equal(projection, model.visual_encoder.proj[1].weight)


# ------------------------------------------------------------------------------------------ the model
def test_config_rebuilds_the_model_and_features_input_works():
    model = small_model(visual_input="features", feature_dim=35)
    rebuilt = models.build_model("full", model.config)
    assert rebuilt.parameter_breakdown() == model.parameter_breakdown()
    assert model(make_batch(features=True)).shape == (3, 8)
    assert {"audio_encoder", "visual_encoder", "fusion", "classifier"} <= dict(model.named_children()).keys()


def test_single_modality_model_has_no_other_encoder():
    model = small_model(modalities=["audio"])
    assert not hasattr(model, "visual_encoder")
    batch = make_batch()
    del batch["frames"]
    assert model(batch).shape == (3, 8)
    assert [m.key_labels for m in model.attention_maps(batch)][0] == [f"audio_{i}" for i in range(4)]


def saved_elements(stack: LFM2Stack, x: torch.Tensor) -> int:
    """Number of elements that autograd saves for backward in one forward of `stack`."""
    count = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += tensor.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stack(x)
    return count


def test_gradient_checkpointing_gives_the_same_gradients_from_fewer_saved_tensors():
    batch = make_batch()
    grads, saved = [], []
    for flag in (False, True):
        model = small_model(gradient_checkpointing=flag)  # same seed, same weights, dropout on
        model.train()
        saved.append(saved_elements(model.fusion, torch.randn(3, 8, 32, requires_grad=True)))
        torch.manual_seed(5)
        F.cross_entropy(model(batch), batch["label"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert saved[1] < saved[0] / 4
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


def test_missing_modality_uses_the_learned_token():
    model = small_model()
    model.eval()
    batch = make_batch()
    batch["has_audio"][0] = False
    changed = {**batch, "audio": batch["audio"].clone()}
    changed["audio"][0] = 1e4  # a missing input must never be read
    assert torch.equal(model(batch)[0], model(changed)[0])
    tokens, _, _ = model.tokens(batch)
    expected = model.audio_missing + model.modality_embedding[0]
    assert torch.allclose(tokens[0, :4], expected)
    F.cross_entropy(model(batch), batch["label"]).backward()
    assert model.audio_missing.grad.abs().sum() > 0


def test_modality_dropout_hides_one_modality_in_training_only():
    model = small_model(modality_dropout=0.999)
    batch = make_batch(batch_size=64)
    model.train()
    present = model._drop_modalities({"audio": batch["has_audio"], "visual": batch["has_visual"]})
    assert not (present["audio"] & present["visual"]).any() and (present["audio"] | present["visual"]).all()
    assert 0 < present["audio"].sum() < 64
    model.eval()
    present = model._drop_modalities({"audio": batch["has_audio"], "visual": batch["has_visual"]})
    assert present["audio"].all() and present["visual"].all()


def test_attention_maps_rows_sum_to_one_and_labels_match_tokens():
    model = small_model()
    model.eval()
    maps = model.attention_maps(make_batch())
    assert [m.layer for m in maps] == ["fusion.blocks.1.attn", "fusion.blocks.3.attn", "pool"]
    for m in maps:
        assert m.weights.shape[-2:] == (len(m.query_labels), len(m.key_labels))
        assert torch.allclose(m.weights.sum(-1), torch.ones(()), atol=1e-5)
    assert maps[0].key_labels == [f"audio_{i}" for i in range(4)] + [f"visual_{i}" for i in range(4)]


def test_modality_pools_readout_pools_each_modality_over_its_own_tokens():
    model = small_model(readout="modality_pools")
    model.eval()
    tokens = torch.randn(2, 8, model.config["width"])
    pooled = model.pool(tokens[:, :4], tokens[:, 4:])
    changed = tokens.clone()
    changed[:, 4:] += 5.0  # the visual half only
    pooled_changed = model.pool(changed[:, :4], changed[:, 4:])
    width = model.config["width"]
    assert pooled.shape == (2, 2 * width)
    assert torch.equal(pooled[:, :width], pooled_changed[:, :width])
    assert not torch.allclose(pooled[:, width:], pooled_changed[:, width:])
    maps = model.attention_maps(make_batch())
    assert [m.layer for m in maps][-2:] == ["pool.audio", "pool.visual"]
    assert maps[-1].key_labels == [f"visual_{i}" for i in range(4)]
    assert model(make_batch()).shape == (3, 8)


def test_drop_path_skips_whole_blocks_per_sample_in_training_only():
    torch.manual_seed(0)
    stack = LFM2Stack(16, ["conv", "attn"], n_heads=2, n_kv_heads=1, drop_path=0.9)
    x = torch.randn(64, 6, 16)
    stack.train()
    out = stack(x)
    skipped_all = torch.isclose(out, stack.norm(x), atol=1e-6).flatten(1).all(1)
    assert 0 < skipped_all.sum() < 64  # the last block is skipped with p=0.9, the first with 0.45: both, sometimes
    stack.eval()
    assert torch.equal(stack(x), stack(x))
    assert not torch.isclose(stack(x), stack.norm(x), atol=1e-6).flatten(1).all(1).any()
    with pytest.raises(ValueError, match="drop_path"):
        LFM2Stack(16, ["conv"], n_heads=2, n_kv_heads=1, drop_path=1.0)


def test_float16_autocast_forward_is_finite_on_cpu():
    model = small_model()
    model.init_weights("scaled_residual")
    model.eval()
    with torch.autocast("cpu", dtype=torch.float16):
        logits = model(make_batch())
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()


def test_swiglu_product_runs_in_float32_under_float16_autocast_unless_legacy():
    from models.lfm2 import SwiGLU
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    for float32_product, finite in ((True, True), (False, False)):
        mlp = SwiGLU(16, 32, float32_product)
        with torch.no_grad():  # gate and up outputs of ~300: their product (~9e4) is beyond float16's 65504
            mlp.gate.weight.fill_(300 / 16)
            mlp.up.weight.fill_(300 / 16)
        with torch.autocast("cpu", dtype=torch.float16):
            out = mlp(torch.ones(2, 5, 16))
        assert bool(torch.isfinite(out).all()) == finite
    assert mlp(x).dtype == torch.float32  # without autocast nothing changes


def test_massive_activations_are_planted_in_one_early_block_and_survive_init():
    model = small_model(massive_activations=500.0)
    model.init_weights("scaled_residual")
    mlp = model.fusion.blocks[1].mlp
    assert torch.allclose(mlp.down.weight[:2, :2], 0.02 * torch.eye(2))
    assert torch.equal(mlp.gate.weight[0], mlp.up.weight[1])
    x, positions, _ = model.tokens(make_batch())
    stats = model.fusion.activation_stats(x, positions)
    assert stats["block1.act_max"] > 20 * stats["block0.act_max"]  # the residual stream now holds a large value
    assert model.config["massive_activations"] == 500.0


def test_legacy_script_constant_rebuilds_the_original_architecture(monkeypatch):
    import train_full_model

    monkeypatch.setattr(train_full_model, "LEGACY", True)
    legacy = train_full_model.model_config(35)
    monkeypatch.setattr(train_full_model, "LEGACY", False)
    stable = train_full_model.model_config(35)
    assert legacy["causal_attention"] and legacy["attention_mask_fill"] == -1e9 and not legacy["qk_norm"]
    assert not legacy["float32_residual"] and not legacy["float32_mlp_product"]
    assert "causal_attention" not in stable and stable["qk_norm"]
