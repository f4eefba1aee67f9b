"""Epoch bookkeeping and resume: where a run is (Progress), the epoch's running means, the epoch end (log line,
checkpoints, early-stopping counters), the crash dump, and resuming all of it from ckpt_last.pt.

A script's loop reads:
    progress = resume(run, model, optimizer, scaler, MODEL_NAME, ema)         # or a fresh Progress
    keep = FoldCheckpoints(MODEL_NAME, optimizer, scaler, config, ema, ...)  # once per fold
    for stage ...: for epoch ...: for batch ...: <the step, written out>
        improved = end_epoch(run, progress, model, keep, val, train_stats, lr)   # log, checkpoints, figure
    next_stage(progress, PATIENCE, name)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from common.config import ConfigError
from common.distributed import all_gather, from_main, is_main, rank, sum_over_ranks, world_size
from training.checkpoint import (calibration_entry, feature_stats_entry, load_checkpoint, load_model_weights,
                                 make_state, save_checkpoint)
from training.ema import WeightEMA
from training.evaluation import selected_model
from training.runs import RunFolder
from training.runtime import rng_state, set_rng_state
from training.step import StepResult


@dataclass
class Progress:
    """Where a run is. Saved in every checkpoint, so a resumed run continues exactly here."""

    stage: int = 0
    epoch: int = 0  # epochs completed in the current stage
    step: int = 0  # optimizer steps over the whole run
    best_metric: float = -1.0
    best_epoch: int = -1
    epochs_since_best: int = 0
    skipped_steps: int = 0  # steps the GradScaler skipped (float16 overflow)
    history: list = field(default_factory=list)


class EpochStats:
    """Running mean of loss, gradient norm and accuracy over an epoch's training steps."""

    def __init__(self) -> None:
        self.loss = self.grad_norm = 0.0
        self.steps = self.correct = self.seen = self.skipped = 0
        self.max_grad_norm = 0.0

    def update(self, result: StepResult) -> None:
        self.loss += result.loss
        self.steps += 1
        self.skipped += int(result.skipped)
        if not result.skipped:
            self.grad_norm += result.grad_norm
            self.max_grad_norm = max(self.max_grad_norm, result.grad_norm)
        self.correct += result.correct
        self.seen += result.count

    def summary(self) -> dict:
        """The epoch's means; under torchrun loss and accuracy are over every process's batches (a collective:
        call it on every rank). Gradient norms and skipped steps are the same on every rank after DDP's sync."""
        loss, steps, correct, seen = sum_over_ranks([self.loss, self.steps, self.correct, self.seen])
        applied = max(1, self.steps - self.skipped)
        return {"train_loss": loss / max(1, steps), "grad_norm": self.grad_norm / applied,
                "max_grad_norm": self.max_grad_norm, "skipped_steps": self.skipped,
                "train_accuracy": correct / max(1, seen)}


def resume(run: RunFolder, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
           model_name: str, ema: WeightEMA | None = None) -> Progress:
    """Restore model, optimizer, scaler, RNG, weight average and progress from `run`'s last checkpoint, if any.

    Under torchrun rank 0 reads the checkpoint and every rank loads it (no shared file system needed), each with its
    own random streams; so the same torchrun command resumes after any process was killed."""
    state = from_main(lambda: load_checkpoint(run.last) if run.has_checkpoint() else None)
    if state is None:
        return Progress()
    load_model_weights(model, state, model_name, run.last)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:  # e.g. the parameter groups changed with the code since the checkpoint was written
        raise ConfigError(f"{run.last}: its optimizer state does not fit this model ({err}); "
                          "start a new RUN_NAME") from None
    scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    _restore_rng_streams(state)
    progress = Progress(**state["progress"])
    print(f"resumed {run.dir} at stage {progress.stage}, epoch {progress.epoch}, step {progress.step}")
    return progress


def _restore_rng_streams(state: dict) -> None:
    saved = state.get("rank_rngs", [state["rng"]])  # one per process when several wrote it (end_epoch)
    if len(saved) == world_size():
        set_rng_state(saved[rank()])
    else:
        print(f"the checkpoint holds the random streams of {len(saved)} process(es), this run has {world_size()}: "
              "it continues with fresh streams (and another batch order), so not as the uninterrupted run would")


@dataclass
class FoldCheckpoints:
    """What a fold's checkpoints hold besides the model and the progress, and which weights ckpt_best.pt keeps;
    made once per fold, passed to every `end_epoch`.

    `feature_stats` and `calibration` (`Loaders.feature_stats`, `Loaders.calibration`): the input normalisation of
    training, kept in both checkpoints so that predict.py applies the same. `select`: the EMA weights ("ema"), the
    last epoch's ("last"), or the best validation epoch's by `select_metric` ("best_val").
    """

    model_name: str
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    config: dict
    ema: WeightEMA | None = None
    select: str = "best_val"
    select_metric: str = "accuracy"
    feature_stats: tuple | None = None
    calibration: tuple | None = None


def end_epoch(run: RunFolder, progress: Progress, model: nn.Module, keep: FoldCheckpoints, val_metrics: dict | None,
              train_stats: dict, lr: float) -> bool:
    """Record an epoch: log line, history, last checkpoint, and ckpt_best.pt = the weights `keep.select` picks.
    Returns True if ckpt_best.pt was updated.

    `val_metrics` is None without validation actors (a fixed budget); then no early stopping can happen.
    """
    # Every process's random streams, for an exact resume of each. First: rank 0 waits here, before it logs the
    # epoch, for a process that died in this epoch (the log would otherwise get a line the checkpoint lacks).
    rank_rngs = all_gather(rng_state())
    progress.epoch += 1
    progress.skipped_steps += train_stats["skipped_steps"]
    record = {"stage": progress.stage, "epoch": len(progress.history) + 1, "stage_epoch": progress.epoch,
              "step": progress.step, "lr": lr, **train_stats}
    if val_metrics is not None:
        record.update(val_loss=val_metrics["loss"], val_accuracy=val_metrics["accuracy"], val_uar=val_metrics["uar"])
    progress.history.append(record)
    run.log(record)
    improved = keep.select != "best_val" or val_metrics[keep.select_metric] > progress.best_metric
    if improved:
        progress.best_metric = val_metrics[keep.select_metric] if val_metrics is not None else -1.0
        progress.best_epoch = record["epoch"]
        progress.epochs_since_best = 0
    else:
        progress.epochs_since_best += 1
    if is_main():
        stats = feature_stats_entry(keep.feature_stats)
        extra = {"ema": keep.ema.state_dict()} if keep.ema is not None else {}
        extra["calibration"] = calibration_entry(keep.calibration)
        if len(rank_rngs) > 1:
            extra["rank_rngs"] = rank_rngs
        state = make_state(model, keep.model_name, keep.optimizer, keep.scaler, progress=asdict(progress),
                           run_config=keep.config, feature_stats=stats, **extra)
        save_checkpoint(run.last, state)
        if improved:
            selected = selected_model(model, keep.ema, keep.select)
            save_checkpoint(run.best, make_state(selected, keep.model_name, progress=asdict(progress),
                                                 run_config=keep.config, feature_stats=stats, selection=keep.select,
                                                 calibration=extra["calibration"]))
    run.plot_history(progress.history)
    return improved


def epoch_line(where: str, progress: Progress, train_stats: dict, val: dict | None, improved: bool) -> str:
    """One line per epoch: train loss and accuracy, validation when there is some, `*` when ckpt_best.pt changed."""
    line = (f"{where} epoch {progress.epoch}: train loss {train_stats['train_loss']:.3f} "
            f"acc {train_stats['train_accuracy']:.1%}")
    if val is not None:
        line += f" | val loss {val['loss']:.3f} acc {val['accuracy']:.1%} uar {val['uar']:.1%}"
    return line + (" *" if improved else "")


def crash_exit(run: RunFolder, batch: dict, model: nn.Module, model_name: str, err: Exception, where: str,
               scaler: torch.amp.GradScaler | None = None, progress: Progress | None = None) -> None:
    """Save the failing batch with the model state before the step (train_step raises before applying anything),
    the scaler (its loss scale) and the progress (the step), then stop with a one-line pointer to the replay tool.
    Under torchrun every process stops; those whose own loss (or the shared gradient norm) was non-finite save."""
    if math.isfinite(getattr(err, "loss", math.nan)):
        raise SystemExit(f"error: {err} ({where}); another process's batch failed and its crash dump is in "
                         f"{run.dir / 'crash'}")
    state = make_state(model, model_name, scaler=scaler, **({"progress": asdict(progress)} if progress else {}))
    dump = run.save_crash_dump(batch, state, str(err))
    raise SystemExit(f"error: {err} ({where}); crash dump {dump}; "
                     f"replay it with: python debug_gradients.py --replay={dump}")


def next_stage(progress: Progress, patience: int, stage_name: str) -> None:
    """Move the counters to the next stage of progressive training (early stopping restarts per stage); say so
    when the stage ended early."""
    if progress.epochs_since_best >= patience:
        print(f"{stage_name}: stopped early after {progress.epoch} epochs, no validation improvement in the last "
              f"{patience} (best epoch {progress.best_epoch})")
    progress.stage += 1
    progress.epoch = 0
    progress.epochs_since_best = 0


