"""Progressive training: which parts of a model train in which stage.

A stage table in a script lists, per stage, the module names to train (the rest is frozen), the epochs, and the
LR. Frozen modules are also put in eval mode so their BatchNorm statistics do not drift while frozen.
"""
from __future__ import annotations

import torch
from torch import nn


def set_trainable(model: nn.Module, train_modules: tuple[str, ...] | str) -> list[str]:
    """Freeze every top-level child of `model` not named in `train_modules` ("all" trains everything).

    Returns the names of the frozen children. Unknown names are an error: a typo must not freeze everything.
    """
    children = dict(model.named_children())
    if train_modules == "all":
        train_modules = tuple(children)
    unknown = [name for name in train_modules if name not in children]
    if unknown:
        raise ValueError(f"stage trains unknown modules {unknown}; the model has {sorted(children)}")
    frozen = []
    for name, child in children.items():
        trainable = name in train_modules
        child.requires_grad_(trainable)
        if not trainable:
            frozen.append(name)
    # Top-level parameters (e.g. learned placeholder tokens) train in every stage.
    for name, param in model.named_parameters(recurse=False):
        param.requires_grad_(True)
    return frozen


def train_mode(model: nn.Module, frozen: list[str]) -> None:
    """Train mode for the model, eval mode for its frozen children (their BatchNorm statistics stay put)."""
    model.train()
    for name in frozen:
        getattr(model, name).eval()


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases, norms, embeddings and learned tokens get no weight decay.

    Learned tokens (missing-modality placeholders, modality embeddings) are the model's top-level parameters.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_token = "." not in name or name.endswith("embedding.weight")
            (decay if param.dim() >= 2 and not is_token else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, eps=eps)
