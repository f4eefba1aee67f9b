"""Bookkeeping around the visible training loop: progress counters, resume, epoch end, final test.

A script's loop reads:
    progress = resume(run, model, optimizer, scaler, model_name, ema)    # or a fresh Progress
    for stage ...: for epoch ...: for batch ...: train_step(...)
        end_epoch(run, progress, ...)                                     # log, checkpoint, early stop
    test_metrics = final_test(run, model, model_name, loaders.test, runtime, loaders.class_names,
                              select=SELECT_CHECKPOINT)                   # the selected weights on the test actors
"""
from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from training.checkpoint import (calibration_entry, feature_stats_entry, load_checkpoint, load_model_weights,
                                 make_state, save_checkpoint)
from training.config import ConfigError, to_jsonable
from training.metrics import summarize_folds
from training.runs import RunFolder
from training.ema import WeightEMA, averaged_weights
from training.distributed import all_gather, from_main, is_main, rank, sum_over_ranks, world_size
from training.runtime import Runtime, rng_state, set_rng_state
from training.step import StepResult, evaluate

# Which weights a run tests and keeps as ckpt_best.pt: the last epoch's, their exponential moving average, or the
# epoch with the best validation metric (README, Results: "Model selection", for the measured comparison).
SELECTIONS = ("last", "ema", "best_val")


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


def check_selection(select: str, has_val_actors: bool, epochs: int) -> str:
    """Refuse a selection that needs validation actors when there are none; describe the plan in one line."""
    if select not in SELECTIONS:
        raise ConfigError(f"SELECT_CHECKPOINT must be one of {', '.join(SELECTIONS)}, got '{select}'")
    if select == "best_val" and not has_val_actors:
        raise ConfigError("SELECT_CHECKPOINT='best_val' needs validation actors (N_VAL_ACTORS > 0 or VAL_ACTORS); "
                          "with none, use 'last' or 'ema' (a fixed budget)")
    if not has_val_actors:
        return f"no validation actors: a fixed budget of {epochs} epochs, then the {select} weights are tested"
    if select == "best_val":
        return "the best-validation epoch is tested (early stopping on validation)"
    return f"a fixed budget of {epochs} epochs, then the {select} weights are tested (validation is only logged)"


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


def validate(model: nn.Module, val_loader, runtime: Runtime) -> dict | None:
    """Validation metrics, or None when the split has no validation actors. Under torchrun rank 0 evaluates the
    whole split (`model` is the unwrapped module) and every rank receives the metrics."""
    return from_main(lambda: evaluate(model, val_loader, runtime) if len(val_loader.dataset) else None)


def epoch_line(where: str, progress: Progress, train_stats: dict, val: dict | None, improved: bool) -> str:
    """One line per epoch: train loss and accuracy, validation when there is some, `*` when ckpt_best.pt changed."""
    line = (f"{where} epoch {progress.epoch}: train loss {train_stats['train_loss']:.3f} "
            f"acc {train_stats['train_accuracy']:.1%}")
    if val is not None:
        line += f" | val loss {val['loss']:.3f} acc {val['accuracy']:.1%} uar {val['uar']:.1%}"
    return line + (" *" if improved else "")


def selected_model(model: nn.Module, ema: WeightEMA | None, select: str) -> nn.Module:
    """The weights validation should score: the average when it is what will be tested, else the model."""
    return ema.module if select == "ema" and ema is not None else model


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


@dataclass
class TestPlan:
    """How a fold's selected weights are tested (`final_test`).

    `audio_shifts`, `shift_steps`: time-shift test-time averaging (`training.step.predict`). `compare_shift_steps`:
    the shift of the 2 x 2 shifted alternatives metrics.json records. `extra`: entries added to metrics.json (fold,
    actors). `select` "last" or "ema" takes the weights from ckpt_last.pt (see `final_test`).
    """

    model_name: str
    class_names: list[str]
    select: str = "best_val"
    audio_shifts: int = 0
    shift_steps: int = 0
    compare_shift_steps: int = 0
    extra: dict | None = None


def final_test(run: RunFolder, model: nn.Module, test_loader, runtime: Runtime, plan: TestPlan) -> dict:
    """Evaluate the selected weights (ckpt_best.pt) on the test actors, with optional time-shift test-time
    averaging; write metrics.json, with every clip's probabilities so that runs of several seeds can be ensembled,
    and the confusion-matrix figure.

    `plan.select` "last" or "ema" takes the weights from ckpt_last.pt, and rewrites ckpt_best.pt when it holds the
    other choice: a finished run re-tested under another SELECT_CHECKPOINT keeps one consistent ckpt_best.pt.

    metrics.json also records `alternatives`: the test accuracy of the last and of the EMA weights, each with and
    without 2 x 2 time shifts of `plan.compare_shift_steps` frames. The choice of weights never changes training, so
    one run measures every selection recipe (docs/results.md, "Model selection and test-time averaging").
    Under torchrun rank 0 tests (each clip once) and every rank returns its metrics.
    """
    return from_main(lambda: _test_saved_weights(run, model, test_loader, runtime, plan))


def _test_saved_weights(run: RunFolder, model: nn.Module, test_loader, runtime: Runtime, plan: TestPlan) -> dict:
    classes = len(plan.class_names)
    last = load_checkpoint(run.last)
    alternatives = {}
    for name in ("last", "ema"):
        if name == "ema" and last.get("ema") is None:
            continue
        model.load_state_dict(_weights_in_last(last, name))
        alternatives[name] = evaluate(model, test_loader, runtime, classes)["accuracy"]
        if plan.compare_shift_steps:
            alternatives[f"{name}_shifts2"] = evaluate(model, test_loader, runtime, classes, 2,
                                                       plan.compare_shift_steps)["accuracy"]
    best = load_checkpoint(run.best) if run.best.exists() else None
    if plan.select != "best_val" and (best is None or best.get("selection") != plan.select):
        best = _select_from_last(run, model, last, plan.select)
    state = best or last
    load_model_weights(model, state, plan.model_name, run.best)
    metrics = evaluate(model, test_loader, runtime, classes, plan.audio_shifts, plan.shift_steps)
    progress = state["progress"]
    metrics.update({"best_epoch": progress["best_epoch"], "best_val": progress["best_metric"],
                    "selection": state.get("selection", "best_val"), "test_time_shifts": plan.audio_shifts,
                    "alternatives": alternatives, "skipped_steps": progress["skipped_steps"],
                    "steps": progress["step"], "clip_ids": [record.clip_id for record in test_loader.dataset.records],
                    **(plan.extra or {})})
    run.write_metrics(metrics)
    run.plot_confusion(metrics["confusion"], plan.class_names,
                       f"test accuracy {metrics['accuracy']:.1%}, UAR {metrics['uar']:.1%}")
    return metrics


def _weights_in_last(last: dict, name: str) -> dict:
    """The model state dict of ckpt_last.pt's last ("last") or averaged ("ema") weights."""
    return averaged_weights(last["ema"]) if name == "ema" else last["model"]


def _select_from_last(run: RunFolder, model: nn.Module, last: dict, select: str) -> dict:
    """Write ckpt_best.pt with `select`'s weights ("last" or "ema") of ckpt_last.pt; return the state written."""
    if select == "ema" and last.get("ema") is None:
        raise ConfigError(f"{run.last} holds no EMA weights to test; use --select_checkpoint=last, or --restart=True")
    model.load_state_dict(_weights_in_last(last, select))
    run_config = {**last.get("run_config", {}), "SELECT_CHECKPOINT": select}
    state = make_state(model, last["model_name"], progress=last["progress"], run_config=run_config,
                       feature_stats=last.get("feature_stats"), calibration=last.get("calibration"),
                       selection=select)
    save_checkpoint(run.best, state)
    return state


def fold_list(fold: int | str, n_folds: int) -> list[int]:
    """FOLD="all" runs every fold of the cross-validation, an int runs that one fold."""
    if fold == "all":
        return list(range(n_folds))
    if isinstance(fold, int) and 0 <= fold < n_folds:
        return [fold]
    raise ConfigError(f"FOLD must be 'all' or 0..{n_folds - 1}, got {fold!r}")


# Constants that may differ between invocations of one run: which fold a process trains, where and on how many
# processes it runs (SYNC_BATCHNORM acts only under torchrun; runs made before it existed resume).
RUN_INDEPENDENT_KEYS = ("FOLD", "NUM_WORKERS", "PREPARE_WORKERS", "DEVICE", "RESTART", "RUN_NAME", "OUTPUT_DIR",
                        "SYNC_BATCHNORM")


def only_retests(key: str, old: object, new: object) -> bool:
    """Whether changing constant `key` from `old` to `new` changes only how a run's saved weights are tested: then
    a finished fold is tested again (`cross_validate`) instead of the run being refused. Not best_val:
    it stops training early and selects on validation actors."""
    return key == "TEST_TIME_SHIFTS" or (key == "SELECT_CHECKPOINT" and {old, new} <= {"last", "ema"})


def open_run(script: str, run_name: str, output_dir: str, config: dict, runtime_description: str,
             restart: bool = False, added_constants: dict | None = None) -> RunFolder:
    """The run folder, with config.json written; refuses to continue a run made with other constants.

    A run resumes (or reports its finished folds) under its RUN_NAME; with changed constants that would mix two
    recipes in one result, so it is a one-line error unless `restart` deletes the old folder first. A run folder
    that never trained (its attempt failed before the first epoch) blocks nothing: its config.json is replaced.
    `added_constants`: constants the script gained after runs were made, each with the value that behaves as the
    script did before it existed; a run whose config lacks one was made with that value.
    """
    run = RunFolder(script, run_name, output_dir)
    if not is_main():  # rank 0 checks, deletes and writes
        return run
    previous = run.read_metrics("config.json")
    if previous is not None and not run.has_trained():
        previous = None  # an attempt that failed before training holds no result a change could mix with
    if previous is not None and restart:
        shutil.rmtree(run.dir)
        run = RunFolder(script, run_name, output_dir)
    elif previous is not None:
        old = {**to_jsonable(added_constants or {}), **previous.get("config", {})}
        new = to_jsonable(config)
        changed = [k for k in sorted(set(old) | set(new)) if k not in RUN_INDEPENDENT_KEYS
                   and old.get(k) != new.get(k) and not only_retests(k, old.get(k), new.get(k))]
        if changed:
            detail = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise ConfigError(f"{run.dir} was made with other constants ({detail}{more}); use another --run_name, "
                              "or --restart=True to delete it and start over")
    run.write_config(config, runtime_description)
    return run


def cross_validate(run: RunFolder, folds: list[int], train_fold: Callable[[RunFolder, int], dict],
                   protocol: str, explicit_split: bool = False, select: str | None = None,
                   test_time_shifts: int = 0) -> list[dict]:
    """Train each fold (skipping folds whose metrics.json exists) and report mean +- std when there are several.

    One folder per fold, so folds can also run as separate processes (--fold=0, --fold=1, ... on several GPUs or
    sessions) and a later --fold=all only collects their metrics.json. An explicit split uses the run folder.
    `select` and `test_time_shifts` (SELECT_CHECKPOINT, TEST_TIME_SHIFTS): how folds are tested now; a finished fold
    tested otherwise goes through `train_fold` again, which resumes after its last epoch and only tests.
    When a fold fails before anything of the run was trained (a bad value found while building the data or the
    model), the run folder is deleted: rerunning with the value fixed starts clean.
    """
    test_plan = {"selection": select, "test_time_shifts": test_time_shifts} if select is not None else {}
    results = []
    for fold in folds:
        fold_run = run if explicit_split else run.sub(f"fold{fold}")
        finished = from_main(fold_run.read_metrics)  # rank 0's file decides, for every rank
        if finished is not None and any(finished.get(k) != v for k, v in test_plan.items()):
            was = ", ".join(f"{k} {finished.get(k)!r}" for k in test_plan)
            now = ", ".join(f"{k} {v!r}" for k, v in test_plan.items())
            if not from_main(fold_run.has_checkpoint):
                raise ConfigError(f"{fold_run.dir} has no ckpt_last.pt to test again with {now}; "
                                  f"set back {was}, or --restart=True")
            print(f"fold {fold} finished earlier, tested with {was}: testing its saved weights with {now}")
            finished = None
        if finished is not None:
            print(f"fold {fold} finished earlier: test accuracy {finished['accuracy']:.1%}, UAR {finished['uar']:.1%} "
                  f"({fold_run.dir / 'metrics.json'}; --restart=True trains it again)")
        try:
            results.append(finished or train_fold(fold_run, fold))
        except BaseException:
            run.discard_untrained(fold_run)  # an attempt that failed before training leaves no folder behind
            raise
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
