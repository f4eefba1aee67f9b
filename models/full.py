"""MultimodalFER: the full (~150M-parameter) audio-visual model with LFM2 fusion (`train_full_model.py`).

    audio (B, 1, 64, T)    -> AudioEncoder                       -> (B, S, width) + audio embedding
    frames (B, N, 3, H, W) -> FrameEncoder (or FeatureEncoder)   -> (B, S, width) + visual embedding
    concatenated 2S tokens -> LFM2 stack -> attention pool -> classifier -> (B, 8) logits

`readout` chooses the head: "joint" (one attention pool over all fused tokens, then a linear layer) or
"modality_pools" (Lite's concat head, `models.fusion.Fusion("concat")`: one `n_heads`-head attention pool per
modality over its own fused tokens, concatenated, then a two-layer MLP).

Each token's rotary position is its time-segment index, so `audio_i` and `visual_i` (the same stretch of the clip)
share a position and attention sees audio-visual time offsets directly. The short convolutions run over each
modality's tokens separately (`conv_per_modality`), so their kernel only mixes tokens that are neighbours in time.
A missing modality, or one dropped by modality dropout in training, is a learned placeholder (S, width) that never
goes through the encoder.

The original 149M model produced NaN from the first batch; what this version does about it
(docs/first_batch_nan.md; `debug_gradients.py --legacy_cause=...` reproduces each cause): float32 norms and softmax,
QK-norm, no additive masks, bidirectional attention, each block called once, the SwiGLU product in float32 under
float16 autocast, depth-scaled or zero-initialised residual output projections (`init_weights`), and a float32
residual stream. Every one of these has a legacy switch among the constructor's arguments (the block after
`num_classes`); `massive_activations` plants the large activations of a bfloat16-trained model in the weights.

`gradient_checkpointing` recomputes each fusion block in backward. The encoders are not checkpointed: recomputing
a whole encoder brings all of its activations back at once during its backward, so the peak would barely drop,
and BatchNorm would count each batch twice in its running statistics (`benchmarks/memory_estimate.py` measures it).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from models.encoders import (AttentionPool, AudioEncoder, FeatureEncoder, FrameEncoder, drop_one_modality,
                             encode_present)
from models.fusion import Fusion
from models.init import apply_init
from models.layers import AttentionMap, count_parameters, modality_token_labels
from models.lfm2 import LFM2Stack, plant_massive_activations

MODALITIES = ("audio", "visual")
VISUAL_INPUTS = ("frames", "features")
# LFM2-350M's block layout: 16 blocks, attention in 6 of them (2, 5, 8, 10, 12, 14), the short convolution elsewhere.
LFM2_LAYOUT = ("conv", "conv", "attn", "conv", "conv", "attn", "conv", "conv",
               "attn", "conv", "attn", "conv", "attn", "conv", "attn", "conv")
READOUTS = ("joint", "modality_pools")
MASSIVE_BLOCK = 1  # the block whose MLP writes emulated massive activations (LLMs grow them in their first blocks)


class MultimodalFER(nn.Module):
    def __init__(
        self,
        modalities: Sequence[str] = MODALITIES,
        visual_input: str = "frames",
        feature_dim: int = 35,
        width: int = 768,
        n_segments: int = 8,
        audio_channels: Sequence[int] = (32, 64, 128, 256),
        frame_backbone: str = "resnet18",
        pretrained: bool = False,
        frame_input_size: int | None = None,
        layout: str | Sequence[str] = LFM2_LAYOUT,  # or "lfm2" (this layout), or "conv,attn,..."
        n_heads: int = 12,
        n_kv_heads: int = 4,
        mlp_hidden: int = 2816,
        conv_kernel: int = 3,
        conv_padding: str = "centred",
        qk_norm: bool = True,
        rope_base: float = 10000.0,
        dropout: float = 0.1,
        encoder_dropout: float = 0.1,
        feature_noise: float = 0.1,
        modality_dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        num_classes: int = 8,
        conv_per_modality: bool = True,
        readout: str = "joint",
        drop_path: float = 0.0,
        # Legacy switches (issue 12): the stable value first; see models/lfm2.py for what each does.
        float32_residual: bool = True,
        float32_norms: bool = True,
        float32_mlp_product: bool = True,
        repeat_layer_calls: int = 1,
        causal_attention: bool = False,
        attention_mask_fill: float | None = None,
        massive_activations: float = 0.0,
    ):
        super().__init__()
        modalities = tuple(modalities)
        if not modalities or any(m not in MODALITIES for m in modalities):
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        if visual_input not in VISUAL_INPUTS:
            raise ValueError(f"visual_input must be 'frames' or 'features', got '{visual_input}'")
        if not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {modality_dropout}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got '{readout}'")
        layout = list(LFM2_LAYOUT) if layout == "lfm2" else layout if isinstance(layout, str) else list(layout)
        self.config = {
            "modalities": list(modalities), "visual_input": visual_input, "feature_dim": feature_dim,
            "width": width, "n_segments": n_segments, "audio_channels": list(audio_channels),
            "frame_backbone": frame_backbone, "pretrained": pretrained, "frame_input_size": frame_input_size,
            "layout": layout, "n_heads": n_heads, "n_kv_heads": n_kv_heads, "mlp_hidden": mlp_hidden,
            "conv_kernel": conv_kernel, "conv_padding": conv_padding, "qk_norm": qk_norm, "rope_base": rope_base,
            "dropout": dropout, "encoder_dropout": encoder_dropout, "feature_noise": feature_noise,
            "modality_dropout": modality_dropout,
            "gradient_checkpointing": gradient_checkpointing, "num_classes": num_classes,
            "conv_per_modality": conv_per_modality, "readout": readout, "drop_path": drop_path,
            "float32_residual": float32_residual,
            "float32_norms": float32_norms, "float32_mlp_product": float32_mlp_product,
            "repeat_layer_calls": repeat_layer_calls, "causal_attention": causal_attention,
            "attention_mask_fill": attention_mask_fill, "massive_activations": massive_activations,
        }
        self.modalities, self.visual_input, self.n_segments = modalities, visual_input, n_segments
        self.modality_dropout = modality_dropout
        self.float32_residual, self.attention_mask_fill = float32_residual, attention_mask_fill
        self.massive_activations = massive_activations
        if "audio" in modalities:
            self.audio_encoder = AudioEncoder(width, channels=tuple(audio_channels), n_tokens=n_segments,
                                              dropout=encoder_dropout)
            self.audio_missing = nn.Parameter(torch.randn(n_segments, width) * 0.02)
        if "visual" in modalities:
            if visual_input == "frames":
                self.visual_encoder = FrameEncoder(width, frame_backbone, pretrained, n_tokens=n_segments,
                                                   input_size=frame_input_size, dropout=encoder_dropout)
            else:
                self.visual_encoder = FeatureEncoder(feature_dim, width, n_tokens=n_segments, dropout=encoder_dropout,
                                                     input_noise=feature_noise)
            self.visual_missing = nn.Parameter(torch.randn(n_segments, width) * 0.02)
        self.modality_embedding = nn.Parameter(torch.randn(len(modalities), width) * 0.02)
        self.fusion = LFM2Stack(width, layout, n_heads, n_kv_heads, mlp_hidden, conv_kernel, conv_padding,
                                qk_norm, dropout, rope_base, gradient_checkpointing,
                                conv_sequences=len(modalities) if conv_per_modality else 1,
                                repeat_calls=repeat_layer_calls, causal_attention=causal_attention,
                                mask_fill=attention_mask_fill, float32_norms=float32_norms,
                                float32_mlp_product=float32_mlp_product, drop_path=drop_path)
        if readout == "joint":
            self.pool = AttentionPool(width)
            self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))
        else:
            self.pool = Fusion("concat", width, n_segments, n_segments, n_heads=n_heads, modalities=modalities)
            self.classifier = nn.Sequential(nn.Linear(self.pool.out_dim, width), nn.GELU(), nn.Dropout(dropout),
                                            nn.Linear(width, num_classes))
        self._plant_massive_activations()

    # ------------------------------------------------------------------------------------------- tokens
    def _present(self, batch: dict, modality: str, reference: torch.Tensor) -> torch.Tensor:
        present = batch.get(f"has_{modality}")
        if present is None:
            return torch.ones(reference.shape[0], dtype=torch.bool, device=reference.device)
        return present.to(device=reference.device, dtype=torch.bool)

    def _drop_modalities(self, present: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """In training, hide one of the two modalities of a sample with probability `modality_dropout`.

        Only samples that have both are eligible, so no sample ever loses its last modality.
        """
        if not (self.training and self.modality_dropout > 0 and len(present) == 2):
            return present
        audio, visual = drop_one_modality(present["audio"], present["visual"], self.modality_dropout)
        return {"audio": audio, "visual": visual}

    def _modality(self, modality: str) -> tuple[nn.Module, nn.Parameter, str]:
        """Encoder, learned missing-modality placeholder and batch key of `modality`."""
        if modality == "audio":
            return self.audio_encoder, self.audio_missing, "audio"
        return self.visual_encoder, self.visual_missing, self.visual_input

    def tokens(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Joint token sequence (B, L, width) before fusion, each token's rotary position, and token labels."""
        x, positions, labels, _ = self._tokens_and_mask(batch)
        return x, positions, labels

    def _tokens_and_mask(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor | None]:
        """`tokens`, and the key mask (B, L) of the legacy masked attention (None in the stable model)."""
        inputs = {}
        for modality in self.modalities:
            key = self._modality(modality)[2]
            if key not in batch:
                raise KeyError(f"MultimodalFER with modality '{modality}' needs batch['{key}']")
            inputs[modality] = batch[key]
        present = self._drop_modalities({m: self._present(batch, m, inputs[m]) for m in self.modalities})
        parts = []
        for index, modality in enumerate(self.modalities):
            encoder, placeholder, _ = self._modality(modality)
            encoded = encode_present(encoder, inputs[modality], present[modality], placeholder)
            if self.float32_residual:
                # The residual stream stays float32 under autocast (the matmuls inside the blocks still run in half
                # precision): sixteen residual additions in float16 is where activations would first overflow.
                parts.append(encoded.float() + self.modality_embedding[index])
            else:  # legacy: the stream keeps the projections' dtype (float16 under autocast), as the original did
                parts.append(encoded + self.modality_embedding[index].to(encoded.dtype))
        x = torch.cat(parts, dim=1)
        positions = torch.arange(self.n_segments, device=x.device).repeat(len(parts))
        n_audio = self.n_segments if "audio" in self.modalities else 0
        n_visual = self.n_segments if "visual" in self.modalities else 0
        key_mask = None
        if self.attention_mask_fill is not None:  # legacy: a missing modality's tokens are masked out of attention
            key_mask = torch.cat([present[m][:, None].expand(-1, self.n_segments) for m in self.modalities], dim=1)
        return x, positions, modality_token_labels(n_audio, n_visual), key_mask

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, batch: dict) -> torch.Tensor:
        x, positions, _, key_mask = self._tokens_and_mask(batch)
        fused = self.fusion(x, positions, key_mask)
        pooled = self.pool(fused) if self.config["readout"] == "joint" else self.pool(*self._split(fused))
        return self.classifier(pooled)

    def _split(self, fused: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(audio, visual) fused tokens for Lite's concat head (None for a modality the model does not have)."""
        chunks = dict(zip(self.modalities, fused.split(self.n_segments, dim=1)))
        return chunks.get("audio"), chunks.get("visual")

    @torch.no_grad()
    def attention_maps(self, batch: dict) -> list[AttentionMap]:
        """Weights of every attention block of the fusion stack, then of the pooling query over the tokens."""
        x, positions, labels, key_mask = self._tokens_and_mask(batch)
        maps = self.fusion.attention_maps(x, labels, positions, prefix="fusion.blocks", key_mask=key_mask)
        fused = self.fusion(x, positions, key_mask)
        if self.config["readout"] == "joint":
            _, weights = self.pool(fused, return_weights=True)
            return maps + [AttentionMap("pool", weights, ["pool_query"], list(labels))]
        return maps + self.pool.attention_maps(*self._split(fused))

    # ------------------------------------------------------------------------------------ init and size
    def init_weights(self, strategy: str = "scaled_residual", gain: float = 0.5,
                     encoder_strategy: str | None = None) -> None:
        """Re-initialise with a `models.init` strategy; residual scaling uses the number of fusion blocks.

        `encoder_strategy` (default: `strategy`) initialises the audio and visual encoders, ReLU + BatchNorm
        networks whose usual init is Kaiming, while the fusion stack keeps its depth-scaled one. An
        ImageNet-pretrained frame backbone keeps its weights.
        """
        depth = len(self.fusion.blocks)
        visual = getattr(self, "visual_encoder", None)
        keep_backbone = isinstance(visual, FrameEncoder) and visual.pretrained
        for name, child in self.named_children():
            child_strategy = (encoder_strategy or strategy) if name.endswith("_encoder") else strategy
            apply_init(child.proj if name == "visual_encoder" and keep_backbone else child, child_strategy, gain,
                       depth)
        self._plant_massive_activations()

    def _plant_massive_activations(self) -> None:
        """Emulated massive activations (the `massive_activations` switch) survive any re-initialisation."""
        if self.massive_activations:
            plant_massive_activations(self.fusion.blocks[MASSIVE_BLOCK].mlp, self.massive_activations)

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameter count per component (the learned missing-modality tokens count under `embeddings`)."""
        breakdown = {name: count_parameters(child) for name, child in self.named_children()}
        breakdown["embeddings"] = sum(p.numel() for p in self.parameters(recurse=False))
        breakdown["total"] = count_parameters(self)
        return breakdown
