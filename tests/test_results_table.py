"""benchmarks/results_table.py: the mean over seeds and the seed ensemble (probabilities averaged per clip);
benchmarks/fit_gap.py: a finished cross-validation's tested weights scored on their training actors;
benchmarks/real_data_cv.sh: the rows it runs."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from benchmarks import fit_gap, results_table
from tests.conftest import imported_script
from tests.shared_paths import REPO


def write_run(root, name: str, fold_probabilities: list[list[list[float]]], clip_ids: list[str],
              alternatives: list[dict] | None = None, script: str = "train_simple_working") -> None:
    folds = []
    for fold, probabilities in enumerate(fold_probabilities):
        labels = [int(c.split("-")[1]) - 1 for c in clip_ids]
        accuracy = sum(max(range(8), key=p.__getitem__) == y for p, y in zip(probabilities, labels)) / len(labels)
        folds.append(accuracy)
        path = root / script / name / f"fold{fold}"
        path.mkdir(parents=True)
        alternative = alternatives[fold] if alternatives else dict.fromkeys(ALTERNATIVES, accuracy)
        (path / "metrics.json").write_text(json.dumps({"probabilities": probabilities, "clip_ids": clip_ids,
                                                       "accuracy": accuracy, "selection": "best_val",
                                                       "alternatives": alternative}))
        (path / "log.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)))
    summary = {"accuracy": {"mean": sum(folds) / len(folds), "std": 0.0, "per_fold": folds},
               "uar": {"mean": 0.5, "std": 0.0, "per_fold": folds}}
    (root / script / name / "cv_metrics.json").write_text(json.dumps(summary))
    (root / script / name / "config.json").write_text(json.dumps({"config": {"N_VAL_ACTORS": 2}}))


ALTERNATIVES = ("last", "last_shifts2", "ema", "ema_shifts2")


def one_hot(index: int, weight: float) -> list[float]:
    return [weight if i == index else (1 - weight) / 7 for i in range(8)]


def test_seed_mean_and_ensemble(tmp_path, monkeypatch, capsys):
    clips = ["01-01-01-01-01-01", "01-03-01-01-01-02"]  # emotions 1 and 3: labels 0 and 2
    # Seed 0 is right on the first clip only, seed 1 on the second only but unsure on the first: the ensemble
    # averages the probabilities and gets both right.
    write_run(tmp_path, "bench_simple_audio", [[one_hot(0, 0.9), one_hot(5, 0.4)]], clips)
    write_run(tmp_path, "bench_simple_audio_seed1", [[one_hot(4, 0.3), one_hot(2, 0.9)]], clips)
    monkeypatch.setattr(results_table, "OUTPUT_DIR", str(tmp_path))
    results_table.main()
    row = next(line for line in capsys.readouterr().out.splitlines() if "| audio |" in line)
    assert "50.0% +- 0.0% (2 seeds)" in row and row.endswith("| 100.0% |")
    assert "| audio | 3 | 50.0% +- 0.0% |" in row  # the epochs of the seed-0 run's last logged epoch


def test_selection_table_averages_the_alternatives_over_folds(tmp_path, monkeypatch, capsys):
    clips = ["01-01-01-01-01-01", "01-03-01-01-01-02"]
    alternatives = [dict(zip(ALTERNATIVES, (0.5, 0.6, 0.7, 0.8))), dict(zip(ALTERNATIVES, (0.7, 0.8, 0.9, 0.4)))]
    write_run(tmp_path, "exp_val", [[one_hot(0, 0.9), one_hot(5, 0.4)]] * 2, clips, alternatives)
    monkeypatch.setattr(results_table, "OUTPUT_DIR", str(tmp_path))
    monkeypatch.setattr(results_table, "SELECTION_RUNS", "exp_val,exp_gone")
    results_table.main()
    captured = capsys.readouterr()
    assert "| exp_val | 50.0% (best_val, 2) | 60.0% | 70.0% | 80.0% | 60.0% |" in captured.out
    assert "no finished cross-validation: exp_gone" in captured.err


def test_calibrated_rows_stand_beside_the_uncalibrated_one_and_draw_the_curve(tmp_path, monkeypatch, capsys):
    clips = ["01-01-01-01-01-01", "01-03-01-01-01-02"]
    right, wrong = one_hot(0, 0.9), one_hot(5, 0.9)
    write_run(tmp_path, "bench_simple_audio_au", [[right, wrong]], clips)
    write_run(tmp_path, "bench_simple_audio_au_cal", [[right, one_hot(2, 0.9)]], clips)
    write_run(tmp_path, "bench_simple_audio_au_cal_seed1", [[wrong, wrong]], clips)
    for suffix, probabilities in (("", [right, wrong]), ("_cal8", [right, one_hot(2, 0.9)]),
                                  ("_cal8_seed1", [wrong, wrong]), ("_cal16_seed2", [right, one_hot(2, 0.9)])):
        write_run(tmp_path, f"bench_lite_concat{suffix}", [probabilities], clips, script="train_lite_model")
    monkeypatch.setattr(results_table, "OUTPUT_DIR", str(tmp_path))
    monkeypatch.setattr(results_table, "CURVE_FIGURE", str(tmp_path / "curve.png"))
    results_table.main()
    out = capsys.readouterr().out
    assert ("| SimpleCNN, audio + AUs | 50.0% +- 0.0% | 100.0% +- 0.0% (seeds: 50.0% +- 50.0%, 2) | - | - | - |"
            in out)
    # A point without seed 0 is the mean of the seeds that finished, named as such in the table and the curve.
    assert ("| Lite, concat fusion, audio + AUs | 50.0% +- 0.0% | - | - (seeds: 100.0% +- 0.0%, 1) | "
            "100.0% +- 0.0% (seeds: 50.0% +- 50.0%, 2) | - |") in out
    assert ("curve Lite, concat fusion, audio + AUs: 0 clips 50.0% (seeds 0), 8 clips 50.0% (seeds 0,1), "
            "16 clips 100.0% (seeds 2)") in out
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_every_calibrated_benchmark_row_is_in_the_calibration_table_or_curve(tmp_path):
    shown = {run + suffix for run, _, _ in results_table.CALIBRATED for suffix, _ in results_table.CALIBRATIONS}
    shown |= {run + suffix for run, _ in results_table.CURVE_ROWS for suffix, _ in results_table.CURVE_CLIPS}
    script = (REPO / "benchmarks" / "real_data_cv.sh").read_text()
    calibrated = [line.split("|")[0].strip(' "') for line in script.splitlines() if "_cal" in line.split("|")[0]
                  and line.strip().startswith('"')]
    assert len(calibrated) >= 10 and all(f"bench_{row}" in shown for row in calibrated), calibrated


@pytest.fixture
def simple_script():
    yield from imported_script("train_simple_working")


def test_fit_gap_scores_the_training_actors_without_augmentation(simple_script, synthetic_root, synthetic_cache,
                                                                  tmp_path, monkeypatch, capsys):
    vars(simple_script).update({"DATASET": "ravdess", "DATA_ROOT": str(synthetic_root),
                                "CACHE_DIR": str(synthetic_cache), "OUTPUT_DIR": str(tmp_path), "N_FOLDS": 2,
                                "FOLD": "all", "N_VAL_ACTORS": 0, "EPOCHS": 1, "BATCH_SIZE": 16, "NUM_WORKERS": 0,
                                "DEVICE": "cpu", "MODALITIES": ("audio",), "RUN_NAME": "cv"})
    simple_script.main()
    folder = tmp_path / "train_simple_working" / "cv"
    # Augmentation (a random time shift and masks) would change the training-actor score from call to call.
    first, test = fit_gap.fold_fit(folder, folder / "fold0")
    assert (first, test) == fit_gap.fold_fit(folder, folder / "fold0")
    assert test == json.loads((folder / "fold0" / "metrics.json").read_text())["accuracy"]

    monkeypatch.setattr(fit_gap, "OUTPUT_DIR", str(tmp_path))
    monkeypatch.setattr(fit_gap, "RUNS", "cv,missing")
    monkeypatch.setattr(fit_gap, "FIGURE", str(tmp_path / "fit_gap.png"))
    fit_gap.main()
    out = capsys.readouterr().out
    cv_test = json.loads((folder / "cv_metrics.json").read_text())["accuracy"]["mean"]
    assert "skipped missing: no finished cross-validation" in out
    assert "| cv | " in out and f"| {100 * cv_test:.1f}% |" in out
    assert (tmp_path / "fit_gap.png").stat().st_size > 0


def run_benchmark_script(tmp_path, **env: str) -> subprocess.CompletedProcess:
    """benchmarks/real_data_cv.sh with `true` standing in for python (nothing trains)."""
    script = tmp_path / "benchmarks" / "real_data_cv.sh"  # a copy: the script writes logs next to its folder
    script.parent.mkdir(exist_ok=True)
    script.write_text((REPO / "benchmarks" / "real_data_cv.sh").read_text())
    return subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": "true", **env})


def benchmark_runs(tmp_path, **env: str) -> list[str]:
    """The run names benchmarks/real_data_cv.sh would train."""
    done = run_benchmark_script(tmp_path, **env)
    assert done.returncode == 0, done.stderr
    return [line.removeprefix("== ") for line in done.stdout.splitlines() if line.startswith("== ")]


def test_the_benchmark_script_and_the_table_have_the_same_rows(tmp_path):
    everything = " ".join(run.removeprefix("bench_") for run, _, _, _ in results_table.ROWS)
    table = sorted(run for run, _, _, _ in results_table.ROWS)
    assert sorted(benchmark_runs(tmp_path, ROWS_TO_RUN=everything)) == table


def test_previous_constants_rows_run_only_when_named(tmp_path):
    default = benchmark_runs(tmp_path)
    assert "bench_lite_concat" in default and not any(run.endswith("_handset") for run in default)
    assert benchmark_runs(tmp_path, ROWS_TO_RUN="lite_audio_handset lite_audio", SEEDS="0 2") == [
        "bench_lite_audio", "bench_lite_audio_handset", "bench_lite_audio_seed2", "bench_lite_audio_handset_seed2"]


def test_a_misspelt_row_is_an_error_not_an_empty_run(tmp_path):
    done = run_benchmark_script(tmp_path, ROWS_TO_RUN="lite_audio lite_concat_cal_16")
    assert done.returncode == 2 and "== " not in done.stdout
    assert "'lite_concat_cal_16', which is not a row" in done.stderr and " lite_concat_cal16 " in done.stderr
