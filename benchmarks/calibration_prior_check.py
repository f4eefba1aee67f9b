"""Few calibration clips: how much a person's variance should lean on the population's (PRIOR_CLIPS).

Person calibration (data/calibration.py) standardises each input by the person's own mean and std. With a few
calibration clips the std is noisy: with 4 clips per person, Lite on calibrated AUs scored below no calibration. So
the person's variance is shrunk towards the population's, `s^2 = (n s_person^2 + P s_population^2) / (n + P)` for n
clips. This check chooses P where it is cheap to: logistic regression on the 35 real action units, 5-fold
actor-disjoint CV over actors 1-20 (test actors 1-4, 5-8, ..., 17-20; population statistics of the 16 training
actors), each actor calibrated on K of its clips drawn as in training (`calibration_indices`, DRAWS seeds), with
`PersonProfile.calibrate` itself. It takes about a minute on one core.

    python benchmarks/calibration_prior_check.py
    python benchmarks/calibration_prior_check.py --priors="(8,)" --clips="(4, 8)"
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.calibration import CalibrationSettings, calibration_indices, profile_from_inputs  # noqa: E402
from common.config import ConfigError, run_script  # noqa: E402

FEATURE_FILE = "../shared/data/ravdess_clip_features/au_mfcc.npz"  # per-clip OpenFace AUs of actors 1-20
FEATURE_KEY = "visual_au"  # the array of FEATURE_FILE that is calibrated and classified
CLIPS = (4, 8, 16, 0)  # calibration clips per person; 0 = all of them
PRIORS = (1, 4, 8, 16)  # values of P compared
DRAWS = 3  # seeds of the K-clip draws (one for all clips)
N_FOLDS = 5
L2 = 1e-3  # weight decay of the logistic regression (on standardised inputs)


def logistic_regression_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                                 y_test: np.ndarray) -> float:
    """Test accuracy of a multinomial logistic regression fitted with L-BFGS on train-standardised inputs."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-8
    train = torch.tensor((x_train - mean) / std, dtype=torch.float32)
    test = torch.tensor((x_test - mean) / std, dtype=torch.float32)
    labels = torch.tensor(y_train)
    weight = torch.zeros(train.shape[1], int(y_train.max()) + 1, requires_grad=True)
    bias = torch.zeros(weight.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train @ weight + bias, labels) + L2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((test @ weight + bias).argmax(1).numpy() == y_test).mean())


def calibrated(x: np.ndarray, labels: np.ndarray, actors: np.ndarray, train: np.ndarray, clips: int, prior: int,
               seed: int) -> np.ndarray:
    """`x` with every actor calibrated on `clips` of its own clips, onto the training actors' population."""
    population = {"features": (x[train].mean(0).astype(np.float32), x[train].std(0).astype(np.float32))}
    settings = CalibrationSettings(mode="person", clips=clips, source="any", seed=seed)
    out = x.copy()
    for actor, indices in calibration_indices(actors.tolist(), labels.tolist(), settings).items():
        profile = profile_from_inputs(f"actor {actor}", [{"features": x[i]} for i in indices])
        rows = actors == actor
        out[rows] = profile.calibrate("features", x[rows], population, prior_clips=prior)
    return out


def cv_accuracy(x: np.ndarray, labels: np.ndarray, actors: np.ndarray, clips: int | None, prior: int,
                seed: int) -> float:
    """Mean test accuracy over the actor folds; `clips=None`: no calibration."""
    per_actor = len(np.unique(actors)) // N_FOLDS
    scores = []
    for fold in range(N_FOLDS):
        test = np.isin(actors, np.arange(fold * per_actor + 1, (fold + 1) * per_actor + 1))
        inputs = x if clips is None else calibrated(x, labels, actors, ~test, clips, prior, seed)
        scores.append(logistic_regression_accuracy(inputs[~test], labels[~test], inputs[test], labels[test]))
    return float(np.mean(scores))


def main() -> dict:
    path = Path(FEATURE_FILE).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path} does not exist (the per-clip features of ../shared/README.md)")
    torch.set_num_threads(1)
    with np.load(path) as data:
        x, labels, actors = data[FEATURE_KEY].astype(np.float32), data["emotion"] - 1, data["actor"]
    results = {"none": cv_accuracy(x, labels, actors, None, 0, 0)}
    print(f"logistic regression on {FEATURE_KEY}, {N_FOLDS}-fold actor CV, mean over {DRAWS} draws of the clips")
    print("| clips per person | " + " | ".join(f"P = {p}" for p in PRIORS) + " |")
    print("|---" * (len(PRIORS) + 1) + "|")
    for clips in CLIPS:
        draws = range(DRAWS if clips else 1)
        row = {prior: float(np.mean([cv_accuracy(x, labels, actors, clips, prior, seed) for seed in draws]))
               for prior in PRIORS}
        results[clips] = row
        print(f"| {clips or 'all'} | " + " | ".join(f"{100 * acc:.1f}%" for acc in row.values()) + " |", flush=True)
    print(f"uncalibrated: {100 * results['none']:.1f}%")
    return results


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:])
