"""Weight initialisation strategies, selectable by name from every training script.

- `default`: PyTorch's own initialisation (what the original 149M model used).
- `xavier`: Xavier-uniform with a small gain on every Linear and Conv weight, zero biases.
- `kaiming`: Kaiming-normal (fan-in, ReLU/SiLU family), zero biases.
- `scaled_residual`: `xavier`, then the output projection of every residual branch scaled by 1/sqrt(2 * depth),
  so that the variance of the residual stream does not grow with depth (GPT-2 / LFM2 practice).
- `zero_residual`: `xavier`, then the output projection of every residual branch set to zero, so that every
  block starts as the identity.

A model marks the output projection of each residual branch with `mark_residual_output(layer)`.
"""
from __future__ import annotations

import math

from torch import nn

INIT_STRATEGIES = ("default", "xavier", "kaiming", "scaled_residual", "zero_residual")
_RESIDUAL_OUTPUT_FLAG = "is_residual_output"


def mark_residual_output(layer: nn.Module) -> nn.Module:
    """Flag `layer` (a Linear or Conv) as the last layer of a residual branch."""
    setattr(layer, _RESIDUAL_OUTPUT_FLAG, True)
    return layer


def _init_layer(layer: nn.Module, strategy: str, gain: float) -> None:
    if strategy == "xavier":
        nn.init.xavier_uniform_(layer.weight, gain=gain)
    else:
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def apply_init(model: nn.Module, strategy: str, gain: float = 0.5, depth: int = 1) -> None:
    """Re-initialise `model` in place with `strategy`; `depth` is the number of residual blocks."""
    if strategy not in INIT_STRATEGIES:
        raise ValueError(f"unknown init strategy '{strategy}' (choose from {', '.join(INIT_STRATEGIES)})")
    if strategy == "default":
        return
    base = "kaiming" if strategy == "kaiming" else "xavier"
    for layer in model.modules():
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.groups > 1:
            # Depthwise: Xavier would count every channel as fan-out (about 23x too small at width 768) and
            # silence the short convolutions; PyTorch's fan-in-based default fits grouped convolutions.
            layer.reset_parameters()
        elif isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            _init_layer(layer, base, gain)
        elif isinstance(layer, nn.Embedding):
            nn.init.normal_(layer.weight, std=0.02)
    if strategy in ("scaled_residual", "zero_residual"):
        scale = 0.0 if strategy == "zero_residual" else 1.0 / math.sqrt(2 * max(depth, 1))
        for layer in model.modules():
            if getattr(layer, _RESIDUAL_OUTPUT_FLAG, False):
                layer.weight.data.mul_(scale)
