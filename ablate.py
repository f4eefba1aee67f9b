"""Ablation: fusion strategies x modality subsets over actor-disjoint folds -> a markdown table.

Each row runs `train_lite_model.py` (as its own process, with the same constants plus the row's overrides) over
every fold, then reads its `cv_metrics.json`. Rows already finished are read back, so a rerun after an
interruption only trains what is missing. The table (mean +- std accuracy and UAR over folds) is printed and written
to `OUTPUT_DIR/ablate/RUN_NAME/ablation.md`.

Real audio + facial action units, 5 folds over actors 1-20 (the benchmark on these machines):
    python ablate.py --dataset=ravdess --data_root=../shared/data/ravdess_speech_16k \
        --visual_input=features --feature_file=../shared/data/ravdess_clip_features/au_mfcc.npz \
        --actors=1-20 --n_folds=5 --extra="['--preset=cpu']"
A quick look on the synthetic set:
    python ablate.py --fusions="('concat', 'gated')" --extra="['--width=64', '--frame_backbone=small']"
Colab:
    !python ablate.py --dataset=ravdess --data_root=/content/drive/MyDrive/RAVDESS
"""
from __future__ import annotations

import difflib
import json
import subprocess
import sys
from pathlib import Path

from common.config import ConfigError, run_script, source_choices

_TRAIN_SCRIPT = Path(__file__).with_name("train_lite_model.py")

# ---- data (passed through to train_lite_model.py)
DATASET = "synthetic"  # "synthetic" or "ravdess"
DATA_ROOT = "data/RAVDESS"
VISUAL_INPUT = "frames"  # "frames" or "features"
FEATURE_FILE = ""  # per-clip visual features (.npz keyed by RAVDESS stem) for VISUAL_INPUT="features"
ACTORS = "auto"  # e.g. "1-20"
N_FOLDS = 6

# ---- rows: every fusion strategy with both modalities, plus each modality alone
FUSIONS = ("concat", "product", "gated", "cross_attention", "transformer")
SINGLE_MODALITY_FUSION = "concat"  # single-modality rows: concat of one modality = its attention-pooled tokens
INCLUDE_SINGLE_MODALITIES = True
EXTRA = []  # further train_lite_model.py arguments for every row, e.g. ['--preset=cpu', '--stage2_epochs=5']

# ---- output
OUTPUT_DIR = "checkpoints"
RUN_NAME = "ablation"
PYTHON = sys.executable  # interpreter that runs train_lite_model.py


def rows() -> list[dict]:
    both = [{"name": f"audio+visual, {f}", "modalities": ("audio", "visual"), "fusion": f} for f in FUSIONS]
    single = [{"name": f"{m} only", "modalities": (m,), "fusion": SINGLE_MODALITY_FUSION}
              for m in ("audio", "visual")] if INCLUDE_SINGLE_MODALITIES else []
    return single + both


def check_rows(rows: list[dict]) -> None:
    """Refuse a row whose fusion train_lite_model.py does not know before any row trains (a misspelt fusion would
    otherwise fail only when its row starts, after the rows before it trained). The allowed values are the ones
    the training script declares beside FUSION, read from its source (scripts never import each other)."""
    allowed = [str(value) for value in source_choices(_TRAIN_SCRIPT.read_text(), "FUSION")]
    for row in rows:
        if row["fusion"] not in allowed:
            close = difflib.get_close_matches(str(row["fusion"]), allowed, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"row '{row['name']}': fusion {row['fusion']!r} is not one of "
                              f"{' | '.join(allowed)}{hint}; no row was trained")


def run_row(row: dict) -> dict:
    """Train one row over every fold (resuming if it was interrupted) and return its cv_metrics.json."""
    run_name = f"{RUN_NAME}/{row['name'].replace(' ', '').replace(',', '_').replace('+', '_')}"
    metrics_path = Path(OUTPUT_DIR) / "train_lite_model" / run_name / "cv_metrics.json"
    if not metrics_path.exists():
        args = [f"--dataset={DATASET}", f"--data_root={DATA_ROOT}", f"--visual_input={VISUAL_INPUT}",
                f"--feature_file={FEATURE_FILE}", f"--actors={ACTORS}", f"--n_folds={N_FOLDS}", "--fold=all",
                f"--modalities={row['modalities']!r}", f"--fusion={row['fusion']}", f"--output_dir={OUTPUT_DIR}",
                f"--run_name={run_name}", *EXTRA]
        print(f"\n=== {row['name']}: python train_lite_model.py {' '.join(args)}", flush=True)
        done = subprocess.run([PYTHON, str(_TRAIN_SCRIPT), *args])
        if done.returncode != 0:
            raise ConfigError(f"row '{row['name']}' failed (exit {done.returncode}); see its output above")
    return json.loads(metrics_path.read_text())


def markdown_table(results: list[tuple[dict, dict]], protocol: str) -> str:
    lines = [f"Protocol: {protocol}", "", "| model | accuracy (mean +- std) | UAR (mean +- std) | per-fold accuracy |",
             "|---|---|---|---|"]
    for row, m in results:
        acc, uar = m["accuracy"], m["uar"]
        folds = ", ".join(f"{a:.1%}" for a in acc["per_fold"])
        lines.append(f"| {row['name']} | {acc['mean']:.1%} +- {acc['std']:.1%} | {uar['mean']:.1%} +- "
                     f"{uar['std']:.1%} | {folds} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if not isinstance(EXTRA, (list, tuple)):
        raise ConfigError("EXTRA is a list of arguments, e.g. --extra=\"['--preset=cpu']\"")
    planned = rows()
    check_rows(planned)
    out_dir = Path(OUTPUT_DIR) / "ablate" / RUN_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [(row, run_row(row)) for row in planned]
    protocol = (f"MultimodalFERLite, {N_FOLDS}-fold actor-disjoint CV over actors {ACTORS} ({DATASET}, visual input "
                f"{VISUAL_INPUT}); validation actors from the training actors; extra args {list(EXTRA)}")
    table = markdown_table(results, protocol)
    (out_dir / "ablation.md").write_text(table)
    print("\n" + table)
    print(f"written to {out_dir / 'ablation.md'}")


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:])
