"""Run folders: `checkpoints/<script>/<run_name>/` with config.json, log.jsonl, checkpoints, metrics and figures.

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

import numpy as np
import torch

from training.checkpoint import atomic_torch_save
from training.config import to_jsonable
from training.distributed import is_main, rank, world_size
from training.files import atomic_write_text

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
        if not is_main():
            return
        info = {
            "config": to_jsonable(config),
            "argv": sys.argv,
            "git_commit": _git_commit(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
            "device": runtime_description,
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

