"""A person-calibrated model used without the person's clips: what it costs against calibrating as in training.

A model trained with CALIBRATION=person sees each person's inputs standardised by that person's statistics. When
no clip of a new person is at hand, predict.py gives it the inputs as they are (the training population's range).
For every fold of a finished calibrated cross-validation run (benchmarks/real_data_cv.sh, rows `*_cal*`), the
tested weights (`ckpt_best.pt`) are scored on the fold's test actors twice, in eval mode and without test-time
shifts: calibrated as in training, and not calibrated. An uncalibrated run scores the same twice and gives the
figure to beat. This is what decides whether CALIBRATION can be the scripts' default.

    python benchmarks/calibration_without_profile.py --runs=bench_lite_au,bench_lite_au_cal
Colab:
    !python benchmarks/calibration_without_profile.py --runs=bench_lite_concat,bench_lite_concat_cal
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fit_gap import run_folders  # noqa: E402
from data.setup import build_loaders, make_split, run_data_settings  # noqa: E402
from training.checkpoint import load_checkpoint, rebuild_model  # noqa: E402
from common.config import ConfigError, run_script  # noqa: E402
from training.runtime import setup_runtime  # noqa: E402
from training.step import evaluate  # noqa: E402

OUTPUT_DIR = "checkpoints"  # where the benchmark's run folders are
RUNS = "bench_lite_au,bench_lite_au_cal"  # comma-separated run names (finished cross-validation runs)


def fold_accuracies(folder: Path, fold_dir: Path) -> tuple[float, float]:
    """(test accuracy calibrated as in training, test accuracy without calibration) of one fold's tested weights."""
    config = json.loads((folder / "config.json").read_text())["config"]
    fold = json.loads((fold_dir / "metrics.json").read_text())["fold"]
    split = make_split(Path(config["CACHE_DIR"]), config["ACTORS"], config["N_FOLDS"], fold, config["N_VAL_ACTORS"])
    model = rebuild_model(load_checkpoint(fold_dir / "ckpt_best.pt"), fold_dir)
    scores = []
    for calibration in (config["CALIBRATION"], "none"):
        settings = dataclasses.replace(run_data_settings(config), spec_augment=False, frame_augment=False,
                                       num_workers=0, calibration=calibration)
        loaders = build_loaders(Path(config["CACHE_DIR"]), split, settings)
        scores.append(evaluate(model, loaders.test, setup_runtime("cpu", "float32", 0),
                               len(loaders.class_names))["accuracy"])
    return scores[0], scores[1]


def main() -> dict:
    folders = run_folders(Path(OUTPUT_DIR), [name for name in RUNS.split(",") if name])
    if not folders:
        raise ConfigError(f"no finished cross-validation run of {RUNS!r} under {OUTPUT_DIR}")
    print("| run | calibration in training | test, calibrated as in training | test, not calibrated |")
    print("|---|---|---|---|")
    results = {}
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())["config"]
        pairs = np.array([fold_accuracies(folder, fold_dir) for fold_dir in sorted(folder.glob("fold*"))])
        results[folder.name] = pairs
        mean, std = 100 * pairs.mean(0), 100 * pairs.std(0)
        print(f"| {folder.name} | {config['CALIBRATION']} | {mean[0]:.1f}% +- {std[0]:.1f} | "
              f"{mean[1]:.1f}% +- {std[1]:.1f} |", flush=True)
    return results


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:])
