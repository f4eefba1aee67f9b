"""Underfit or overfit? Each benchmark row's final weights scored on their own training actors and on the test fold.

    python benchmarks/fit_gap.py                                    # every finished row of the results table
    python benchmarks/fit_gap.py --runs=bench_lite_audio,bench_simple_audio_au

For every fold of a finished cross-validation run folder (`benchmarks/real_data_cv.sh`), the tested weights
(`ckpt_best.pt`: the selected weights, the last epoch by default) are evaluated in eval mode, without augmentation,
on the fold's training actors; the test accuracy comes from the fold's `metrics.json`. The training accuracy that
the training log shows is measured under augmentation, dropout and modality dropout, so it understates the fit.
A high training accuracy with a low test accuracy is overfitting (a gap between actors); a low training accuracy
is underfitting. Prints a markdown table (mean over folds) and writes a bar chart to
checkpoints/benchmarks/fit_gap.png.
Colab:
    !python benchmarks/fit_gap.py --runs=bench_lite_concat
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.results_table import find_run, row_runs  # noqa: E402
from data.setup import build_loaders, make_split, run_data_settings  # noqa: E402
from training.checkpoint import load_checkpoint, rebuild_model  # noqa: E402
from common.config import ConfigError, run_script  # noqa: E402
from training.runtime import setup_runtime  # noqa: E402
from training.step import evaluate  # noqa: E402

OUTPUT_DIR = "checkpoints"  # where the benchmark's run folders are
RUNS = ""  # comma-separated run names; "" = every row of benchmarks/results_table.py with a finished CV
FIGURE = "checkpoints/benchmarks/fit_gap.png"


def run_folders(root: Path, names: list[str]) -> list[Path]:
    """The finished cross-validation run folders (with cv_metrics.json) among the benchmark's rows, or `names`."""
    runs = [(name, find_run(root, name)) for name in names] if names else row_runs(root)
    folders = []
    for name, folder in runs:
        if (folder / "cv_metrics.json").exists():
            folders.append(folder)
        elif names:
            print(f"skipped {name}: no finished cross-validation under {root}")
    return folders


def fold_fit(folder: Path, fold_dir: Path) -> tuple[float, float]:
    """(training-actor accuracy in eval mode, test accuracy) of one fold's tested weights."""
    config = json.loads((folder / "config.json").read_text())["config"]
    metrics = json.loads((fold_dir / "metrics.json").read_text())
    settings = dataclasses.replace(run_data_settings(config), spec_augment=False, frame_augment=False,
                                   num_workers=0)
    split = make_split(Path(config["CACHE_DIR"]), config["ACTORS"], config["N_FOLDS"], metrics["fold"],
                       config["N_VAL_ACTORS"])
    loaders = build_loaders(Path(config["CACHE_DIR"]), split, settings)
    model = rebuild_model(load_checkpoint(fold_dir / "ckpt_best.pt"), fold_dir)
    train = evaluate(model, loaders.train, setup_runtime("cpu", "float32", 0), len(loaders.class_names))
    return train["accuracy"], metrics["accuracy"]


def plot(names: list[str], train: list[float], test: list[float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names)), 4))
    ax.bar(x - 0.2, [100 * a for a in train], 0.4, label="training actors (eval mode)")
    ax.bar(x + 0.2, [100 * a for a in test], 0.4, label="test actors")
    ax.set_xticks(x, [n.removeprefix("bench_") for n in names], rotation=30, ha="right")
    ax.set_ylabel("accuracy (%), mean over folds")
    ax.set_ylim(0, 115)  # room above the bars for the legend
    ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    folders = run_folders(Path(OUTPUT_DIR), [n for n in RUNS.split(",") if n])
    if not folders:
        raise ConfigError(f"no finished cross-validation run folder under {OUTPUT_DIR} (run "
                          "benchmarks/real_data_cv.sh first)")
    print("| run | training actors (eval mode) | test actors | gap |\n|---|---|---|---|")
    names, train_means, test_means = [], [], []
    for folder in folders:
        fits = [fold_fit(folder, fold_dir) for fold_dir in sorted(folder.glob("fold*"))]
        train, test = np.mean([f[0] for f in fits]), np.mean([f[1] for f in fits])
        print(f"| {folder.name} | {100 * train:.1f}% | {100 * test:.1f}% | {100 * (train - test):.1f} |", flush=True)
        names.append(folder.name)
        train_means.append(float(train))
        test_means.append(float(test))
    plot(names, train_means, test_means, Path(FIGURE))
    print(f"figure: {FIGURE}")


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:])
