"""Evaluation and checkpoint selection: which weights a run validates and tests (SELECT_CHECKPOINT), validation
each epoch, and the final test of the selected weights (metrics.json, the confusion figure).

    print(check_selection(SELECT_CHECKPOINT, has_val_actors, epochs))        # refused before training if impossible
    val = validate(selected_model(model, ema, SELECT_CHECKPOINT), loaders.val, runtime)
    test = final_test(run, model, loaders.test, runtime, TestPlan(MODEL_NAME, loaders.class_names, ...))
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from common.config import ConfigError
from common.distributed import from_main
from training.checkpoint import load_checkpoint, load_model_weights, make_state, save_checkpoint
from training.ema import WeightEMA, averaged_weights
from training.runs import RunFolder
from training.runtime import Runtime
from training.step import evaluate

# Which weights a run tests and keeps as ckpt_best.pt: the last epoch's, their exponential moving average, or the
# epoch with the best validation metric (docs/results.md, "Model selection and test-time averaging", for the
# measured comparison).
SELECTIONS = ("last", "ema", "best_val")


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


def validate(model: nn.Module, val_loader, runtime: Runtime) -> dict | None:
    """Validation metrics, or None when the split has no validation actors. Under torchrun rank 0 evaluates the
    whole split (`model` is the unwrapped module) and every rank receives the metrics."""
    return from_main(lambda: evaluate(model, val_loader, runtime) if len(val_loader.dataset) else None)


def selected_model(model: nn.Module, ema: WeightEMA | None, select: str) -> nn.Module:
    """The weights validation should score: the average when it is what will be tested, else the model."""
    return ema.module if select == "ema" and ema is not None else model


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
