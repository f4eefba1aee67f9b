"""SimpleCNN: the small (<0.1M-parameter) audio-visual baseline that must always train (`train_simple_working.py`).

Two small branches (a VGG-style log-mel CNN; a conv stack over face frames, or an MLP over per-clip visual
features), late fusion by concatenation, one linear classifier. A missing modality is never encoded (BatchNorm
statistics see only real inputs); a learned placeholder embedding stands in for it.
"""
from __future__ import annotations

import torch
from torch import nn

from models.encoders import AudioEncoder, BatchNorm1dAnyBatch, encode_present
from models.init import apply_init
from models.layers import count_parameters

MODALITIES = ("audio", "visual")


def conv_stack(in_channels: int, channels: tuple[int, ...], first_stride: int = 1) -> nn.Sequential:
    """Conv-BN-ReLU-MaxPool blocks ending in global average pooling: (B, C, H, W) -> (B, channels[-1])."""
    layers: list[nn.Module] = []
    for i, out_channels in enumerate(channels):
        stride = first_stride if i == 0 else 1
        layers += [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                   nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        layers.append(nn.MaxPool2d(2) if i < len(channels) - 1 else nn.AdaptiveAvgPool2d(1))
        in_channels = out_channels
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


class FeatureMLP(nn.Module):
    """Per-clip feature vector (B, D) -> (B, width): batch-normed MLP with input noise and dropout."""

    def __init__(self, in_dim: int, width: int, dropout: float, input_noise: float):
        super().__init__()
        self.input_noise = input_noise
        self.input_norm = BatchNorm1dAnyBatch(in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, width), BatchNorm1dAnyBatch(width), nn.ReLU(inplace=True),
                                 nn.Dropout(dropout), nn.Linear(width, width), nn.ReLU(inplace=True))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(features)
        if self.training and self.input_noise > 0:
            x = x + self.input_noise * torch.randn_like(x)
        return self.mlp(x)


class SimpleCNN(nn.Module):
    def __init__(
        self,
        modalities: tuple[str, ...] | list[str] = MODALITIES,
        visual_input: str = "frames",
        feature_dim: int = 35,
        channels: tuple[int, ...] | list[int] = (16, 32, 32),
        audio_channels: tuple[int, ...] | list[int] = (8, 16, 32, 48),
        num_classes: int = 8,
        dropout: float = 0.3,
        feature_noise: float = 0.1,
    ):
        super().__init__()
        modalities = tuple(modalities)
        if not modalities or any(m not in MODALITIES for m in modalities):
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        if visual_input not in ("frames", "features"):
            raise ValueError(f"visual_input must be 'frames' or 'features', got '{visual_input}'")
        self.config = {"modalities": list(modalities), "visual_input": visual_input, "feature_dim": feature_dim,
                       "channels": list(channels), "audio_channels": list(audio_channels),
                       "num_classes": num_classes, "dropout": dropout, "feature_noise": feature_noise}
        width = channels[-1]
        self.modalities = modalities
        self.visual_input = visual_input
        widths = []
        if "audio" in modalities:
            # VGG stages (two 3x3 convs + max-pool): the earlier stride-2 stack of 3 single convs (14K parameters)
            # reached only 45% on its own training clips; this one no longer underfits (docs/results.md, "What changed
            # and what it bought").
            self.audio_encoder = AudioEncoder(audio_channels[-1], channels=tuple(audio_channels), n_tokens=1,
                                              dropout=0.0)
            self.audio_encoder.proj = nn.Identity()  # the pooled CNN features are the embedding
            self.audio_missing = nn.Parameter(torch.zeros(1, audio_channels[-1]))
            widths.append(audio_channels[-1])
        if "visual" in modalities:
            if visual_input == "frames":
                self.visual_encoder = conv_stack(3, tuple(channels), first_stride=2)
            else:
                self.visual_encoder = FeatureMLP(feature_dim, width, dropout, feature_noise)
            self.visual_missing = nn.Parameter(torch.zeros(1, width))
            widths.append(width)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(sum(widths), num_classes))

    def encode_visual(self, visual: torch.Tensor) -> torch.Tensor:
        """(B, D) features or (B, N, 3, S, S) frames -> (B, 1, width)."""
        if self.visual_input == "features":
            return self.visual_encoder(visual)[:, None]
        b, n = visual.shape[:2]
        per_frame = self.visual_encoder(visual.flatten(0, 1))
        return per_frame.view(b, n, -1).mean(dim=1, keepdim=True)

    def forward(self, batch: dict) -> torch.Tensor:
        embeddings = []
        if "audio" in self.modalities:
            embeddings.append(encode_present(self.audio_encoder, batch["audio"], batch["has_audio"],
                                             self.audio_missing))
        if "visual" in self.modalities:
            visual = batch["features"] if self.visual_input == "features" else batch["frames"]
            embeddings.append(encode_present(self.encode_visual, visual, batch["has_visual"], self.visual_missing))
        return self.classifier(torch.cat(embeddings, dim=-1)[:, 0])

    def init_weights(self, strategy: str = "kaiming", gain: float = 1.0) -> None:
        apply_init(self, strategy, gain=gain)

    def parameter_breakdown(self) -> dict[str, int]:
        parts = {name: count_parameters(child) for name, child in self.named_children()}
        parts["missing_tokens"] = sum(p.numel() for n, p in self.named_parameters(recurse=False))
        return parts
