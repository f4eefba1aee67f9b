"""SimpleCNN: the ~29K-parameter audio-visual baseline that must always train (`train_simple_working.py`).

Two small conv stacks (log-mel; face frames, or an MLP over per-clip visual features), late fusion by
concatenation, one linear classifier. A missing modality is replaced by a learned placeholder embedding.
"""
from __future__ import annotations

import torch
from torch import nn

from models.init import apply_init
from models.layers import count_parameters, substitute_missing

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


class SimpleCNN(nn.Module):
    def __init__(
        self,
        modalities: tuple[str, ...] | list[str] = MODALITIES,
        visual_input: str = "frames",
        feature_dim: int = 35,
        channels: tuple[int, ...] | list[int] = (16, 32, 32),
        num_classes: int = 8,
        dropout: float = 0.2,
    ):
        super().__init__()
        modalities = tuple(modalities)
        if not modalities or any(m not in MODALITIES for m in modalities):
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        if visual_input not in ("frames", "features"):
            raise ValueError(f"visual_input must be 'frames' or 'features', got '{visual_input}'")
        self.config = {"modalities": list(modalities), "visual_input": visual_input, "feature_dim": feature_dim,
                       "channels": list(channels), "num_classes": num_classes, "dropout": dropout}
        width = channels[-1]
        self.modalities = modalities
        self.visual_input = visual_input
        if "audio" in modalities:
            # BatchNorm over the whole batch normalises the log-mel scale without a per-clip std (silent clips);
            # the stride-2 first layer quarters every later activation, which is what CPU training time goes to.
            self.audio_encoder = nn.Sequential(nn.BatchNorm2d(1), conv_stack(1, tuple(channels), first_stride=2))
            self.audio_missing = nn.Parameter(torch.zeros(width))
        if "visual" in modalities:
            if visual_input == "frames":
                self.visual_encoder = conv_stack(3, tuple(channels), first_stride=2)
            else:
                self.visual_encoder = nn.Sequential(nn.BatchNorm1d(feature_dim), nn.Linear(feature_dim, width),
                                                    nn.ReLU(inplace=True), nn.Linear(width, width),
                                                    nn.ReLU(inplace=True))
            self.visual_missing = nn.Parameter(torch.zeros(width))
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(width * len(modalities), num_classes))

    def encode_visual(self, batch: dict) -> torch.Tensor:
        if self.visual_input == "features":
            return self.visual_encoder(batch["features"])
        frames = batch["frames"]
        b, n = frames.shape[:2]
        per_frame = self.visual_encoder(frames.flatten(0, 1))
        return per_frame.view(b, n, -1).mean(dim=1)

    def forward(self, batch: dict) -> torch.Tensor:
        embeddings = []
        if "audio" in self.modalities:
            audio = self.audio_encoder(batch["audio"])
            embeddings.append(substitute_missing(audio, batch["has_audio"], self.audio_missing))
        if "visual" in self.modalities:
            visual = self.encode_visual(batch)
            embeddings.append(substitute_missing(visual, batch["has_visual"], self.visual_missing))
        return self.classifier(torch.cat(embeddings, dim=-1))

    def init_weights(self, strategy: str = "kaiming", gain: float = 1.0) -> None:
        apply_init(self, strategy, gain=gain)

    def parameter_breakdown(self) -> dict[str, int]:
        parts = {name: count_parameters(child) for name, child in self.named_children()}
        parts["missing_tokens"] = sum(p.numel() for n, p in self.named_parameters(recurse=False))
        return parts
