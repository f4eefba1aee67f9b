"""FaceClassifier: the per-frame face encoder with a linear head, as `pretrain_visual.py` trains it on FER2013.

It lives in `models/` (as `build_model("face_encoder", config)`) so that a pretraining crash dump can be replayed
by `debug_gradients.py --replay=...` like any other model's.
"""
from __future__ import annotations

import torch
from torch import nn

from models.encoders import FrameEncoder


class FaceClassifier(nn.Module):
    """FrameEncoder + linear classifier over one frame per sample; `encoder.backbone` is what gets transferred."""

    def __init__(self, backbone: str, width: int, num_classes: int, dropout: float, pretrained: bool,
                 image_size: int, class_names: list[str]):
        super().__init__()
        self.config = {"backbone": backbone, "width": width, "num_classes": num_classes, "dropout": dropout,
                       "pretrained": pretrained, "image_size": image_size, "class_names": list(class_names)}
        self.encoder = FrameEncoder(width, backbone=backbone, pretrained=pretrained)
        self.head = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(width, num_classes))

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.encoder(batch["frames"])[:, 0])
