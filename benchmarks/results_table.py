"""Markdown rows of the README's results table from the cv_metrics.json files of `benchmarks/real_data_cv.sh`.

    python benchmarks/results_table.py            # rows whose 5 folds are all finished; the rest are listed
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.config import run_script  # noqa: E402

OUTPUT_DIR = "checkpoints"  # where benchmarks/real_data_cv.sh wrote its run folders
ROWS = [  # run name, script folder, model description, modalities
    ("bench_simple_audio", "train_simple_working", "SimpleCNN (15K)", "audio"),
    ("bench_simple_audio_au", "train_simple_working", "SimpleCNN (17K)", "audio + AUs, late concat"),
    ("bench_lite_audio", "train_lite_model", "Lite (cpu preset, <1M)", "audio"),
    ("bench_lite_au", "train_lite_model", "Lite (cpu preset, <1M)", "AUs"),
    ("bench_lite_concat", "train_lite_model", "Lite (cpu preset, <1M), concat fusion", "audio + AUs"),
    ("bench_lite_product", "train_lite_model", "Lite (cpu preset, <1M), product fusion", "audio + AUs"),
    ("bench_lite_gated", "train_lite_model", "Lite (cpu preset, <1M), gated fusion", "audio + AUs"),
    ("bench_lite_cross_attention", "train_lite_model", "Lite (cpu preset, <1M), cross-attention fusion", "audio + AUs"),
    ("bench_lite_transformer", "train_lite_model", "Lite (cpu preset, <1M), transformer fusion", "audio + AUs"),
    ("bench_full_audio_au", "train_full_model", "MultimodalFER, cpu preset (14M, 16 LFM2 blocks)", "audio + AUs"),
]


def main() -> None:
    root = Path(OUTPUT_DIR)
    missing = []
    for run, script, model, modalities in ROWS:
        path = root / script / run / "cv_metrics.json"
        if not path.exists():
            missing.append(run)
            continue
        m = json.loads(path.read_text())
        acc, uar = m["accuracy"], m["uar"]
        folds = ", ".join(f"{a:.1%}" for a in acc["per_fold"])
        print(f"| {model} | {modalities} | {acc['mean']:.1%} +- {acc['std']:.1%} | {uar['mean']:.1%} +- "
              f"{uar['std']:.1%} | {folds} |")
    if missing:
        print(f"not finished: {', '.join(missing)}", file=sys.stderr)


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:])
