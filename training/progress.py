"""Bookkeeping around the visible training loop: progress counters, resume, epoch end, final test.

A script's loop reads:
    progress = resume(run, model, optimizer, scaler, model_name)         # or a fresh Progress
    for stage ...: for epoch ...: for batch ...: train_step(...)
        end_epoch(run, progress, ...)                                     # validate, log, checkpoint, early stop
    test_metrics = final_test(run, model, test_loader, runtime)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from training.checkpoint import load_checkpoint, load_model_weights, make_state, save_checkpoint
from training.config import ConfigError
from training.metrics import summarize_folds
from training.runs import RunFolder
from training.runtime import Runtime, set_rng_state
from training.step import StepResult, evaluate


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

    def update(self, result: StepResult, logits_correct: int = 0, batch_size: int = 0) -> None:
        self.loss += result.loss
        self.steps += 1
        self.skipped += int(result.skipped)
        if not result.skipped:
            self.grad_norm += result.grad_norm
            self.max_grad_norm = max(self.max_grad_norm, result.grad_norm)
        self.correct += logits_correct
        self.seen += batch_size

    def summary(self) -> dict:
        applied = max(1, self.steps - self.skipped)
        return {"train_loss": self.loss / max(1, self.steps), "grad_norm": self.grad_norm / applied,
                "max_grad_norm": self.max_grad_norm, "skipped_steps": self.skipped,
                "train_accuracy": self.correct / max(1, self.seen)}


def resume(run: RunFolder, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
           model_name: str) -> Progress:
    """Restore model, optimizer, scaler, RNG and progress from `run`'s last checkpoint, if there is one."""
    if not run.has_checkpoint():
        return Progress()
    state = load_checkpoint(run.last)
    load_model_weights(model, state, model_name, run.last)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:  # e.g. the parameter groups changed with the code since the checkpoint was written
        raise ConfigError(f"{run.last}: its optimizer state does not fit this model ({err}); "
                          "start a new RUN_NAME") from None
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    progress = Progress(**state["progress"])
    print(f"resumed {run.dir} at stage {progress.stage}, epoch {progress.epoch}, step {progress.step}")
    return progress


def end_epoch(run: RunFolder, progress: Progress, model: nn.Module, model_name: str,
              optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, val_metrics: dict,
              train_stats: dict, lr: float, config: dict, select_metric: str = "accuracy") -> bool:
    """Record an epoch: log line, history, best and last checkpoints. Returns True if validation improved."""
    progress.epoch += 1
    progress.skipped_steps += train_stats["skipped_steps"]
    record = {"stage": progress.stage, "epoch": len(progress.history) + 1, "stage_epoch": progress.epoch,
              "step": progress.step, "lr": lr, **train_stats,
              "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"], "val_uar": val_metrics["uar"]}
    progress.history.append(record)
    run.log(record)
    improved = val_metrics[select_metric] > progress.best_metric
    if improved:
        progress.best_metric = val_metrics[select_metric]
        progress.best_epoch = record["epoch"]
        progress.epochs_since_best = 0
    else:
        progress.epochs_since_best += 1
    state = make_state(model, model_name, optimizer, scaler, progress=asdict(progress), run_config=config)
    if improved:
        save_checkpoint(run.best, state)
    save_checkpoint(run.last, state)
    run.plot_history(progress.history)
    return improved


def crash_exit(run: RunFolder, batch: dict, model: nn.Module, model_name: str, err: Exception, where: str,
               scaler: torch.amp.GradScaler | None = None, progress: Progress | None = None) -> None:
    """Save the failing batch with the model state before the step (train_step raises before applying anything),
    the scaler (its loss scale) and the progress (the step), then stop with a one-line pointer to the replay tool."""
    state = make_state(model, model_name, scaler=scaler, **({"progress": asdict(progress)} if progress else {}))
    dump = run.save_crash_dump(batch, state, str(err))
    raise SystemExit(f"error: {err} ({where}); crash dump {dump}; "
                     f"replay it with: python debug_gradients.py --replay={dump}")


def next_stage(progress: Progress) -> None:
    """Move the counters to the next stage of progressive training; early stopping restarts per stage."""
    progress.stage += 1
    progress.epoch = 0
    progress.epochs_since_best = 0


def final_test(run: RunFolder, model: nn.Module, model_name: str, test_loader, runtime: Runtime,
               class_names: list[str], extra: dict | None = None) -> dict:
    """Evaluate the best checkpoint on the test actors; write metrics.json and the confusion-matrix figure."""
    state = load_checkpoint(run.best if run.best.exists() else run.last)
    load_model_weights(model, state, model_name, run.best)
    metrics = evaluate(model, test_loader, runtime, num_classes=len(class_names))
    progress = state["progress"]
    metrics.update({"best_epoch": progress["best_epoch"], "best_val": progress["best_metric"],
                    "skipped_steps": progress["skipped_steps"], "steps": progress["step"], **(extra or {})})
    run.write_metrics(metrics)
    run.plot_confusion(metrics["confusion"], class_names,
                       f"test accuracy {metrics['accuracy']:.1%}, UAR {metrics['uar']:.1%}")
    return metrics


def fold_list(fold: int | str, n_folds: int) -> list[int]:
    """FOLD="all" runs every fold of the cross-validation, an int runs that one fold."""
    if fold == "all":
        return list(range(n_folds))
    if isinstance(fold, int) and 0 <= fold < n_folds:
        return [fold]
    raise ConfigError(f"FOLD must be 'all' or 0..{n_folds - 1}, got {fold!r}")


def cross_validate(run: RunFolder, folds: list[int], train_fold: Callable[[RunFolder, int], dict],
                   protocol: str, explicit_split: bool = False) -> list[dict]:
    """Train each fold (skipping folds whose metrics.json exists) and report mean +- std when there are several.

    One folder per fold, so folds can also run as separate processes (--fold=0, --fold=1, ... on several GPUs or
    sessions) and a later --fold=all only collects their metrics.json. An explicit split uses the run folder.
    """
    results = []
    for fold in folds:
        fold_run = run if explicit_split else run.sub(f"fold{fold}")
        results.append(fold_run.read_metrics() or train_fold(fold_run, fold))
    if len(folds) > 1:
        report_folds(run, results, protocol)
    return results


def report_folds(run: RunFolder, fold_metrics: list[dict], protocol: str) -> dict:
    """Print the per-fold table and mean +- std; write cv_metrics.json beside the fold folders."""
    summary = {"protocol": protocol, **summarize_folds(fold_metrics),
               "folds": [{k: m[k] for k in ("fold", "test_actors", "accuracy", "uar", "macro_f1")}
                         for m in fold_metrics]}
    print(f"\n{protocol}")
    print(f"{'fold':>4}  {'test actors':<14} {'accuracy':>9} {'UAR':>7} {'macro-F1':>9}")
    for m in summary["folds"]:
        actors = f"{min(m['test_actors'])}-{max(m['test_actors'])}"
        print(f"{m['fold']:>4}  {actors:<14} {m['accuracy']:>9.1%} {m['uar']:>7.1%} {m['macro_f1']:>9.1%}")
    acc, uar = summary["accuracy"], summary["uar"]
    print(f"mean  {'':<14} {acc['mean']:>9.1%} {uar['mean']:>7.1%}   (std {acc['std']:.1%} / {uar['std']:.1%})")
    run.write_metrics(summary, "cv_metrics.json")
    return summary
