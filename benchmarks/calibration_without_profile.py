"""A person-calibrated model used without the person's clips: what it costs against calibrating as in training.

A model trained with CALIBRATION=person sees each person's inputs standardised by that person's statistics. When
no clip of a new person is at hand, predict.py gives it the inputs as they are (the training population's range).
For every fold of a finished calibrated cross-validation run (benchmarks/real_data_cv.sh, rows `*_cal*`), the
tested weights (`ckpt_best.pt`) are scored on the fold's test actors twice, in eval mode and without test-time
shifts: calibrated as in training, and not calibrated. An uncalibrated run scores the same twice and gives the
figure to beat. This is what decides whether CALIBRATION can be the scripts' default.

A third column scores the weights not calibrated on the test clips of the `*_calneutral` rows: the test persons'
neutral clips calibrate those rows and are not scored, so their test set has no neutral clip. An uncalibrated run's
figure there is the one a neutral-calibrated row is compared with.

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
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fit_gap import run_folders  # noqa: E402
from data.calibration import NEUTRAL_LABEL  # noqa: E402
from data.setup import build_loaders, make_split, run_data_settings  # noqa: E402
from training.checkpoint import load_checkpoint, rebuild_model  # noqa: E402
from common.config import ConfigError, run_script  # noqa: E402
from training.runtime import setup_runtime  # noqa: E402
from training.step import evaluate  # noqa: E402

OUTPUT_DIR = "checkpoints"  # where the benchmark's run folders are
RUNS = "bench_lite_au,bench_lite_au_cal"  # comma-separated run names (finished cross-validation runs)


def without_neutral_clips(loader: DataLoader) -> DataLoader:
    """`loader`'s clips less the neutral ones, in order: the test set of the neutral-calibrated rows."""
    kept = [i for i, label in enumerate(loader.dataset.labels) if label != NEUTRAL_LABEL]
    return DataLoader(Subset(loader.dataset, kept), batch_size=loader.batch_size, collate_fn=loader.collate_fn)


def scored_loader(config: dict, split, calibration: str) -> tuple[DataLoader, int]:
    """The run's test loader with person calibration `calibration` (none | person), without augmentation, and the
    number of classes."""
    settings = dataclasses.replace(run_data_settings(config), spec_augment=False, frame_augment=False,
                                   num_workers=0, calibration=calibration)
    loaders = build_loaders(Path(config["CACHE_DIR"]), split, settings)
    return loaders.test, len(loaders.class_names)


def fold_accuracies(folder: Path, fold_dir: Path) -> tuple[float, float, float]:
    """Test accuracies of one fold's tested weights: calibrated as in training, not calibrated, and not calibrated
    without the neutral clips."""
    config = json.loads((folder / "config.json").read_text())["config"]
    fold = json.loads((fold_dir / "metrics.json").read_text())["fold"]
    split = make_split(Path(config["CACHE_DIR"]), config["ACTORS"], config["N_FOLDS"], fold, config["N_VAL_ACTORS"])
    model = rebuild_model(load_checkpoint(fold_dir / "ckpt_best.pt"), fold_dir)
    runtime = setup_runtime("cpu", "float32", 0)
    plain, n_classes = scored_loader(config, split, "none")
    # An uncalibrated run is tested on the plain inputs: the same loader, not a second build of it.
    as_trained = plain if config["CALIBRATION"] == "none" else scored_loader(config, split, config["CALIBRATION"])[0]
    calibrated, uncalibrated, without_neutral = (
        evaluate(model, loader, runtime, n_classes)["accuracy"]
        for loader in (as_trained, plain, without_neutral_clips(plain)))
    return calibrated, uncalibrated, without_neutral


def main() -> dict:
    folders = run_folders(Path(OUTPUT_DIR), [name for name in RUNS.split(",") if name])
    if not folders:
        raise ConfigError(f"no finished cross-validation run of {RUNS!r} under {OUTPUT_DIR}")
    print("| run | calibration in training | test, calibrated as in training | test, not calibrated "
          "| not calibrated, neutral clips not scored |")
    print("|---|---|---|---|---|")
    results = {}
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())["config"]
        accuracies = np.array([fold_accuracies(folder, fold_dir) for fold_dir in sorted(folder.glob("fold*"))])
        results[folder.name] = accuracies
        mean, std = 100 * accuracies.mean(0), 100 * accuracies.std(0)
        print(f"| {folder.name} | {config['CALIBRATION']} | {mean[0]:.1f}% +- {std[0]:.1f} | "
              f"{mean[1]:.1f}% +- {std[1]:.1f} | {mean[2]:.1f}% +- {std[2]:.1f} |", flush=True)
    return results


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:])
