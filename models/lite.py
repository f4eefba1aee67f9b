"""MultimodalFERLite: audio encoder + visual encoder + fusion + classifier, 10-20M parameters by default.

    audio log-mel (B,1,64,T) -> AudioEncoder -> (B, audio_tokens, W) --+
                                                                       +-> Fusion -> (B, out_dim) -> MLP -> (B, 8)
    frames (B,N,3,S,S) -> FrameEncoder -> (B, visual_tokens, W) -------+
    or features (B,D) -> FeatureEncoder

- `modalities` selects ("audio", "visual"), ("audio",) or ("visual",): single-modality baselines are the same
  class (use fusion "concat" = attention pooling, or "transformer").
- A missing modality (`has_audio`/`has_visual` false) is never encoded; its tokens are a learned placeholder.
  In training, `modality_dropout` hides one of the two modalities of a sample with that probability.
- Stage-wise training freezes children by name: `audio_encoder`, `visual_encoder`, `fusion`, `classifier`
  (the placeholders are top-level parameters and always train).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models import ModelConfigError
from models.encoders import (AudioEncoder, FeatureEncoder, FrameEncoder, drop_one_modality, encode_present)
from models.fusion import Fusion
from models.init import apply_init
from models.layers import AttentionMap, count_parameters

MODALITIES = ("audio", "visual")
VISUAL_INPUTS = ("frames", "features")

class MultimodalFERLite(nn.Module):
    def __init__(
        self,
        modalities: tuple[str, ...] | list[str] = MODALITIES,
        visual_input: str = "frames",
        feature_dim: int = 35,
        width: int = 256,
        n_mels: int = 64,
        audio_channels: tuple[int, ...] | list[int] = (32, 64, 128, 256),
        audio_tokens: int = 8,
        audio_block: str = "vgg",
        audio_time_pool: int = 2,
        frame_backbone: str = "resnet18",
        pretrained: bool = False,
        frame_input_size: int | None = None,
        visual_tokens: int = 8,
        fusion: str = "cross_attention",
        fusion_layers: int = 2,
        n_heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.1,
        encoder_dropout: float = 0.1,
        feature_noise: float = 0.1,
        modality_dropout: float = 0.0,
        num_classes: int = 8,
    ):
        super().__init__()
        modalities = tuple(modalities)
        if not modalities or len(set(modalities)) != len(modalities) or any(m not in MODALITIES for m in modalities):
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        if visual_input not in VISUAL_INPUTS:
            raise ValueError(f"visual_input must be one of {VISUAL_INPUTS}, got '{visual_input}'")
        if not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {modality_dropout}")
        self.config = {
            "modalities": list(modalities), "visual_input": visual_input, "feature_dim": feature_dim,
            "width": width, "n_mels": n_mels, "audio_channels": list(audio_channels), "audio_tokens": audio_tokens,
            "audio_block": audio_block, "audio_time_pool": audio_time_pool,
            "frame_backbone": frame_backbone, "pretrained": pretrained, "frame_input_size": frame_input_size,
            "visual_tokens": visual_tokens, "fusion": fusion, "fusion_layers": fusion_layers, "n_heads": n_heads,
            "mlp_ratio": mlp_ratio, "dropout": dropout, "encoder_dropout": encoder_dropout,
            "feature_noise": feature_noise,
            "modality_dropout": modality_dropout, "num_classes": num_classes,
        }
        self.modalities, self.visual_input, self.modality_dropout = modalities, visual_input, modality_dropout
        if "audio" in modalities:
            self.audio_encoder = AudioEncoder(width, n_mels, tuple(audio_channels), audio_tokens, encoder_dropout,
                                              audio_block, audio_time_pool)
            self.audio_missing = nn.Parameter(torch.randn(audio_tokens, width) * 0.02)
        if "visual" in modalities:
            if visual_input == "frames":
                self.visual_encoder = FrameEncoder(width, frame_backbone, pretrained, n_tokens=visual_tokens,
                                                   input_size=frame_input_size, dropout=encoder_dropout)
            else:
                self.visual_encoder = FeatureEncoder(feature_dim, width, visual_tokens, encoder_dropout, feature_noise)
            self.visual_missing = nn.Parameter(torch.randn(visual_tokens, width) * 0.02)
        self.fusion = Fusion(fusion, width, audio_tokens, visual_tokens, fusion_layers, n_heads, mlp_ratio, dropout,
                             modalities=modalities)
        self.classifier = nn.Sequential(nn.Linear(self.fusion.out_dim, width), nn.GELU(), nn.Dropout(dropout),
                                        nn.Linear(width, num_classes))

    # ------------------------------------------------------------------------------------------- tokens
    def _inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        keys = {"audio": "audio", "visual": self.visual_input}
        missing = [keys[m] for m in self.modalities if batch.get(keys[m]) is None]
        if missing:
            raise KeyError(f"MultimodalFERLite{list(self.modalities)} needs batch keys {missing}")
        return {m: batch[keys[m]] for m in self.modalities}

    def _presence(self, batch: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        present = {}
        for m, x in inputs.items():
            flag = batch.get(f"has_{m}")
            present[m] = (torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if flag is None
                          else flag.to(device=x.device, dtype=torch.bool))
        if self.training and self.modality_dropout > 0 and len(present) == 2:
            present["audio"], present["visual"] = drop_one_modality(present["audio"], present["visual"],
                                                                    self.modality_dropout)
        return present

    def tokens(self, batch: dict) -> dict[str, torch.Tensor]:
        """Per-modality tokens (B, L, width), learned placeholders where a modality is missing or dropped."""
        inputs = self._inputs(batch)
        present = self._presence(batch, inputs)
        out = {}
        for m, x in inputs.items():
            encoder = self.audio_encoder if m == "audio" else self.visual_encoder
            placeholder = self.audio_missing if m == "audio" else self.visual_missing
            out[m] = encode_present(encoder, x, present[m], placeholder)
        return out

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, batch: dict) -> torch.Tensor:
        tokens = self.tokens(batch)
        return self.classifier(self.fusion(tokens.get("audio"), tokens.get("visual")))

    @torch.no_grad()
    def attention_maps(self, batch: dict) -> list[AttentionMap]:
        """Attention weights of the fusion layers and pooling queries, labelled `audio_i` / `visual_j`.

        Call in eval mode: in training mode modality dropout would replace some samples' tokens.
        """
        tokens = self.tokens(batch)
        return self.fusion.attention_maps(tokens.get("audio"), tokens.get("visual"))

    def load_face_pretrained(self, path: str | Path) -> dict:
        """Load a `pretrain_visual.py` face-encoder checkpoint into the frame backbone (frames input only)."""
        if not isinstance(getattr(self, "visual_encoder", None), FrameEncoder):
            raise ModelConfigError("face-pretrained weights need visual_input='frames' and the visual modality")
        return self.visual_encoder.load_face_pretrained(path)

    # ------------------------------------------------------------------------------------ init and size
    def init_weights(self, strategy: str = "scaled_residual", gain: float = 0.5) -> None:
        """Re-initialise with a `models.init` strategy; residual scaling uses the fusion depth.

        A pretrained frame backbone (ImageNet or face-pretrained) keeps its weights; only its projection is reset.
        """
        visual = getattr(self, "visual_encoder", None)
        for name, child in self.named_children():
            if name == "visual_encoder" and isinstance(visual, FrameEncoder) and visual.pretrained:
                apply_init(visual.proj, strategy, gain, self.fusion.depth)
            else:
                apply_init(child, strategy, gain, self.fusion.depth)

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameter count per component; the learned placeholder tokens count under `placeholders`."""
        breakdown = {name: count_parameters(child) for name, child in self.named_children()}
        breakdown["placeholders"] = sum(p.numel() for _, p in self.named_parameters(recurse=False))
        breakdown["total"] = count_parameters(self)
        return breakdown
