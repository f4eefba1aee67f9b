"""Person calibration: each person's inputs are compared with that person's own range, from unlabeled clips.

Every model here fits its training actors and loses 20-30 points on new ones: one person's resting face or
"calm" voice is another's smile or anger. Calibration removes that part of the difference between people. For
every person (a RAVDESS actor; for predict.py, a profile built from a user's own recordings) the statistics of
each input are computed from that person's calibration clips:

- per-clip features (action units): mean and std per dimension;
- log-mel: mean and std per mel band, over the time frames of all the person's clips;
- face frames: mean and std per colour channel of the person's face crops (pixels in [0, 1]).

A calibrated input is the person's input standardised by the person's statistics, then mapped onto the training
population's mean and std: `x' = (x - m_person) / s_person * s_population + m_population`. Up to that fixed
per-dimension affine map it is the person-standardised input, which the models' input normalisation absorbs
(feature standardisation with the training statistics, BatchNorm, ImageNet normalisation of frames); it keeps each
input in its usual range, so the same code serves pretrained frame encoders, plots and uncalibrated models (a
model trained without calibration can take a profile too: the person's inputs are then moved onto the range it was
trained on). A person without statistics is left as is, which is the same as using the population's.

Which clips calibrate a person (`CalibrationSettings`): all of the person's clips in the split or K of them drawn
with a fixed seed (`clips`), from any emotion or only the neutral ones (`source`). Only `source="neutral"` reads
a label, and only to pick the neutral clips; those clips of a test person are then not scored. With neutral clips
only the mean is matched (a few neutral clips give a mean, but their spread is that of one emotion, not the
person's). A person's variance is shrunk towards the population's as if PRIOR_CLIPS clips of the population were
added to the person's: `s^2 = (n s_person^2 + PRIOR_CLIPS s_population^2) / (n + PRIOR_CLIPS)` for n calibration
clips. The std of a few clips is noisy (with 4 clips it made calibrated AUs worse than none), that of many is nearly
the person's own, and a dimension that never moved in the calibration clips does not blow up.

    settings = CalibrationSettings(mode="person", clips=16, source="any", seed=0)
    population = moments_of(dataset, range(len(dataset))).stats()
    profiles = person_profiles(dataset, settings)          # {actor: PersonProfile}
    logmel = profiles[7].calibrate("logmel", logmel, population)
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from common.files import atomic_savez
from data.ravdess import EMOTIONS, DataError

CALIBRATIONS = ("none", "person")
CALIBRATION_SOURCES = ("any", "neutral")
NEUTRAL_LABEL = EMOTIONS.index("neutral")
INPUTS = ("logmel", "frames", "features")  # the statistics' keys, one per kind of model input
# A person's variance counts as n clips against PRIOR_CLIPS of the population's. Chosen with logistic regression on
# the AUs over the 5 CV folds (docs/results.md, "Few calibration clips"): 4 and 8 were equal, 16 a little worse.
PRIOR_CLIPS = 8


@dataclass(frozen=True)
class CalibrationSettings:
    """How a run calibrates: `mode` none | person; `clips` 0 = all of a person's clips, K = K drawn with `seed`;
    `source` any | neutral (only the person's neutral clips)."""

    mode: str
    clips: int
    source: str
    seed: int

    def __post_init__(self) -> None:
        if self.mode not in CALIBRATIONS:
            raise DataError(f"CALIBRATION must be one of {CALIBRATIONS}, got '{self.mode}'")
        if self.source not in CALIBRATION_SOURCES:
            raise DataError(f"CALIBRATION_SOURCE must be one of {CALIBRATION_SOURCES}, got '{self.source}'")
        if not isinstance(self.clips, int) or self.clips < 0:
            raise DataError(f"CALIBRATION_CLIPS must be 0 (all of a person's clips) or a number of clips, "
                            f"got {self.clips!r}")

    @property
    def on(self) -> bool:
        return self.mode == "person"

    def describe(self) -> str:
        if not self.on:
            return "no person calibration"
        clips = "all" if self.clips == 0 else f"{self.clips} (seed {self.seed})"
        source = "neutral clips, not scored" if self.source == "neutral" else "clips of any emotion, unlabeled"
        return f"person calibration on {clips} of each person's {source}"

    def to_json(self) -> dict:
        return {"mode": self.mode, "clips": self.clips, "source": self.source, "seed": self.seed}


@dataclass
class Moments:
    """Running count, sum and sum of squares per dimension of each input kind, in float64 (pooled exactly)."""

    count: dict[str, float] = field(default_factory=dict)
    total: dict[str, np.ndarray] = field(default_factory=dict)
    squares: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, kind: str, values: np.ndarray, axes: tuple[int, ...]) -> None:
        """Add `values`, reduced over `axes` (the axes that are not the statistics' dimension)."""
        x = np.asarray(values, dtype=np.float64)
        self.count[kind] = self.count.get(kind, 0.0) + x.size / _kept_size(x, axes)
        self.total[kind] = self.total.get(kind, 0.0) + x.sum(axis=axes)
        self.squares[kind] = self.squares.get(kind, 0.0) + np.square(x).sum(axis=axes)

    def stats(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{kind: (mean, std)} as float32, per dimension."""
        out = {}
        for kind, n in self.count.items():
            mean = self.total[kind] / n
            var = np.maximum(self.squares[kind] / n - mean ** 2, 0.0)
            out[kind] = (mean.astype(np.float32), np.sqrt(var).astype(np.float32))
        return out


def _kept_size(x: np.ndarray, axes: tuple[int, ...]) -> int:
    return int(np.prod([n for i, n in enumerate(x.shape) if i not in axes]))


def add_inputs(moments: Moments, inputs: dict[str, np.ndarray]) -> None:
    """Add one clip's raw inputs: `logmel` (n_mels, T) or windows (W, n_mels, T); `frames` uint8 (..., S, S, 3);
    `features` (D,) or (W, D)."""
    for kind, x in inputs.items():
        x = np.asarray(x)
        if kind == "logmel":
            moments.add(kind, x, tuple(i for i in range(x.ndim) if i != x.ndim - 2))
        elif kind == "frames":
            moments.add(kind, x.astype(np.float32) / 255.0, tuple(range(x.ndim - 1)))
        elif kind == "features":
            moments.add(kind, x, tuple(range(x.ndim - 1)))
        else:
            raise ValueError(f"unknown input kind '{kind}' (expected one of {INPUTS})")


@dataclass
class PersonProfile:
    """A person's input statistics: {kind: (mean, std)} per dimension, from `n_clips` clips (or clip-length
    stretches of longer recordings: the weight of the person's variance against PRIOR_CLIPS).

    `mean_only`: only the mean is matched (calibration on neutral clips)."""

    person: str
    n_clips: int
    stats: dict[str, tuple[np.ndarray, np.ndarray]]
    mean_only: bool = False
    source: str = ""  # where the clips came from, in words

    def calibrate(self, kind: str, x: np.ndarray, population: dict[str, tuple[np.ndarray, np.ndarray]],
                  prior_clips: int = PRIOR_CLIPS) -> np.ndarray:
        """`x` of input kind `kind` (laid out as in `add_inputs`; frames as float in [0, 1]) moved from this
        person's range onto the population's; unchanged when either has no statistics for `kind`. The person's
        variance weighs `n_clips` against `prior_clips` of the population's."""
        if kind not in self.stats or kind not in population:
            return x
        mean, std = self.stats[kind]
        pop_mean, pop_std = population[kind]
        shape = (-1, 1) if kind == "logmel" else (-1,)  # mel bands are the second-last axis, others the last
        mean, pop_mean = mean.reshape(shape), pop_mean.reshape(shape)
        if self.mean_only:
            return (x - mean + pop_mean).astype(np.float32)
        std, pop_std = std.reshape(shape), pop_std.reshape(shape)
        std = np.sqrt((self.n_clips * std ** 2 + prior_clips * pop_std ** 2) / (self.n_clips + prior_clips))
        return ((x - mean) / std * pop_std + pop_mean).astype(np.float32)

    def for_model(self, settings: dict, population: dict[str, tuple[np.ndarray, np.ndarray]]) -> PersonProfile:
        """This profile as a model trained with calibration `settings` (a checkpoint's) applies it: only its mean
        when that model was calibrated on neutral clips, as in its training; a DataError when its statistics do not
        fit the model's inputs (`population`)."""
        for kind, (mean, _) in self.stats.items():
            if kind in population and population[kind][0].shape != mean.shape:
                raise DataError(f"the profile of '{self.person}' has {kind} statistics of shape {mean.shape}, this "
                                f"model's input has {population[kind][0].shape}: build it with this model")
        neutral = settings["mode"] == "person" and settings["source"] == "neutral"
        return replace(self, mean_only=True) if neutral else self

    def describe(self) -> str:
        what = "mean only" if self.mean_only else "mean and std"
        source = f" of {self.source}" if self.source else ""
        return f"{what} of {', '.join(self.stats)} from {self.n_clips} clip(s){source}"

    def save(self, path: str | os.PathLike) -> Path:
        """A small .npz (reused with predict.py --profile)."""
        path = Path(path).expanduser()
        if path.suffix != ".npz":
            raise DataError(f"a profile is saved as .npz, got '{path.name}'")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"{kind}_{part}": value for kind, pair in self.stats.items()
                  for part, value in zip(("mean", "std"), pair)}
        atomic_savez(path, person=np.array(self.person), n_clips=np.array(self.n_clips),
                     mean_only=np.array(self.mean_only), source=np.array(self.source), **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PersonProfile:
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"profile {path} does not exist (make one with --calibrate=... --save_profile={path})")
        try:
            with np.load(path) as data:
                stats = {kind: (data[f"{kind}_mean"], data[f"{kind}_std"]) for kind in INPUTS
                         if f"{kind}_mean" in data}
                return cls(str(data["person"]), int(data["n_clips"]), stats, bool(data["mean_only"]),
                           str(data["source"]))
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{path} is not a person profile ({err})") from None


def profile_from_inputs(person: str, clips: Iterable[dict[str, np.ndarray]], mean_only: bool = False,
                        source: str = "") -> PersonProfile:
    """A profile from the raw inputs of a person's clips (dicts as for `add_inputs`)."""
    moments = Moments()
    n = 0
    for inputs in clips:
        add_inputs(moments, inputs)
        n += 1
    if n == 0 or not moments.count:
        raise DataError(f"no usable clip to calibrate person '{person}'")
    return PersonProfile(person, n, moments.stats(), mean_only, source)


def calibration_indices(actors: Sequence[int], labels: Sequence[int], settings: CalibrationSettings
                        ) -> dict[int, list[int]]:
    """{actor: indices of the actor's calibration clips}. Each person's clips only; labels are read only to keep
    the neutral ones when settings.source is 'neutral'; K clips are drawn per person with a seed of its own."""
    by_actor: dict[int, list[int]] = {}
    for i, (actor, label) in enumerate(zip(actors, labels)):
        if settings.source == "any" or label == NEUTRAL_LABEL:
            by_actor.setdefault(int(actor), []).append(i)
    if settings.clips:
        by_actor = {actor: sorted(np.random.default_rng([settings.seed, actor]).choice(
                        indices, min(settings.clips, len(indices)), replace=False).tolist())
                    for actor, indices in by_actor.items()}
    return by_actor


def moments_of(dataset, indices: Iterable[int]) -> Moments:
    """The pooled moments of the raw inputs of `dataset`'s clips at `indices` (a RavdessDataset)."""
    moments = Moments()
    for i in indices:
        add_inputs(moments, dataset.raw_inputs(i))
    return moments


def person_profiles(dataset, settings: CalibrationSettings) -> tuple[dict[int, PersonProfile], set[int]]:
    """Every person's profile in `dataset` (a RavdessDataset), from that person's calibration clips only, and the
    indices of those clips. A person with no calibration clip (e.g. no neutral clip) gets no profile."""
    chosen = calibration_indices([r.actor for r in dataset.records], dataset.labels, settings)
    profiles = {actor: PersonProfile(f"actor {actor}", len(indices), moments_of(dataset, indices).stats(),
                                     mean_only=settings.source == "neutral")
                for actor, indices in chosen.items()}
    return profiles, {i for indices in chosen.values() for i in indices}
