"""LFM2-style fusion blocks (Liquid AI's LFM2 layout) for a short joint sequence of audio and visual tokens.

A block is pre-norm: `x + operator(norm(x))` then `x + SwiGLU(norm(x))`, where the operator is either
- a gated short convolution (`"conv"`): project to B, C, x; `B*x`; depthwise convolution of kernel 3 along the
  tokens; `C*(...)`; output projection. Padding is causal (LFM2's own, token t sees t-2..t) or centred (t-1..t+1,
  the natural choice for a classifier that sees the whole clip at once); or
- grouped-query attention (`"attn"`) with rotary position embedding and, unless turned off for the legacy recipe,
  per-head RMSNorm on queries and keys (QK-norm), which bounds the attention logits whatever the weights do.

The layout (which blocks are which) is configurable; LFM2 puts attention in a few blocks and the short convolution
in the rest. Norms run in float32 (`layers.RMSNorm`), attention goes through `layers.attend` (float32 softmax on
the explicit path, boolean masks only), rotary embedding is computed in float32.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.init import mark_residual_output
from models.layers import AttentionMap, RMSNorm, attend

BLOCK_TYPES = ("conv", "attn")
CONV_PADDINGS = ("centred", "causal")


def parse_layout(layout: str | Sequence[str]) -> list[str]:
    """A layout as a list of block types; accepts a list or a comma-separated string ("conv,conv,attn")."""
    kinds = [k.strip() for k in layout.split(",")] if isinstance(layout, str) else list(layout)
    unknown = [k for k in kinds if k not in BLOCK_TYPES]
    if not kinds or unknown:
        raise ValueError(f"layout must be a non-empty list of {BLOCK_TYPES}, got {layout!r}")
    return kinds


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (half-split rotation, as in LFM2/Llama), evaluated in float32."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape (L, head_dim) for integer or float `positions` of shape (L,)."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, Dh) queries or keys by their positions; float32 inside, input dtype out."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class GatedShortConv(nn.Module):
    """LFM2's gated short convolution: out_proj(C * conv(B * x)), the convolution depthwise along the tokens."""

    def __init__(self, width: int, kernel_size: int = 3, padding: str = "centred"):
        super().__init__()
        if padding not in CONV_PADDINGS:
            raise ValueError(f"conv padding must be one of {CONV_PADDINGS}, got {padding!r}")
        if padding == "centred" and kernel_size % 2 == 0:
            raise ValueError(f"centred padding needs an odd kernel size, got {kernel_size}")
        self.padding = padding
        self.kernel_size = kernel_size
        self.in_proj = nn.Linear(width, 3 * width, bias=False)
        self.conv = nn.Conv1d(width, width, kernel_size, groups=width, bias=False)
        self.out_proj = mark_residual_output(nn.Linear(width, width, bias=False))

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        # Explicit zero padding of the (B, D, L) sequence so that causal and centred share one convolution.
        total = self.kernel_size - 1
        left = total if self.padding == "causal" else total // 2
        return F.pad(x, (left, total - left))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_b, gate_c, values = self.in_proj(x).transpose(1, 2).chunk(3, dim=1)
        mixed = self.conv(self._pad(gate_b * values))
        return self.out_proj((gate_c * mixed).transpose(1, 2))


class GroupedQueryAttention(nn.Module):
    """Bidirectional grouped-query attention with optional QK-norm and rotary position embedding."""

    def __init__(self, width: int, n_heads: int, n_kv_heads: int, qk_norm: bool = True):
        super().__init__()
        if width % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"need width % n_heads == 0 and n_heads % n_kv_heads == 0, got {width}, "
                             f"{n_heads}, {n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, width // n_heads
        self.q_proj = nn.Linear(width, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, n_kv_heads * self.head_dim, bias=False)
        self.out_proj = mark_residual_output(nn.Linear(width, width, bias=False))
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()

    def _heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], n_heads, self.head_dim).transpose(1, 2)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Queries, keys and values as (B, H, L, Dh), keys and values repeated to all H query heads."""
        cos, sin = rope
        q = apply_rotary(self.q_norm(self._heads(self.q_proj(x), self.n_heads)), cos, sin)
        k = apply_rotary(self.k_norm(self._heads(self.k_proj(x), self.n_kv_heads)), cos, sin)
        v = self._heads(self.v_proj(x), self.n_kv_heads)
        groups = self.n_heads // self.n_kv_heads
        return q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    def logits(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Pre-softmax attention scores (B, H, L, L) in float32, for diagnosing logit growth."""
        q, k, _ = self.project(x, rope)
        return (q.float() @ k.float().transpose(-2, -1)) / self.head_dim ** 0.5

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self.project(x, rope)
        out, weights = attend(q, k, v, need_weights=need_weights)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.out_proj(out), weights


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = mark_residual_output(nn.Linear(hidden, width, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LFM2Block(nn.Module):
    """Pre-norm residual block: operator (short conv or attention), then SwiGLU."""

    def __init__(self, kind: str, width: int, n_heads: int, n_kv_heads: int, mlp_hidden: int,
                 conv_kernel: int = 3, conv_padding: str = "centred", qk_norm: bool = True, dropout: float = 0.0):
        super().__init__()
        self.kind = kind
        self.operator_norm = RMSNorm(width)
        if kind == "attn":
            self.operator = GroupedQueryAttention(width, n_heads, n_kv_heads, qk_norm)
        else:
            self.operator = GatedShortConv(width, conv_kernel, conv_padding)
        self.mlp_norm = RMSNorm(width)
        self.mlp = SwiGLU(width, mlp_hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        weights = None
        if self.kind == "attn":
            out, weights = self.operator(self.operator_norm(x), rope, need_weights)
        else:
            out = self.operator(self.operator_norm(x))
        x = x + self.dropout(out)
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x, weights


class LFM2Stack(nn.Module):
    """A stack of LFM2 blocks over (B, L, width) tokens, with a final RMSNorm.

    `positions` (L,) gives each token's rotary position; by default 0..L-1. The full model passes each token's
    time-segment index, so that an audio token and the visual token of the same segment share a position.
    """

    def __init__(self, width: int, layout: str | Sequence[str], n_heads: int = 8, n_kv_heads: int = 2,
                 mlp_hidden: int | None = None, conv_kernel: int = 3, conv_padding: str = "centred",
                 qk_norm: bool = True, dropout: float = 0.0, rope_base: float = 10000.0,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.layout = parse_layout(layout)
        self.gradient_checkpointing = gradient_checkpointing
        hidden = mlp_hidden or 4 * width
        self.blocks = nn.ModuleList(
            LFM2Block(kind, width, n_heads, n_kv_heads, hidden, conv_kernel, conv_padding, qk_norm, dropout)
            for kind in self.layout
        )
        self.rotary = RotaryEmbedding(width // n_heads, rope_base)
        self.norm = RMSNorm(width)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        return self.rotary(positions.to(x.device))

    def _run_block(self, block: LFM2Block, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Recompute the block in backward instead of storing its activations; the RNG state is restored, so
            # dropout masks are the same in the recomputation.
            return checkpoint(block, x, rope, use_reentrant=False)[0]
        return block(x, rope)[0]

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        rope = self._rope(x, positions)
        for block in self.blocks:
            x = self._run_block(block, x, rope)
        return self.norm(x)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, labels: list[str], positions: torch.Tensor | None = None,
                       prefix: str = "blocks") -> list[AttentionMap]:
        """Attention weights of every attention block for input tokens `x`, labelled with `labels`."""
        if len(labels) != x.shape[1]:
            raise ValueError(f"{len(labels)} token labels for a sequence of {x.shape[1]} tokens")
        rope = self._rope(x, positions)
        maps = []
        for index, block in enumerate(self.blocks):
            x, weights = block(x, rope, need_weights=block.kind == "attn")
            if weights is not None:
                maps.append(AttentionMap(f"{prefix}.{index}.attn", weights, list(labels), list(labels)))
        return maps

    @torch.no_grad()
    def activation_stats(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> dict[str, float]:
        """Largest |value| of the residual stream after each block and of each attention block's logits.

        A diagnostic for debugging scripts (growth of activations or attention logits precedes a float16
        overflow); it runs the same blocks as `forward`, without gradients.
        """
        rope = self._rope(x, positions)
        stats = {}
        for index, block in enumerate(self.blocks):
            if block.kind == "attn":
                logits = block.operator.logits(block.operator_norm(x), rope)
                stats[f"block{index}.attn_logit_max"] = logits.abs().max().item()
            x = block(x, rope)[0]
            stats[f"block{index}.act_max"] = x.float().abs().max().item()
        return stats
