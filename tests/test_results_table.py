"""benchmarks/results_table.py: the mean over seeds and the seed ensemble (probabilities averaged per clip)."""
from __future__ import annotations

import json

from benchmarks import results_table


def write_run(root, name: str, fold_probabilities: list[list[list[float]]], clip_ids: list[str]) -> None:
    folds = []
    for fold, probabilities in enumerate(fold_probabilities):
        labels = [int(c.split("-")[1]) - 1 for c in clip_ids]
        accuracy = sum(max(range(8), key=p.__getitem__) == y for p, y in zip(probabilities, labels)) / len(labels)
        folds.append(accuracy)
        path = root / "train_simple_working" / name / f"fold{fold}"
        path.mkdir(parents=True)
        (path / "metrics.json").write_text(json.dumps({"probabilities": probabilities, "clip_ids": clip_ids,
                                                       "accuracy": accuracy}))
    summary = {"accuracy": {"mean": sum(folds) / len(folds), "std": 0.0, "per_fold": folds},
               "uar": {"mean": 0.5, "std": 0.0, "per_fold": folds}}
    (root / "train_simple_working" / name / "cv_metrics.json").write_text(json.dumps(summary))


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
