"""Classification metrics for emotion recognition: accuracy, unweighted average recall, macro-F1, confusion."""
from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict:
    """Accuracy, UAR (mean per-class recall over the classes present), macro-F1, per-class accuracy, confusion."""
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    hits = np.diag(matrix)
    present = support > 0
    recall = np.divide(hits, support, out=np.zeros(num_classes), where=present)
    precision = np.divide(hits, predicted, out=np.zeros(num_classes), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(num_classes),
                   where=(precision + recall) > 0)
    total = int(support.sum())
    return {
        "accuracy": float(hits.sum() / total) if total else 0.0,
        "uar": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class_accuracy": [float(r) if p else None for r, p in zip(recall, present)],
        "confusion": matrix.tolist(),
        "n": total,
    }


def summarize_folds(fold_metrics: list[dict], keys: tuple[str, ...] = ("accuracy", "uar", "macro_f1")) -> dict:
    """Mean and standard deviation (population, as reported over CV folds) of each metric over folds."""
    summary = {"n_folds": len(fold_metrics)}
    for key in keys:
        values = np.array([m[key] for m in fold_metrics], dtype=np.float64)
        summary[key] = {"mean": float(values.mean()), "std": float(values.std()), "per_fold": values.tolist()}
    return summary
