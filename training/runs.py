"""Run folders and the cross-validation report: `checkpoints/<script>/<run_name>/` with config.json, log.jsonl,
checkpoints, metrics and figures; which runs a changed constant may continue (open_run); one folder per fold and
the mean +- std over folds (cross_validate).

The same command with the same run name finds `ckpt_last.pt` there and resumes (a Colab disconnect loses
at most one epoch).
"""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common.config import ConfigError, to_jsonable
from common.distributed import from_main, is_main, rank, world_size
from common.files import atomic_write_text, remove_stale_temps
from training.checkpoint import atomic_torch_save
from training.metrics import summarize_folds

CHECKPOINT_ROOT = Path("checkpoints")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class RunFolder:
    """One run's folder. `root` defaults to ./checkpoints (a script's OUTPUT_DIR constant can move it).

    Under torchrun only rank 0 writes here (the folder, config, log, metrics, figures); the other ranks' calls do
    nothing, so the scripts call them on every rank. Crash dumps are the exception: the failing rank writes its own.
    """

    def __init__(self, script: str, run_name: str, root: Path | str = CHECKPOINT_ROOT):
        self.script, self.run_name, self.root = script, run_name, Path(root)
        self.dir = self.root / script / run_name
        if is_main():
            self.dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.dir)  # a checkpoint half-written when its run was killed
        self.last = self.dir / "ckpt_last.pt"
        self.best = self.dir / "ckpt_best.pt"

    def figure_path(self, name: str) -> Path:
        """`figures/<name>` in the run folder; the folder is made on the first figure, so a cross-validation run
        folder (figures live in its fold folders) has none."""
        folder = self.dir / "figures"
        folder.mkdir(exist_ok=True)
        return folder / name

    def sub(self, name: str) -> "RunFolder":
        """A nested run folder (one per cross-validation fold)."""
        return RunFolder(self.script, f"{self.run_name}/{name}", root=self.root)

    def write_config(self, config: dict, runtime_description: str = "") -> None:
        """config.json; `machines` lists each machine the run trained on, kept from the config.json it replaces
        when the run has trained (a resume on another CPU can change the floats of a run: the first place to look
        when a rerun does not repeat)."""
        if not is_main():
            return
        earlier = self.read_metrics("config.json") if self.has_trained() else None
        machines, machine = list((earlier or {}).get("machines", [])), this_machine()
        if machine not in machines:
            machines.append(machine)
        info = {
            "config": to_jsonable(config),
            "argv": sys.argv,
            "git_commit": _git_commit(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
            "device": runtime_description,
            "machines": machines,
            "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        atomic_write_text(self.dir / "config.json", json.dumps(info, indent=2))

    def log(self, record: dict) -> None:
        if not is_main():
            return
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(json.dumps(to_jsonable(record)) + "\n")

    def write_metrics(self, metrics: dict, name: str = "metrics.json") -> Path:
        path = self.dir / name
        if not is_main():
            return path
        atomic_write_text(path, json.dumps(to_jsonable(metrics), indent=2))
        return path

    def read_metrics(self, name: str = "metrics.json") -> dict | None:
        """The final metrics of a finished run (None while it is unfinished)."""
        path = self.dir / name
        return json.loads(path.read_text()) if path.exists() else None

    def has_checkpoint(self) -> bool:
        return self.last.is_file()

    # What a run leaves once it has trained (in its folder or a fold's): a run folder holding none of these only has
    # the config.json of an attempt that failed before its first epoch.
    TRAINING_TRACES = ("log.jsonl", "ckpt_last.pt", "metrics.json", "cv_metrics.json", "crash*.pt")

    def has_trained(self) -> bool:
        """Whether this run (or one of its folds) got as far as training: a log, checkpoint, metrics or crash dump."""
        return any(next(self.dir.rglob(pattern), None) is not None for pattern in self.TRAINING_TRACES)

    def discard_untrained(self, fold: "RunFolder | None" = None) -> bool:
        """Delete the folder of a run that never trained (it failed before its first epoch, in `fold`), and the
        folders above it up to `root` that are left empty, so that the failed attempt leaves nothing; True when
        deleted. A folder holding anything besides config.json and `fold`'s folder is kept: another process may be
        starting another fold of the same run (folds run as separate processes)."""
        if not is_main() or not self.dir.is_dir() or self.has_trained():
            return False
        own = {self.dir / "config.json", *([fold.dir] if fold is not None else [])}
        if any(entry not in own for entry in self.dir.iterdir()):
            return False
        shutil.rmtree(self.dir)
        for parent in self.dir.parents:
            if parent == self.root or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()
        return True

    def save_crash_dump(self, batch: dict, state: dict, reason: str) -> Path:
        """Save the failing batch with `state` (the state before the step: model_name, model_config, weights, and
        scaler and progress when given), for `debug_gradients.py --replay=...`. Under torchrun each rank writes
        its own batch (crash_rank<r>.pt): the non-finite loss may have come from any of them."""
        path = self.dir / "crash" / ("crash.pt" if world_size() == 1 else f"crash_rank{rank()}.pt")
        cpu_batch = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in batch.items()}
        atomic_torch_save({**state, "batch": cpu_batch, "reason": reason}, path)
        return path

    def plot_history(self, history: list[dict]) -> Path | None:
        """Loss and accuracy curves per epoch (train and validation) as figures/training_curves.png."""
        if not history or not is_main():
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [h["epoch"] for h in history]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
        validated = [h for h in history if "val_loss" in h]  # none in a run without validation actors
        ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
        ax_acc.plot(epochs, [h["train_accuracy"] for h in history], label="train")
        if validated:
            ax_loss.plot([h["epoch"] for h in validated], [h["val_loss"] for h in validated], label="validation")
            ax_acc.plot([h["epoch"] for h in validated], [h["val_accuracy"] for h in validated], label="validation")
        ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
        ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1))
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = self.figure_path("training_curves.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def plot_confusion(self, confusion: list[list[int]], class_names: list[str], title: str) -> Path | None:
        if not is_main():
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        matrix = np.asarray(confusion, dtype=np.float64)
        rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(6.5, 5.5))
        image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
        ax.set_yticks(range(len(class_names)), class_names)
        for i in range(len(class_names)):
            for j in range(len(class_names)):
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center",
                        color="white" if rows[i, j] > 0.5 else "black", fontsize=8)
        ax.set(xlabel="predicted", ylabel="true", title=title)
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = self.figure_path("confusion_matrix.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def fold_list(fold: int | str, n_folds: int) -> list[int]:
    """FOLD="all" runs every fold of the cross-validation, an int runs that one fold."""
    if fold == "all":
        return list(range(n_folds))
    if isinstance(fold, int) and 0 <= fold < n_folds:
        return [fold]
    raise ConfigError(f"FOLD must be 'all' or 0..{n_folds - 1}, got {fold!r}")


# ---- run compatibility: which constants a resumed run may differ in (open_run)

# Constants that may differ between invocations of one run: which fold a process trains, where and on how many
# processes it runs (SYNC_BATCHNORM acts only under torchrun; runs made before it existed resume).
RUN_INDEPENDENT_KEYS = ("FOLD", "NUM_WORKERS", "PREPARE_WORKERS", "DEVICE", "RESTART", "RUN_NAME", "OUTPUT_DIR",
                        "SYNC_BATCHNORM")

# Constants each training script gained after the benchmark's runs were made, with the value that trains as the
# script did before them: a run whose config.json lacks one was made with that value, and resumes.
ADDED_CONSTANTS = {
    "train_simple_working": {"CALIBRATION": "none", "CALIBRATION_CLIPS": 0, "CALIBRATION_SOURCE": "any"},
    "train_lite_model": {"CALIBRATION": "none", "CALIBRATION_CLIPS": 0, "CALIBRATION_SOURCE": "any",
                         "AUDIO_TOKENS": 8, "MIXUP_ALPHA": 0.0},
    "train_full_model": {"CALIBRATION": "none", "CALIBRATION_CLIPS": 0, "CALIBRATION_SOURCE": "any",
                         "ENCODER_INIT": "scaled_residual", "LAYOUT": "lfm2", "READOUT": "joint", "DROP_PATH": 0.0},
}

# Entries a script's config.json held that are no longer constants (they were never a choice of the run: the
# legacy recipe's fixed tables, now private to train_full_model.py behind LEGACY): a run that holds them resumes.
RETIRED_CONSTANTS = {"train_full_model": ("LEGACY_MODEL", "LEGACY_RECIPE")}


def only_retests(key: str, old: object, new: object) -> bool:
    """Whether changing constant `key` from `old` to `new` changes only how a run's saved weights are tested: then
    a finished fold is tested again (`cross_validate`) instead of the run being refused. Not best_val:
    it stops training early and selects on validation actors."""
    return key == "TEST_TIME_SHIFTS" or (key == "SELECT_CHECKPOINT" and {old, new} <= {"last", "ema"})


def changed_constants(script: str, old: dict, new: dict, added_constants: dict | None = None
                      ) -> list[tuple[str, object, object]]:
    """(constant, old value, new value) for each constant of config `new` that would make a run made with config
    `old` another recipe: not those that may differ between invocations, that only change the test, that `script`
    gained since (`ADDED_CONSTANTS`, or `added_constants`) with the value it had before, or that it retired."""
    added = ADDED_CONSTANTS.get(script, {}) if added_constants is None else added_constants
    old = {**{k: v for k, v in to_jsonable(added).items() if k in new}, **old}
    retired = RETIRED_CONSTANTS.get(script, ())
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if k not in RUN_INDEPENDENT_KEYS
            and not (k in retired and k not in new)
            and old.get(k) != new.get(k) and not only_retests(k, old.get(k), new.get(k))]


def this_machine() -> dict:
    """The CPU (model name, and family and model numbers from /proc/cpuinfo where there is one: virtual machines often
    name every CPU "Intel(R) Xeon(R) Processor"), the vector instruction set torch's CPU kernels dispatch to, and
    torch's thread count: what decides a CPU run's kernels, and so its floats, beyond the code and the seed."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        fields = {}
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            cpu = f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads()}


def open_run(script: str, run_name: str, output_dir: str, config: dict, runtime_description: str,
             restart: bool = False, added_constants: dict | None = None) -> RunFolder:
    """The run folder, with config.json written; refuses to continue a run made with other constants.

    A run resumes (or reports its finished folds) under its RUN_NAME; with changed constants that would mix two
    recipes in one result, so it is a one-line error unless `restart` deletes the old folder first. A run folder
    that never trained (its attempt failed before the first epoch) blocks nothing: its config.json is replaced.
    Which differences are allowed: `changed_constants` (`added_constants` replaces the script's ADDED_CONSTANTS).
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
        changed = changed_constants(script, previous.get("config", {}), to_jsonable(config), added_constants)
        if changed:
            detail = ", ".join(f"{k} {was!r} -> {now!r}" for k, was, now in changed[:4])
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
