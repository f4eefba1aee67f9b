"""Exponential moving average of a model's weights (and BatchNorm statistics), one of the model-selection options.

    ema = WeightEMA(model, decay=0.99)       # after building the model, before resuming
    ... optimizer step ... ; ema.update(model)
    evaluate(ema.module, loader, runtime)     # the averaged weights, ready to test or save

Built on `torch.optim.swa_utils.AveragedModel` with `use_buffers=True`: BatchNorm running statistics are averaged
with the weights, so the averaged model is evaluated with statistics that belong to it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @property
    def module(self) -> nn.Module:
        """The averaged model (same class and config as the trained one)."""
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)


def averaged_weights(ema_state: dict) -> dict:
    """The averaged model's own state dict inside a `WeightEMA.state_dict()` (AveragedModel prefixes `module.`)."""
    return {k[len("module."):]: v for k, v in ema_state.items() if k.startswith("module.")}
