"""Fusion of audio tokens `(B, La, W)` and visual tokens `(B, Lv, W)` into one vector `(B, out_dim)`.

Strategies (`Fusion(strategy, width, ...)`):
- `concat`: attention-pool each modality, concatenate (late fusion). out_dim = 2W (W with one modality).
- `product`: attention-pool, project, multiply elementwise (multiplicative interaction). out_dim = W.
- `gated`: attention-pool, project; a learned sigmoid gate per dimension mixes the two. out_dim = W.
- `cross_attention`: per layer, audio tokens attend to visual tokens and visual tokens to audio tokens
  (pre-norm residual, QK-norm), then a feed-forward per stream; each stream is attention-pooled and the two
  are concatenated. out_dim = 2W.
- `transformer`: a small pre-norm transformer over the joint token sequence with modality and position
  embeddings, attention-pooled. out_dim = W. Also works with one modality (self-attention over its tokens).

Missing modalities arrive already replaced by learned placeholder tokens. Every attention layer can return its
weights, so `attention_maps(audio, visual)` gives `AttentionMap`s without hooks.
"""
from __future__ import annotations

import torch
from torch import nn

from models.encoders import AttentionPool
from models.init import mark_residual_output
from models.layers import AttentionMap, RMSNorm, attend, modality_token_labels

FUSION_STRATEGIES = ("concat", "product", "gated", "cross_attention", "transformer")
SINGLE_MODALITY_STRATEGIES = ("concat", "transformer")
POOL_QUERY_LABEL = ["pool_query"]


class MultiHeadAttention(nn.Module):
    """Multi-head attention of `x` over `context` (itself for self-attention), with per-head QK-norm."""

    def __init__(self, width: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if width % n_heads:
            raise ValueError(f"width {width} is not divisible by n_heads {n_heads}")
        self.n_heads, self.head_dim = n_heads, width // n_heads
        self.query = nn.Linear(width, width, bias=False)
        self.key_value = nn.Linear(width, 2 * width, bias=False)
        # QK-norm bounds the attention logits whatever the weights do (no fp16 softmax overflow).
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.out = mark_residual_output(nn.Linear(width, width))
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, need_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = self.q_norm(self._heads(self.query(x)))
        k, v = self.key_value(context).chunk(2, dim=-1)
        out, weights = attend(q, self.k_norm(self._heads(k)), self._heads(v), need_weights=need_weights)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.dropout(self.out(out)), weights


class FeedForward(nn.Module):
    def __init__(self, width: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Dropout(dropout),
                                 mark_residual_output(nn.Linear(mlp_ratio * width, width)), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttentionLayer(nn.Module):
    """Audio attends to visual and visual to audio (both from the layer's input), then a feed-forward per stream."""

    def __init__(self, width: int, n_heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm_audio, self.norm_visual = RMSNorm(width), RMSNorm(width)
        self.audio_to_visual = MultiHeadAttention(width, n_heads, dropout)
        self.visual_to_audio = MultiHeadAttention(width, n_heads, dropout)
        self.ff_norm_audio, self.ff_norm_visual = RMSNorm(width), RMSNorm(width)
        self.ff_audio, self.ff_visual = FeedForward(width, mlp_ratio, dropout), FeedForward(width, mlp_ratio, dropout)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor, need_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, torch.Tensor | None]]:
        a, v = self.norm_audio(audio), self.norm_visual(visual)
        a_out, a_weights = self.audio_to_visual(a, v, need_weights)
        v_out, v_weights = self.visual_to_audio(v, a, need_weights)
        audio, visual = audio + a_out, visual + v_out
        audio = audio + self.ff_audio(self.ff_norm_audio(audio))
        visual = visual + self.ff_visual(self.ff_norm_visual(visual))
        return audio, visual, (a_weights, v_weights)


class TransformerLayer(nn.Module):
    """Pre-norm self-attention + feed-forward block."""

    def __init__(self, width: int, n_heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.attn_norm, self.ff_norm = RMSNorm(width), RMSNorm(width)
        self.attn = MultiHeadAttention(width, n_heads, dropout)
        self.ff = FeedForward(width, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        normed = self.attn_norm(x)
        out, weights = self.attn(normed, normed, need_weights)
        x = x + out
        return x + self.ff(self.ff_norm(x)), weights


class Fusion(nn.Module):
    """Fuse audio tokens `(B, La, W)` and visual tokens `(B, Lv, W)` into `(B, out_dim)` with `strategy`.

    `modalities` lists the inputs the model has; with one modality only `concat` (attention pooling) and
    `transformer` (self-attention over that modality's tokens) apply, and the absent one is passed as None.
    """

    def __init__(self, strategy: str, width: int, n_audio_tokens: int = 8, n_visual_tokens: int = 8,
                 n_layers: int = 2, n_heads: int = 4, mlp_ratio: int = 4, dropout: float = 0.1,
                 modalities: tuple[str, ...] = ("audio", "visual")):
        super().__init__()
        modalities = tuple(modalities)
        if strategy not in FUSION_STRATEGIES:
            raise ValueError(f"unknown fusion strategy '{strategy}' (choose from {', '.join(FUSION_STRATEGIES)})")
        if len(modalities) == 1 and strategy not in SINGLE_MODALITY_STRATEGIES:
            raise ValueError(f"fusion '{strategy}' needs two modalities; with only {modalities[0]} use "
                             f"{' or '.join(SINGLE_MODALITY_STRATEGIES)}")
        self.strategy, self.modalities, self.n_layers = strategy, modalities, n_layers
        self.token_counts = {"audio": n_audio_tokens, "visual": n_visual_tokens}
        if strategy in ("concat", "product", "gated"):
            self.pools = nn.ModuleDict({m: AttentionPool(width, n_heads) for m in modalities})
        if strategy in ("product", "gated"):
            self.projections = nn.ModuleDict({m: nn.Linear(width, width) for m in modalities})
        if strategy == "gated":
            self.gate = nn.Linear(2 * width, width)
        if strategy in ("cross_attention", "transformer"):
            # Learned position per token of each modality (segment order); in `transformer` the modality
            # embedding also tells the shared layers which modality a token came from.
            self.positions = nn.ParameterDict(
                {m: nn.Parameter(torch.randn(self.token_counts[m], width) * 0.02) for m in modalities})
        if strategy == "cross_attention":
            self.layers = nn.ModuleList(CrossAttentionLayer(width, n_heads, mlp_ratio, dropout)
                                        for _ in range(n_layers))
            self.pools = nn.ModuleDict({m: AttentionPool(width, n_heads) for m in modalities})
        if strategy == "transformer":
            self.modality_embedding = nn.Parameter(torch.randn(len(modalities), width) * 0.02)
            self.layers = nn.ModuleList(TransformerLayer(width, n_heads, mlp_ratio, dropout) for _ in range(n_layers))
            self.pool = AttentionPool(width, n_heads)
        two_vectors = strategy in ("concat", "cross_attention") and len(modalities) == 2
        self.out_dim = 2 * width if two_vectors else width

    @property
    def depth(self) -> int:
        """Residual blocks in the fusion (for depth-scaled initialisation); 1 for the pooling strategies."""
        return self.n_layers if self.strategy in ("cross_attention", "transformer") else 1

    def forward(self, audio: torch.Tensor | None, visual: torch.Tensor | None) -> torch.Tensor:
        fused, _ = self._run({"audio": audio, "visual": visual}, need_weights=False)
        return fused

    def attention_maps(self, audio: torch.Tensor | None, visual: torch.Tensor | None) -> list[AttentionMap]:
        """Weights of every attention layer (cross/self) and of the pooling queries, labelled by token."""
        _, maps = self._run({"audio": audio, "visual": visual}, need_weights=True)
        return maps

    def _labels(self, modality: str) -> list[str]:
        n = self.token_counts[modality]
        return modality_token_labels(n, 0) if modality == "audio" else modality_token_labels(0, n)

    def _check(self, tokens: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        for m in self.modalities:
            if tokens[m] is None or tokens[m].shape[1] != self.token_counts[m]:
                got = None if tokens[m] is None else tuple(tokens[m].shape)
                raise ValueError(f"fusion expects {m} tokens (B, {self.token_counts[m]}, W), got {got}")
        return {m: tokens[m] for m in self.modalities}

    def _pool(self, pool: AttentionPool, x: torch.Tensor, name: str, labels: list[str], need_weights: bool,
              maps: list[AttentionMap]) -> torch.Tensor:
        if not need_weights:
            return pool(x)
        pooled, weights = pool(x, return_weights=True)
        maps.append(AttentionMap(name, weights, POOL_QUERY_LABEL, labels))
        return pooled

    def _run(self, tokens: dict[str, torch.Tensor | None], need_weights: bool
             ) -> tuple[torch.Tensor, list[AttentionMap]]:
        tokens = self._check(tokens)
        maps: list[AttentionMap] = []
        if self.strategy == "cross_attention":
            return self._cross_attention(tokens, need_weights, maps), maps
        if self.strategy == "transformer":
            return self._transformer(tokens, need_weights, maps), maps
        pooled = {m: self._pool(self.pools[m], x, f"pool.{m}", self._labels(m), need_weights, maps)
                  for m, x in tokens.items()}
        if self.strategy == "concat":
            return torch.cat([pooled[m] for m in self.modalities], dim=-1), maps
        audio, visual = (self.projections[m](pooled[m]) for m in ("audio", "visual"))
        if self.strategy == "product":
            return audio * visual, maps
        gate = torch.sigmoid(self.gate(torch.cat([pooled["audio"], pooled["visual"]], dim=-1)))
        return gate * audio + (1 - gate) * visual, maps

    def _cross_attention(self, tokens: dict[str, torch.Tensor], need_weights: bool,
                         maps: list[AttentionMap]) -> torch.Tensor:
        # The residual streams stay float32 under autocast; the matmuls inside still run in half precision.
        audio = tokens["audio"].float() + self.positions["audio"].float()
        visual = tokens["visual"].float() + self.positions["visual"].float()
        audio_labels, visual_labels = self._labels("audio"), self._labels("visual")
        for i, layer in enumerate(self.layers):
            audio, visual, (a_weights, v_weights) = layer(audio, visual, need_weights)
            if need_weights:
                maps.append(AttentionMap(f"fusion.layers.{i}.audio_to_visual", a_weights, audio_labels, visual_labels))
                maps.append(AttentionMap(f"fusion.layers.{i}.visual_to_audio", v_weights, visual_labels, audio_labels))
        pooled = [self._pool(self.pools[m], x, f"pool.{m}", labels, need_weights, maps)
                  for m, x, labels in (("audio", audio, audio_labels), ("visual", visual, visual_labels))]
        return torch.cat(pooled, dim=-1)

    def _transformer(self, tokens: dict[str, torch.Tensor], need_weights: bool,
                     maps: list[AttentionMap]) -> torch.Tensor:
        parts = [x.float() + self.positions[m].float() + self.modality_embedding[i].float()
                 for i, (m, x) in enumerate(tokens.items())]
        x = torch.cat(parts, dim=1)
        labels = [label for m in tokens for label in self._labels(m)]
        for i, layer in enumerate(self.layers):
            x, weights = layer(x, need_weights)
            if need_weights:
                maps.append(AttentionMap(f"fusion.layers.{i}.self", weights, labels, labels))
        return self._pool(self.pool, x, "pool", labels, need_weights, maps)
