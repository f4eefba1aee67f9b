"""Models: SimpleCNN baseline, MultimodalFERLite and the full MultimodalFER with LFM2 fusion.

`build_model(name, config)` rebuilds any of them from the `model_name` and `model_config` that every checkpoint
carries, so a script never needs to know which constructor made a checkpoint.
"""
from __future__ import annotations

import importlib

from torch import nn

# Imported lazily so that `import models` stays cheap and one broken model cannot break the others.
MODEL_CLASSES = {
    "simple": "models.simple_cnn:SimpleCNN",
    "lite": "models.lite:MultimodalFERLite",
    "full": "models.full:MultimodalFER",
    "face_encoder": "models.face_classifier:FaceClassifier",  # pretrain_visual.py's FER2013 classifier
}


class ModelConfigError(ValueError):
    """A model name or configuration that cannot be built (e.g. a checkpoint of another model)."""


def model_class(name: str) -> type[nn.Module]:
    if name not in MODEL_CLASSES:
        raise ModelConfigError(f"unknown model '{name}' (known: {', '.join(MODEL_CLASSES)})")
    module_name, class_name = MODEL_CLASSES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_model(name: str, config: dict) -> nn.Module:
    """Construct model `name` from its plain-dict `config` (the constructor's keyword arguments)."""
    cls = model_class(name)
    try:
        return cls(**config)
    except (TypeError, ValueError) as err:
        raise ModelConfigError(f"cannot build model '{name}' from this config: {err}") from None
