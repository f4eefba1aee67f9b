"""Atomic, self-describing checkpoints.

A checkpoint holds plain types and tensors only, so `torch.load(path, weights_only=True)` reads it; it carries
`model_name` and `model_config`, so any script can rebuild the model from the file alone.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.config import ConfigError
from common.files import atomic_write
from training.runtime import rng_state


def atomic_torch_save(obj: object, path: Path) -> None:
    """Write to a temporary name in the same folder, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def make_state(
    model: nn.Module,
    model_name: str,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    **progress: object,
) -> dict:
    """Everything needed to resume: weights, optimizer, scaler, RNG streams, model config and progress counters
    (epoch, step, stage, best metric, history, run config... passed as keyword arguments)."""
    state = {
        "model_name": model_name,
        "model_config": dict(model.config),
        "model": model.state_dict(),
        "rng": rng_state(),
        **progress,
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def feature_stats_entry(stats: tuple[np.ndarray, np.ndarray] | None) -> dict | None:
    """The (mean, std) that standardised the per-clip visual features in training, as a checkpoint entry
    (`make_state(..., feature_stats=feature_stats_entry(loaders.feature_stats))`); None without features."""
    if stats is None:
        return None
    mean, std = stats
    return {"mean": torch.as_tensor(np.asarray(mean), dtype=torch.float32),
            "std": torch.as_tensor(np.asarray(std), dtype=torch.float32)}


def stored_feature_stats(state: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """The feature standardisation a checkpoint was trained with (None when it stores none)."""
    entry = state.get("feature_stats")
    if not entry:
        return None
    return entry["mean"].numpy(), entry["std"].numpy()


def calibration_entry(calibration: tuple | None) -> dict | None:
    """The person calibration of a run (`Loaders.calibration`: its CalibrationSettings and the training
    population's statistics {kind: (mean, std)}) as a checkpoint entry of plain types and tensors."""
    if calibration is None:
        return None
    settings, population = calibration
    return {"settings": settings.to_json(),
            "population": {kind: {"mean": torch.as_tensor(np.asarray(mean), dtype=torch.float32),
                                  "std": torch.as_tensor(np.asarray(std), dtype=torch.float32)}
                           for kind, (mean, std) in population.items()}}


def stored_calibration(state: dict) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]] | None:
    """(calibration settings as a dict, population statistics {kind: (mean, std)}) of a checkpoint; None for a
    checkpoint written before calibration existed."""
    entry = state.get("calibration")
    if not entry:
        return None
    return entry["settings"], {kind: (v["mean"].numpy(), v["std"].numpy()) for kind, v in entry["population"].items()}


def save_checkpoint(path: Path, state: dict) -> None:
    """Write a checkpoint atomically: the counterpart of `load_checkpoint`, which refuses a file without
    model_name and model; a state that lacks them is refused here, when it is written, not when a resume reads it.
    (`atomic_torch_save` writes any object: crash dumps add their batch to such a state.)"""
    missing = [key for key in ("model_name", "model", "model_config") if key not in state]
    if missing:
        raise ValueError(f"not a checkpoint state (no {', '.join(missing)}): build it with make_state")
    atomic_torch_save(state, path)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file meant by `path`: a file is itself; a run folder gives its ckpt_best.pt (ckpt_last.pt
    before the first best); a cross-validation run folder with one fold gives that fold's. A folder with several
    folds, or none, is a one-line `ConfigError` saying what is there."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(f"checkpoint not found: {path}")
    for name in ("ckpt_best.pt", "ckpt_last.pt"):
        if (path / name).is_file():
            return path / name
    folds = sorted((p for p in path.glob("fold*") if p.is_dir() and any(p.glob("ckpt_*.pt"))),
                   key=lambda p: (len(p.name), p.name))
    if len(folds) == 1:
        return resolve_checkpoint(folds[0])
    if folds:
        raise ConfigError(f"{path} holds {len(folds)} cross-validation folds ({', '.join(p.name for p in folds)}): "
                          f"name one, e.g. {folds[0]}")
    raise ConfigError(f"no checkpoint in {path} (neither a ckpt_*.pt nor a fold folder holding one)")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint`; a missing or foreign file is a one-line `ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is another kind of file
        raise ConfigError(f"{path} is not a readable checkpoint (not a file written by torch.save, or truncated)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # PyTorch's own message advises weights_only=False, which would run code from the file: not the remedy.
        raise ConfigError(f"{path} is not a checkpoint of this toolkit: it holds Python objects besides tensors and "
                          "plain values, which are not loaded (unpickling them could run code)") from None
    except Exception as err:  # noqa: BLE001 - a damaged archive
        raise ConfigError(f"{path} is not a readable checkpoint ({str(err).splitlines()[0] or type(err).__name__})"
                          ) from None
    if not isinstance(state, dict) or "model_name" not in state or "model" not in state:
        raise ConfigError(f"{path} is not a checkpoint of this toolkit (no model_name/model entries)")
    return state


def rebuild_model(state: dict, path: Path | str = "checkpoint") -> nn.Module:
    """The checkpoint's model, rebuilt from its stored name and config, with its weights loaded.

    `pretrained` is switched off: the weights come from the checkpoint, so an ImageNet download first would be
    wasted (and fails offline).
    """
    from models import build_model

    config = {**state["model_config"], **({"pretrained": False} if "pretrained" in state["model_config"] else {})}
    model = build_model(state["model_name"], config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ConfigError(f"{path}: the weights do not fit the stored model config "
                          f"({str(err).splitlines()[0]})") from None
    return model


def load_model_weights(model: nn.Module, state: dict, expected_name: str, path: Path | str = "checkpoint") -> None:
    """Load `state["model"]` into `model`, with a clear error when the checkpoint belongs to another model."""
    if state["model_name"] != expected_name:
        raise ConfigError(f"{path} holds a '{state['model_name']}' model, this script trains '{expected_name}'")
    if dict(state["model_config"]) != dict(model.config):
        changed = sorted(k for k in set(state["model_config"]) | set(model.config)
                         if state["model_config"].get(k) != model.config.get(k))
        raise ConfigError(f"{path} was trained with another model config (differs in: {', '.join(changed)}); "
                          "use another RUN_NAME or the same settings")
    model.load_state_dict(state["model"])
