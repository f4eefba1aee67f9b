"""Building blocks shared by the Lite and the full model, written once with half precision in mind.

NaN-safety rules they follow (see DESIGN.md): norms are computed in float32 with an eps that survives float16,
softmax runs in float32, masks are booleans (never -inf or -1e9 added in half precision), and a missing
modality is a learned token rather than zeros pushed through a normalisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-5  # the smallest eps that stays non-zero after a float16 round trip of the variance


class RMSNorm(nn.Module):
    """RMSNorm evaluated in float32 whatever the autocast dtype, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


@dataclass
class AttentionMap:
    """Attention weights of one layer, with labels for the query and key tokens (e.g. `audio_0`, `visual_3`)."""

    layer: str
    weights: torch.Tensor  # (B, H, Lq, Lk), float32, rows sum to 1
    query_labels: list[str]
    key_labels: list[str]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention over (B, H, L, Dh) tensors (every key is attended: a missing modality is a
    learned token, not padding).

    The fast fused kernel is used for training; the explicit float32 path is used only when the weights are asked
    for (visualisation, debugging).
    """
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v), None
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    weights = scores.softmax(dim=-1)
    return (weights @ v.float()).to(v.dtype), weights


def modality_token_labels(n_audio: int, n_visual: int) -> list[str]:
    return [f"audio_{i}" for i in range(n_audio)] + [f"visual_{i}" for i in range(n_visual)]


def substitute_missing(embedding: torch.Tensor, present: torch.Tensor, placeholder: torch.Tensor) -> torch.Tensor:
    """Replace the embedding of samples whose modality is absent by a learned placeholder.

    `embedding` is (B, ..., D), `present` a boolean (B,), `placeholder` broadcastable to one sample's embedding.
    """
    shape = (-1,) + (1,) * (embedding.dim() - 1)
    return torch.where(present.view(shape), embedding, placeholder.to(embedding.dtype).expand_as(embedding))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
