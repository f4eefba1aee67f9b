"""The training step, evaluation and the learning-rate schedule: the one tested place for AMP and clipping.

Order of a step: zero grads -> forward under autocast -> loss finite? -> scaled backward -> unscale ->
(the optional monitor reads true-scale gradients) -> global-norm clip (the norm is always computed) ->
scaler step -> scaler update -> was the step skipped by the scaler?
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.distributed import all_ranks_true
from training.metrics import classification_metrics
from training.runtime import Runtime


class NonFiniteLossError(RuntimeError):
    """The loss of a batch, or without a GradScaler its gradient norm, was NaN or inf; nothing was applied to the
    weights, so the caller's crash dump holds the state before the step. The caller saves it and stops."""

    def __init__(self, value: float, step: int | None = None, what: str = "loss"):
        where = f" at step {step}" if step is not None else ""
        super().__init__(f"non-finite {what} ({value}){where}")
        self.loss = value


@dataclass
class StepResult:
    loss: float
    grad_norm: float  # global L2 norm of the true-scale gradients before clipping (inf/nan when overflowed)
    skipped: bool  # the GradScaler skipped the optimizer step because a gradient overflowed
    scale: float  # the loss scale used for this step (1.0 without a scaler)
    correct: int = 0  # training samples of the batch whose argmax prediction was right
    count: int = 0  # samples in the batch


def move_batch(batch: dict, device: torch.device) -> dict:
    """Move the tensors of a batch dict to `device`; other values (clip ids) pass through."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def cross_entropy(logits: torch.Tensor, batch: dict, label_smoothing: float = 0.0) -> torch.Tensor:
    # Computed in float32: a float16 log-softmax over confident logits is where many "first batch NaN"s come from.
    return F.cross_entropy(logits.float(), batch["label"], label_smoothing=label_smoothing)


def mixup(batch: dict, alpha: float) -> tuple[dict, dict, float]:
    """Mixup: each sample's inputs blended with those of a random partner from the same batch.

    Returns (the mixed batch, the batch with the partners' labels, the weight of the original labels). Every
    floating-point tensor (log-mel, frames, features) is mixed with one weight drawn from Beta(alpha, alpha); a
    modality counts as present only where both samples have it; labels, actors and clip ids are left as they are.
    """
    weight = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = torch.randperm(len(batch["label"]), device=batch["label"].device)
    mixed = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.is_floating_point():
            mixed[key] = weight * value + (1 - weight) * value[partner]
        elif torch.is_tensor(value) and key.startswith("has_"):
            mixed[key] = value & value[partner]
        else:
            mixed[key] = value
    return mixed, {**batch, "label": batch["label"][partner]}, weight


def train_step(
    model: nn.Module,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    runtime: Runtime,
    *,
    loss_fn: Callable[[torch.Tensor, dict], torch.Tensor] = cross_entropy,
    clip_norm: float | None = 1.0,
    after_unscale: Callable[[], None] | None = None,
    mixup_alpha: float = 0.0,
) -> StepResult:
    """One optimisation step on `batch` (already on the device). Raises `NonFiniteLossError`.

    The caller puts the model in train mode (`stages.train_mode`), so frozen parts can stay in eval mode.
    With `mixup_alpha` > 0 the step trains on a `mixup` of the batch: the loss is the two labels' losses weighted
    by the mixing weight, and a prediction counts as correct when it is the label of the larger weight.
    """
    optimizer.zero_grad(set_to_none=True)
    labels = batch["label"]
    if mixup_alpha > 0:
        batch, partner_batch, weight = mixup(batch, mixup_alpha)
        if weight < 0.5:
            labels = partner_batch["label"]
    with runtime.autocast():
        logits = model(batch)
    loss = loss_fn(logits, batch)
    if mixup_alpha > 0:
        loss = weight * loss + (1 - weight) * loss_fn(logits, partner_batch)
    # Under torchrun every process stops when one has a non-finite loss (none may wait in backward for the others).
    if not all_ranks_true(bool(torch.isfinite(loss))):
        raise NonFiniteLossError(loss.item())
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if after_unscale is not None:
        after_unscale()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    max_norm = clip_norm if clip_norm else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
    if not scaler.is_enabled() and not torch.isfinite(grad_norm):
        # Without a scaler nothing would skip an overflowed gradient: stop before the optimizer applies it.
        raise NonFiniteLossError(float(grad_norm), what="gradient norm")
    scaler.step(optimizer)
    scaler.update()
    skipped = scaler.is_enabled() and scaler.get_scale() < scale
    correct = int((logits.argmax(dim=-1) == labels).sum())
    return StepResult(loss=loss.item(), grad_norm=float(grad_norm), skipped=bool(skipped), scale=float(scale),
                      correct=correct, count=len(labels))


@torch.no_grad()
def predict(model: nn.Module, loader, runtime: Runtime, audio_shifts: int = 0, shift_steps: int = 0
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Labels, class probabilities (N, classes) and mean loss over a loader.

    Test-time augmentation: with `audio_shifts` = k > 0 the probabilities are averaged over the clip and 2k
    circularly time-shifted copies of its log-mel (+-shift_steps, +-2 shift_steps, ... frames), the same shift the
    training augmentation draws from.
    """
    model.eval()
    labels, probs, losses, count = [], [], 0.0, 0
    offsets = [i * shift_steps for i in range(-audio_shifts, audio_shifts + 1)] if shift_steps else [0]
    for batch in loader:
        batch = move_batch(batch, runtime.device)
        p = 0.0
        for offset in offsets:
            shifted = {**batch, "audio": torch.roll(batch["audio"], offset, dims=-1)} if offset else batch
            with runtime.autocast():
                p = p + model(shifted).float().softmax(dim=-1)
        p = p / len(offsets)
        losses += F.nll_loss(p.clamp_min(1e-12).log(), batch["label"], reduction="sum").item()
        count += len(batch["label"])
        labels.append(batch["label"].cpu().numpy())
        probs.append(p.cpu().numpy())
    if count == 0:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), float("nan")
    return np.concatenate(labels), np.concatenate(probs), losses / count


def evaluate(model: nn.Module, loader, runtime: Runtime, num_classes: int = 8, audio_shifts: int = 0,
             shift_steps: int = 0) -> dict:
    """Accuracy, UAR, macro-F1, per-class accuracy, confusion matrix and mean loss of `model` on `loader` (with
    optional time-shift test-time averaging, see `predict`), and the class probabilities of every clip."""
    labels, probs, loss = predict(model, loader, runtime, audio_shifts, shift_steps)
    preds = probs.argmax(axis=-1) if len(labels) else labels
    return {**classification_metrics(labels, preds, num_classes), "loss": loss,
            "probabilities": probs.round(5).tolist()}


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr_ratio: float = 0.05) -> float:
    """Linear warmup to `base_lr`, then cosine decay to `min_lr_ratio * base_lr` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the LR of every param group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
