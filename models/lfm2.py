"""LFM2-style fusion blocks (Liquid AI's LFM2 layout) for a short joint sequence of audio and visual tokens.

A block is pre-norm: `x + operator(norm(x))` then `x + SwiGLU(norm(x))`, where the operator is either
- a gated short convolution (`"conv"`): project to B, C, x; `B*x`; depthwise convolution of kernel 3 along the
  tokens; `C*(...)`; output projection. Padding is causal (LFM2's own, token t sees t-2..t) or centred (t-1..t+1,
  the natural choice for a classifier that sees the whole clip at once); or
- grouped-query attention (`"attn"`) with rotary position embedding and, unless turned off for the legacy recipe,
  per-head RMSNorm on queries and keys (QK-norm), which bounds the attention logits whatever the weights do.

The layout (which blocks are which) is configurable; LFM2 puts attention in a few blocks and the short convolution
in the rest. Norms run in float32 (`layers.RMSNorm`), attention goes through `layers.attend` (float32 softmax on
the explicit path, boolean masks only), rotary embedding is computed in float32, and under float16 autocast the
SwiGLU product and its down projection run in float32 (large activations overflow float16 there first).

The short convolution can run over several independent sequences laid end to end (`conv_sequences`: the full
model's audio tokens, then its visual tokens), so that its kernel never mixes the last audio token with the first
visual one, which are neighbours by index but not in time.

Legacy switches (issue 12: the original model's first-batch NaN), each off by default: norms in the input dtype
(`float32_norms=False`), the SwiGLU product in float16 (`float32_mlp_product=False`), every block applied
`repeat_calls` times, causal attention (`causal_attention`, as Hugging Face's LFM2) and an additive mask filled
with `mask_fill` (e.g. -1e9) in the compute dtype; `plant_massive_activations` emulates the large activations
of a model trained in bfloat16.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.init import mark_residual_output
from models.layers import AttentionMap, RMSNorm, attend

BLOCK_TYPES = ("conv", "attn")
CONV_PADDINGS = ("centred", "causal")
# Assumed size of a trained down-projection weight that writes a massive activation: LFM2's initializer_range.
MASSIVE_DOWN_WEIGHT = 0.02


def parse_layout(layout: str | Sequence[str]) -> list[str]:
    """A layout as a list of block types; accepts a list or a comma-separated string ("conv,conv,attn").

    "none" is the empty stack (only the final norm): the ablation of the fusion blocks themselves.
    """
    if layout == "none":
        return []
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


class InputDtypeRMSNorm(RMSNorm):
    """Legacy: RMSNorm computed in its input's dtype, as in a model whose weights are float16 (`model.half()`,
    `from_pretrained(..., torch_dtype=torch.float16)`). Its square overflows float16 above |x| = 256: the token's
    variance becomes inf and the whole token is normalised to zeros. (On CUDA, autocast itself runs `pow` and
    `rsqrt` in float32, so a float32 model under autocast does not show this; CPU autocast does not.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed * self.weight.to(x.dtype)


def make_norm(dim: int, float32: bool = True) -> RMSNorm:
    return RMSNorm(dim) if float32 else InputDtypeRMSNorm(dim)


def float16_autocast(x: torch.Tensor) -> bool:
    """True inside float16 autocast on `x`'s device (bfloat16 has float32's range and needs no care)."""
    device = x.device.type
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16


class GatedShortConv(nn.Module):
    """LFM2's gated short convolution: out_proj(C * conv(B * x)), the convolution depthwise along the tokens."""

    def __init__(self, width: int, kernel_size: int = 3, padding: str = "centred", n_sequences: int = 1):
        super().__init__()
        if padding not in CONV_PADDINGS:
            raise ValueError(f"conv padding must be one of {CONV_PADDINGS}, got {padding!r}")
        if padding == "centred" and kernel_size % 2 == 0:
            raise ValueError(f"centred padding needs an odd kernel size, got {kernel_size}")
        self.padding = padding
        self.kernel_size = kernel_size
        self.n_sequences = n_sequences  # independent sequences laid end to end (the full model: one per modality)
        self.in_proj = nn.Linear(width, 3 * width, bias=False)
        self.conv = nn.Conv1d(width, width, kernel_size, groups=width, bias=False)
        self.out_proj = mark_residual_output(nn.Linear(width, width, bias=False))

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        # Explicit zero padding of the (B, D, L) sequence so that causal and centred share one convolution.
        total = self.kernel_size - 1
        left = total if self.padding == "causal" else total // 2
        return F.pad(x, (left, total - left))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        if length % self.n_sequences:
            raise ValueError(f"{length} tokens cannot be split into {self.n_sequences} equal sequences")
        # (B, n*S, D) -> (B*n, S, D): each sequence is padded on its own, so the kernel never crosses a boundary.
        x = x.reshape(batch * self.n_sequences, length // self.n_sequences, width)
        gate_b, gate_c, values = self.in_proj(x).transpose(1, 2).chunk(3, dim=1)
        mixed = self.conv(self._pad(gate_b * values))
        return self.out_proj((gate_c * mixed).transpose(1, 2)).reshape(batch, length, width)


class ScaledDotProductAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v, a module of its own so that hooks name it when the softmax goes non-finite.

    Without masks (the stable model: a missing modality is a learned token, attention is bidirectional) it is
    `layers.attend`. With a causal or key mask (`key_mask` (B, Lk), True = may be attended):
    - `mask_fill=None`: boolean masking of float32 scores with float32's lowest value; a fully masked row gets
      uniform weights, never NaN;
    - `mask_fill` a number (legacy): scores in the compute dtype plus an additive mask (0 where allowed,
      `mask_fill` elsewhere) in the same dtype, softmax in that dtype, as older transformers code did. -1e9
      becomes -inf in float16, and a row whose keys are all masked (a causal query that sees only a missing
      modality) is 0/0 = NaN.
    """

    def __init__(self, causal: bool = False, mask_fill: float | None = None):
        super().__init__()
        self.causal, self.mask_fill = causal, mask_fill

    def allowed(self, q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Boolean (B or 1, 1, Lq, Lk) of the keys each query may attend; None when everything is allowed."""
        allowed = None
        if self.causal:
            allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()[None, None]
        if key_mask is not None:
            keys = key_mask[:, None, None, :].to(device=q.device, dtype=torch.bool)
            allowed = keys if allowed is None else allowed & keys
        return allowed

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        allowed = self.allowed(q, k, key_mask)
        if allowed is None:
            return attend(q, k, v, need_weights=need_weights)
        if self.mask_fill is None:
            scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
            weights = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(dim=-1)
            return (weights @ v.float()).to(v.dtype), weights if need_weights else None
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        # Built in float32, then cast like the scores: -1e9 becomes -inf in float16 (a float16 masked_fill with
        # -1e9 would raise instead of overflowing, which is why such code adds a cast mask).
        additive = torch.zeros(allowed.shape, device=q.device).masked_fill(~allowed, self.mask_fill)
        weights = (scores + additive.to(scores.dtype)).softmax(dim=-1)
        return weights @ v, weights if need_weights else None


class GroupedQueryAttention(nn.Module):
    """Grouped-query attention (bidirectional unless `causal`) with optional QK-norm and rotary embedding."""

    def __init__(self, width: int, n_heads: int, n_kv_heads: int, qk_norm: bool = True, causal: bool = False,
                 mask_fill: float | None = None, float32_norms: bool = True):
        super().__init__()
        if width % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"need width % n_heads == 0 and n_heads % n_kv_heads == 0, got {width}, "
                             f"{n_heads}, {n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, width // n_heads
        self.q_proj = nn.Linear(width, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, n_kv_heads * self.head_dim, bias=False)
        self.out_proj = mark_residual_output(nn.Linear(width, width, bias=False))
        self.q_norm = make_norm(self.head_dim, float32_norms) if qk_norm else nn.Identity()
        self.k_norm = make_norm(self.head_dim, float32_norms) if qk_norm else nn.Identity()
        self.attention = ScaledDotProductAttention(causal, mask_fill)

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
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self.project(x, rope)
        out, weights = self.attention(q, k, v, key_mask, need_weights)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.out_proj(out), weights


class GatedProduct(nn.Module):
    """silu(gate) * up, SwiGLU's hidden activation: a module of its own so that hooks can name it, since this
    product is where the large activations of a trained model overflow float16 first."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)). Under float16 autocast the product and the down projection run in float32
    unless `float32_product=False` (legacy): T5's "keep `wo` in float32" fix, paid only where float16 is in use."""

    def __init__(self, width: int, hidden: int, float32_product: bool = True):
        super().__init__()
        self.float32_product = float32_product
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.product = GatedProduct()
        self.down = mark_residual_output(nn.Linear(hidden, width, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float32_product and float16_autocast(x):
            gate, up = self.gate(x).float(), self.up(x).float()
            with torch.autocast(x.device.type, enabled=False):
                return self.down(self.product(gate, up))
        return self.down(self.product(self.gate(x), self.up(x)))


@torch.no_grad()
def plant_massive_activations(mlp: SwiGLU, magnitude: float, n_units: int = 2, seed: int = 1234) -> None:
    """Emulate the "massive activations" of a model trained in bfloat16 (a few residual channels in the hundreds
    to thousands, written by an early block's MLP) in the weights of `mlp`.

    `n_units` hidden units read one fixed direction d of the normalised input with gate and up rows sqrt(P) * d,
    so their product is about P * z^2 for a token with z = d . x > 0 (z ~ N(0, 1) for unit-RMS tokens); their
    down-projection weights, of a trained model's size MASSIVE_DOWN_WEIGHT, write it into the first `n_units`
    residual channels. With P = magnitude / MASSIVE_DOWN_WEIGHT, a token at z = 1 gets `magnitude` there, while
    the product itself is 50x larger: float16 (max 65504) overflows there from magnitude ~1310 at z = 1.
    """
    direction = torch.randn(mlp.gate.in_features, generator=torch.Generator().manual_seed(seed))
    gain = math.sqrt(magnitude / MASSIVE_DOWN_WEIGHT)
    for weight in (mlp.gate.weight, mlp.up.weight):
        weight[:n_units] = gain * direction / direction.norm()
    mlp.down.weight[:, :n_units] = 0.0
    mlp.down.weight[:n_units, :n_units] = MASSIVE_DOWN_WEIGHT * torch.eye(n_units)


class LFM2Block(nn.Module):
    """Pre-norm residual block: operator (short conv or attention), then SwiGLU."""

    def __init__(self, kind: str, width: int, n_heads: int, n_kv_heads: int, mlp_hidden: int,
                 conv_kernel: int = 3, conv_padding: str = "centred", qk_norm: bool = True, dropout: float = 0.0,
                 conv_sequences: int = 1, causal_attention: bool = False, mask_fill: float | None = None,
                 float32_norms: bool = True, float32_mlp_product: bool = True):
        super().__init__()
        self.kind = kind
        self.operator_norm = make_norm(width, float32_norms)
        if kind == "attn":
            self.operator = GroupedQueryAttention(width, n_heads, n_kv_heads, qk_norm, causal_attention, mask_fill,
                                                  float32_norms)
        else:
            self.operator = GatedShortConv(width, conv_kernel, conv_padding, conv_sequences)
        self.mlp_norm = make_norm(width, float32_norms)
        self.mlp = SwiGLU(width, mlp_hidden, float32_mlp_product)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        weights = None
        if self.kind == "attn":
            out, weights = self.operator(self.operator_norm(x), rope, key_mask, need_weights)
        else:
            out = self.operator(self.operator_norm(x))
        # The residual stream keeps its own dtype (float32 in the stable model, the compute dtype in the legacy one).
        x = x + self.dropout(out).to(x.dtype)
        x = x + self.dropout(self.mlp(self.mlp_norm(x))).to(x.dtype)
        return x, weights


class LFM2Stack(nn.Module):
    """A stack of LFM2 blocks over (B, L, width) tokens, with a final RMSNorm.

    `positions` (L,) gives each token's rotary position; by default 0..L-1. The full model passes each token's
    time-segment index, so that an audio token and the visual token of the same segment share a position.
    `key_mask` (B, L), True where a token may be attended, is only used by the legacy masked attention.
    `repeat_calls` applies every block that many times in a row (legacy: the original called each LFM2 layer two
    or three times per forward).
    `drop_path` (stochastic depth): in training, block i of n is skipped for a sample with probability
    drop_path * (i + 1) / n, and its change to the kept samples is scaled by 1 / (1 - that probability).
    """

    def __init__(self, width: int, layout: str | Sequence[str], n_heads: int = 8, n_kv_heads: int = 2,
                 mlp_hidden: int | None = None, conv_kernel: int = 3, conv_padding: str = "centred",
                 qk_norm: bool = True, dropout: float = 0.0, rope_base: float = 10000.0,
                 gradient_checkpointing: bool = False, conv_sequences: int = 1, repeat_calls: int = 1,
                 causal_attention: bool = False, mask_fill: float | None = None, float32_norms: bool = True,
                 float32_mlp_product: bool = True, drop_path: float = 0.0):
        super().__init__()
        if repeat_calls < 1:
            raise ValueError(f"repeat_calls must be at least 1, got {repeat_calls}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.layout = parse_layout(layout)
        self.drop_path = drop_path
        self.gradient_checkpointing = gradient_checkpointing
        self.repeat_calls = repeat_calls
        hidden = mlp_hidden or 4 * width
        self.blocks = nn.ModuleList(
            LFM2Block(kind, width, n_heads, n_kv_heads, hidden, conv_kernel, conv_padding, qk_norm, dropout,
                      conv_sequences, causal_attention, mask_fill, float32_norms, float32_mlp_product)
            for kind in self.layout
        )
        self.rotary = RotaryEmbedding(width // n_heads, rope_base)
        self.norm = make_norm(width, float32_norms)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        return self.rotary(positions.to(x.device))

    def _run_block(self, block: LFM2Block, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                   key_mask: torch.Tensor | None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Recompute the block in backward instead of storing its activations; the RNG state is restored, so
            # dropout masks are the same in the recomputation.
            return checkpoint(block, x, rope, key_mask, use_reentrant=False)[0]
        return block(x, rope, key_mask)[0]

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        rope = self._rope(x, positions)
        for index, block in enumerate(self.blocks):
            before = x
            for _ in range(self.repeat_calls):
                x = self._run_block(block, x, rope, key_mask)
            if self.training and self.drop_path > 0:
                x = before + self._keep_mask(x, index) * (x - before)
        return self.norm(x)

    def _keep_mask(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """(B, 1, 1): 0 for the samples that skip block `index`, 1 / keep probability for the others."""
        keep = 1.0 - self.drop_path * (index + 1) / len(self.blocks)
        return torch.bernoulli(torch.full((x.shape[0], 1, 1), keep, device=x.device, dtype=x.dtype)) / keep

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, labels: list[str], positions: torch.Tensor | None = None,
                       prefix: str = "blocks", key_mask: torch.Tensor | None = None) -> list[AttentionMap]:
        """Attention weights of every attention block for input tokens `x`, labelled with `labels` (the last
        call of a block when blocks are repeated)."""
        if len(labels) != x.shape[1]:
            raise ValueError(f"{len(labels)} token labels for a sequence of {x.shape[1]} tokens")
        rope = self._rope(x, positions)
        maps = []
        for index, block in enumerate(self.blocks):
            for _ in range(self.repeat_calls):
                x, weights = block(x, rope, key_mask, need_weights=block.kind == "attn")
            if weights is not None:
                maps.append(AttentionMap(f"{prefix}.{index}.attn", weights, list(labels), list(labels)))
        return maps

    @torch.no_grad()
    def activation_stats(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                         key_mask: torch.Tensor | None = None) -> dict[str, float]:
        """Largest |value| of the residual stream after each block (`block{i}.act_max`; with repeated calls also
        after each call, `block{i}.call{c}.act_max`) and of each attention block's logits.

        A diagnostic for debugging scripts (growth of activations or attention logits precedes a float16
        overflow); it runs the same blocks as `forward`, without gradients.
        """
        rope = self._rope(x, positions)
        stats = {}
        for index, block in enumerate(self.blocks):
            if block.kind == "attn":
                logits = block.operator.logits(block.operator_norm(x), rope)
                stats[f"block{index}.attn_logit_max"] = logits.abs().max().item()
            for call in range(self.repeat_calls):
                x = block(x, rope, key_mask)[0]
                if self.repeat_calls > 1:
                    stats[f"block{index}.call{call}.act_max"] = x.float().abs().max().item()
            stats[f"block{index}.act_max"] = x.float().abs().max().item()
        return stats
