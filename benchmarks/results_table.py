"""Markdown rows of the results tables (README, docs/results.md) from the run folders of
`benchmarks/real_data_cv.sh`.

    python benchmarks/results_table.py            # rows whose 5 folds are all finished; the rest are listed
    python benchmarks/results_table.py --selection_runs=exp_simple_audio_au_bestval2   # + runs in the 2nd table

Seed 0 gives the per-fold figures and the epochs (the budget its fold 0 trained: rows measured before a default
budget changed show it). Where more seeds finished (bench_<row>_seed<s>), two more columns: the mean
+- std over seeds of the CV mean accuracy, and the accuracy of the seed ensemble (per fold, the class
probabilities of the seeds' models averaged per clip, then the argmax; mean over folds).

A calibration table puts each row's uncalibrated figure beside its person-calibrated rows (`<row>_cal`: all of
each test person's clips, `_cal16` / `_cal8` / `_cal4`: that many, `_calneutral`: the 4 neutral clips), as mean +-
std over folds of seed 0 and, where more seeds finished, the mean over seeds. With CURVE_FIGURE the accuracy of
Lite concat and Lite AUs against the number of calibration clips is drawn there (PNG; each point the mean over the
seeds that finished, which it names).

A second table compares model selection and test-time averaging on the same trainings: per run (the rows' seed 0
and SELECTION_RUNS), the mean over folds of the tested (selected) weights and of the `alternatives` each fold's
metrics.json records: the last weights and the EMA weights, each without and with time-shift averaging.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.config import run_script  # noqa: E402

OUTPUT_DIR = "checkpoints"  # where benchmarks/real_data_cv.sh wrote its run folders
MAX_SEEDS = 10  # seeds looked for per row (bench_<row>_seed1 ... _seed9)
CURVE_FIGURE = ""  # e.g. docs/figures/calibration_clips.png: Lite concat's and Lite AUs' accuracy against the
# number of calibration clips per person (0 = uncalibrated, 4, 8, 16, 30, all); "" = no figure
SELECTION_RUNS = ""  # comma-separated extra run names for the selection table (e.g. runs with validation actors)
LITE_ROWS = [  # run name, model description, modalities: the Lite rows, each also with the previous constants
    ("bench_lite_audio", "Lite (cpu preset, <1M)", "audio"),
    ("bench_lite_au", "Lite (cpu preset, <1M)", "AUs"),
    ("bench_lite_concat", "Lite (cpu preset, <1M), concat fusion", "audio + AUs"),
    ("bench_lite_product", "Lite (cpu preset, <1M), product fusion", "audio + AUs"),
    ("bench_lite_gated", "Lite (cpu preset, <1M), gated fusion", "audio + AUs"),
    ("bench_lite_cross_attention", "Lite (cpu preset, <1M), cross-attention fusion", "audio + AUs"),
    ("bench_lite_transformer", "Lite (cpu preset, <1M), transformer fusion", "audio + AUs"),
]
ROWS = [  # run name, script folder, model description, modalities
    ("bench_simple_audio", "train_simple_working", "SimpleCNN (53K)", "audio"),
    ("bench_simple_audio_au", "train_simple_working", "SimpleCNN (56K)", "audio + AUs, late concat"),
    # *_handset: the cpu preset's hand-set constants before tune.py's became its defaults (HANDSET in the script)
    *[row for run, model, modalities in LITE_ROWS
      for row in ((run, "train_lite_model", model, modalities),
                  (f"{run}_handset", "train_lite_model", f"{model}, previous constants", modalities))],
    ("bench_full_audio_au", "train_full_model", "MultimodalFER, cpu preset (14M, 16 LFM2 blocks)", "audio + AUs"),
]


CALIBRATED = [  # run name, script folder, model: rows that have person-calibrated versions (<run>_cal, ...)
    ("bench_simple_audio_au", "train_simple_working", "SimpleCNN, audio + AUs"),
    ("bench_lite_audio", "train_lite_model", "Lite, audio"),
    ("bench_lite_au", "train_lite_model", "Lite, AUs"),
    ("bench_lite_concat", "train_lite_model", "Lite, concat fusion, audio + AUs"),
    ("bench_lite_cross_attention", "train_lite_model", "Lite, cross-attention fusion, audio + AUs"),
    ("bench_lite_transformer", "train_lite_model", "Lite, transformer fusion, audio + AUs"),
    ("bench_full_audio_au", "train_full_model", "MultimodalFER (cpu preset), audio + AUs"),
]
CALIBRATIONS = (("", "uncalibrated"), ("_cal", "all clips"), ("_cal16", "16 clips"), ("_cal8", "8 clips"),
                ("_cal4", "4 clips"), ("_calneutral", "4 neutral clips"))
CURVE_CLIPS = (("", 0), ("_cal4", 4), ("_cal8", 8), ("_cal16", 16), ("_cal30", 30), ("_cal", 60))
CURVE_ROWS = (("bench_lite_concat", "Lite, concat fusion, audio + AUs"), ("bench_lite_au", "Lite, AUs"))


def row_runs(root: Path) -> list[tuple[str, Path]]:
    """(run name, run folder) of each row's seed 0."""
    return [(run, root / script / run) for run, script, _, _ in ROWS]


def find_run(root: Path, name: str) -> Path:
    """The run folder `name` under any script's folder of `root` (root/name when there is none)."""
    return next(root.glob(f"*/{name}"), root / name)


def seed_runs(root: Path, script: str, run: str) -> list[Path]:
    """The finished seeds of a row: its run folders that have a cv_metrics.json, seed 0 first."""
    names = [run] + [f"{run}_seed{seed}" for seed in range(1, MAX_SEEDS)]
    return [root / script / name for name in names if (root / script / name / "cv_metrics.json").exists()]


def seed_of(run: Path) -> int:
    """The seed of a benchmark run folder: bench_<row>_seed<s>, or 0 for bench_<row>."""
    return int(run.name.rpartition("_seed")[2]) if "_seed" in run.name else 0


def epochs_trained(run: Path) -> int:
    """Epochs that fold 0 of `run` trained (all stages): the budget the row was measured with."""
    return json.loads((run / "fold0" / "log.jsonl").read_text().splitlines()[-1])["epoch"]


def ensemble_accuracy(runs: list[Path]) -> float:
    """Mean over folds of the accuracy of the seeds' averaged class probabilities."""
    accuracies = []
    for fold in sorted(p.name for p in runs[0].glob("fold*")):
        metrics = [json.loads((run / fold / "metrics.json").read_text()) for run in runs]
        if any(m["clip_ids"] != metrics[0]["clip_ids"] for m in metrics):
            raise SystemExit(f"error: the seeds of {runs[0]} / {fold} tested different clips")
        probabilities = np.mean([m["probabilities"] for m in metrics], axis=0)
        labels = np.array([int(c.split("-")[1]) - 1 for c in metrics[0]["clip_ids"]])  # emotion field of the take
        accuracies.append(float((probabilities.argmax(1) == labels).mean()))
    return float(np.mean(accuracies))


def main() -> None:
    root = Path(OUTPUT_DIR)
    missing = []
    print("| model (config) | modalities | epochs | accuracy, seed 0 | UAR, seed 0 | per-fold accuracy, seed 0 | "
          "accuracy, mean over seeds | seed ensemble |\n|---|---|---|---|---|---|---|---|")
    for run, script, model, modalities in ROWS:
        runs = seed_runs(root, script, run)
        if not runs or runs[0].name != run:
            missing.append(run)
            continue
        m = json.loads((runs[0] / "cv_metrics.json").read_text())
        acc, uar = m["accuracy"], m["uar"]
        folds = ", ".join(f"{a:.1%}" for a in acc["per_fold"])
        seeds = " - | - |"
        if len(runs) > 1:
            means = [json.loads((r / "cv_metrics.json").read_text())["accuracy"]["mean"] for r in runs]
            seeds = (f" {np.mean(means):.1%} +- {np.std(means):.1%} ({len(runs)} seeds) | "
                     f"{ensemble_accuracy(runs):.1%} |")
        print(f"| {model} | {modalities} | {epochs_trained(runs[0])} | {acc['mean']:.1%} +- {acc['std']:.1%} | "
              f"{uar['mean']:.1%} +- {uar['std']:.1%} | {folds} |{seeds}")
    if missing:
        print(f"not finished: {', '.join(missing)}", file=sys.stderr)
    extra = [(name, find_run(root, name)) for name in SELECTION_RUNS.split(",") if name]
    unfinished = [name for name, folder in extra if not (folder / "cv_metrics.json").exists()]
    if unfinished:
        print(f"no finished cross-validation: {', '.join(unfinished)}", file=sys.stderr)
    print_calibration_table(root)
    if CURVE_FIGURE:
        plot_calibration_curve(root, Path(CURVE_FIGURE))
    print_selection_table(row_runs(root) + extra)


def accuracy_cell(runs: list[Path]) -> str:
    """Seed 0's mean +- std over folds ('-' where seed 0 did not finish); with other seeds also the mean +- std over
    the seeds ('-' without a finished run)."""
    if not runs:
        return "-"
    means = [json.loads((r / "cv_metrics.json").read_text())["accuracy"] for r in runs]
    cell = f"{means[0]['mean']:.1%} +- {means[0]['std']:.1%}" if seed_of(runs[0]) == 0 else "-"
    if len(runs) > 1 or seed_of(runs[0]) != 0:
        over = [m["mean"] for m in means]
        cell += f" (seeds: {np.mean(over):.1%} +- {np.std(over):.1%}, {len(runs)})"
    return cell


def print_calibration_table(root: Path) -> None:
    """Each calibrated row beside its uncalibrated one: 5-fold CV accuracy, test persons calibrated on their own
    unlabeled clips (all, 16, 8, 4) or their neutral clips."""
    header = "| model, inputs | " + " | ".join(name for _, name in CALIBRATIONS) + " |"
    print("\n" + header + "\n" + "|---" * (len(CALIBRATIONS) + 1) + "|")
    for run, script, model in CALIBRATED:
        cells = [accuracy_cell(seed_runs(root, script, run + suffix)) for suffix, _ in CALIBRATIONS]
        if any(cell != "-" for cell in cells[1:]):
            print(f"| {model} | " + " | ".join(cells) + " |")


def curve_points(root: Path, run: str) -> list[tuple[int, float, float, list[int]]]:
    """(clips, mean, std, seeds) per finished point of a curve row: mean and std over the folds of every seed that
    finished (equal folds per seed, so the mean is the mean over seeds)."""
    points = []
    for suffix, clips in CURVE_CLIPS:
        runs = seed_runs(root, "train_lite_model", f"{run}{suffix}")
        if runs:
            folds = [a for r in runs for a in json.loads((r / "cv_metrics.json").read_text())["accuracy"]["per_fold"]]
            points.append((clips, float(np.mean(folds)), float(np.std(folds)), [seed_of(r) for r in runs]))
    return points


def plot_calibration_curve(root: Path, path: Path) -> None:
    """CV accuracy of the CURVE_ROWS against calibration clips per person, the points whose runs finished: mean over
    the seeds that finished, error bars the std over their folds; the seeds are printed and written beside a point
    that has other seeds than 0 alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn = 0
    for run, label in CURVE_ROWS:
        points = curve_points(root, run)
        if not points:
            continue
        x, mean, std, seeds = zip(*points)
        ax.errorbar(x, 100 * np.array(mean), yerr=100 * np.array(std), marker="o", capsize=4, label=label)
        for clips, accuracy, point_seeds in zip(x, mean, seeds):
            if point_seeds != [0]:
                ax.annotate("seeds " + ",".join(map(str, point_seeds)), (clips, 100 * accuracy), fontsize=7,
                            textcoords="offset points", xytext=(5, -11))
        print(f"curve {label}: " + ", ".join(f"{c} clips {a:.1%} (seeds {','.join(map(str, s))})"
                                             for c, a, _, s in points))
        drawn += 1
    if not drawn:
        plt.close(fig)
        print(f"no curve row finished: {path} not drawn", file=sys.stderr)
        return
    ticks = [clips for _, clips in CURVE_CLIPS]
    ax.set_xticks(ticks, ["none" if c == 0 else "all (60)" if c == 60 else str(c) for c in ticks])
    ax.set_xlabel("calibration clips per person (unlabeled)")
    ax.set_ylabel("accuracy, % (5-fold actor CV, mean over seeds)")
    ax.set_title("Person calibration, actors 1-20")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def print_selection_table(runs: list[tuple[str, Path]]) -> None:
    """Mean over folds of the selected weights and of each fold's `alternatives`, for the finished runs."""
    columns = ("last", "last_shifts2", "ema", "ema_shifts2")
    print("\n| run | tested (selection, validation actors) | last | last + shifts | EMA | EMA + shifts |\n"
          "|---|---|---|---|---|---|")
    for name, folder in runs:
        if not (folder / "cv_metrics.json").exists():
            continue
        folds = [json.loads(p.read_text()) for p in sorted(folder.glob("fold*/metrics.json"))]
        config = json.loads((folder / "config.json").read_text())["config"]
        cells = [f"{np.mean([m['alternatives'][c] for m in folds]):.1%}" for c in columns]
        tested = np.mean([m["accuracy"] for m in folds])
        print(f"| {name} | {tested:.1%} ({folds[0]['selection']}, {config['N_VAL_ACTORS']}) | {' | '.join(cells)} |")


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:])
