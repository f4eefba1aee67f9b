"""The torch Dataset over a preprocessed cache (and/or a per-clip feature file), and the builders the training
scripts use.

    split = kfold_split(range(1, 21), n_folds=5, fold=0)
    train, val, test = build_datasets("cache/ravdess16k", split, visual="features",
                                      features_file="../shared/data/ravdess_clip_features/au_mfcc.npz")
    train_loader, val_loader, test_loader = make_loaders(train, val, test, batch_size=32)

A sample is a dict (docs/internals.md): `audio` (1, 64, T) log-mel, `frames` (N, 3, S, S) ImageNet-normalised
face crops or `features` (D,), `has_audio` / `has_visual` (bool), `label` (0-7), `actor`, `clip_id`. A modality
that a clip lacks is marked false and its tensor is a zero placeholder that models must not read.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from data.calibration import CalibrationSettings, PersonProfile, moments_of, person_profiles
from data.preprocess import Settings
from data.ravdess import DataError, Split, check_actor_disjoint, parse_name

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
MODALITIES = ("audio", "visual")
VISUAL_INPUTS = ("frames", "features", None)
# Frame augmentation (train only), one draw per clip so the N frames stay consistent.
CROP_SCALE = (0.8, 1.0)                 # area fraction of the random square crop
JITTER = 0.2                            # brightness, contrast and saturation factors in 1 +- JITTER


@dataclass(frozen=True)
class AudioAugment:
    """Training-time log-mel augmentation, drawn per sample: a random circular time shift, then SpecAugment
    masks filled with the clip's mean (a zero would be a loud value on a log scale). The mask defaults are the
    measured recipe (docs/results.md: one mask of each kind and the shift beat two narrow masks without shift); the
    shift is off unless given: the training scripts pass their TIME_SHIFT_SECONDS (through data.setup)."""

    freq_masks: int = 1
    freq_mask_bins: int = 10  # widest frequency mask, in mel bins
    time_masks: int = 1
    time_mask_seconds: float = 0.6  # widest time mask
    time_shift_seconds: float = 0.0  # circular shift drawn uniformly in +- this

    def __post_init__(self) -> None:
        if min(self.freq_masks, self.freq_mask_bins, self.time_masks) < 0 or \
                min(self.time_mask_seconds, self.time_shift_seconds) < 0:
            raise DataError(f"augmentation counts and widths must be >= 0, got {self}")


@dataclass(frozen=True)
class _Record:
    clip_id: str
    actor: int
    label: int
    npz: Path | None        # cached clip, None for a features-only dataset
    has_audio: bool
    has_frames: bool
    feature_row: int | None  # row in the feature matrix, None when the clip has no features


def load_manifest(cache_dir: str | os.PathLike) -> dict:
    """The cache manifest; DataError when the folder is not a finished cache."""
    path = Path(cache_dir).expanduser() / "manifest.json"
    if not path.exists():
        raise DataError(f"{path.parent} is not a cache (no manifest.json); build it with data/prepare_ravdess.py")
    manifest = json.loads(path.read_text())
    if not manifest.get("complete"):
        raise DataError(f"cache {path.parent} is incomplete (preprocessing was interrupted); rerun "
                        f"data/prepare_ravdess.py with the same settings to finish it")
    return manifest


def load_features(path: str | os.PathLike, key: str = "visual_au") -> dict[str, np.ndarray]:
    """Per-clip feature vectors from an .npz keyed by RAVDESS stem (`names`), as {clip_id: float32 (D,)}.

    Rows with non-finite values are left out (the clip's visual input is then absent); `emotion`/`actor` arrays,
    when present, must agree with the names.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"feature file {path} does not exist")
    with np.load(path) as data:
        if "names" not in data or key not in data:
            raise DataError(f"{path} needs arrays 'names' and '{key}', has {sorted(data.files)}")
        names, matrix = [str(n) for n in data["names"]], data[key].astype(np.float32)
        checks = {k: data[k] for k in ("emotion", "actor") if k in data}
    if matrix.ndim != 2 or len(matrix) != len(names):
        raise DataError(f"{path}: '{key}' must be (len(names), D), got {matrix.shape} for {len(names)} names")
    features: dict[str, np.ndarray] = {}
    for i, stem in enumerate(names):
        name = parse_name(stem)
        for field, values in checks.items():
            if int(values[i]) != getattr(name, field):
                raise DataError(f"{path}: row {i} is named {stem} but has {field} {int(values[i])}")
        if name.take in features:
            raise DataError(f"{path}: two rows for take {name.take} ({stem})")
        if np.isfinite(matrix[i]).all():
            features[name.take] = matrix[i]
    return features


class RavdessDataset(Dataset):
    """Samples of a preprocessed cache and/or a feature file, restricted to `actors` (None: all).

    modalities: which inputs to provide, a subset of ('audio', 'visual'); the other is marked absent.
    visual: 'frames' (face crops from the cache), 'features' (rows of `features_file`) or None (no visual key).
    spec_augment: an AudioAugment (True: its defaults; False/None: off). frame_augment: random crop, flip and
    colour jitter of face crops. Both are for training only. feature_stats: (mean, std) to standardise features.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None, actors: Iterable[int] | None = None, *,
                 features_file: str | os.PathLike | None = None, modalities: Sequence[str] = MODALITIES,
                 visual: str | None = "frames", spec_augment: bool | AudioAugment | None = False,
                 frame_augment: bool = False, feature_stats: tuple[np.ndarray, np.ndarray] | None = None):
        modalities = tuple(modalities)
        if not modalities or set(modalities) - set(MODALITIES):
            raise DataError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        if visual not in VISUAL_INPUTS:
            raise DataError(f"visual must be one of {VISUAL_INPUTS}, got '{visual}'")
        if visual == "features" and features_file is None:
            raise DataError("visual='features' needs a features_file")
        if cache_dir is None and features_file is None:
            raise DataError("give a cache folder, a feature file, or both")
        self.visual = visual
        self.spec_augment = AudioAugment() if spec_augment is True else (spec_augment or None)
        self.frame_augment = frame_augment
        self.feature_stats = feature_stats
        # Person calibration (data.calibration): each person's profile, and the training population's statistics
        # that calibrated inputs are mapped onto (set by build_datasets; empty = uncalibrated).
        self.profiles: dict[int, PersonProfile] = {}
        self.population: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        settings = Settings().to_json()
        entries: list[dict] = []
        if cache_dir is not None:
            manifest = load_manifest(cache_dir)
            settings, entries = manifest["settings"], manifest["clips"]
        self.features = load_features(features_file) if features_file is not None else {}
        self._feature_ids = sorted(self.features)
        if cache_dir is None:  # a features-only dataset: the clips are the rows of the feature file
            entries = [_entry_from_take(take) for take in self._feature_ids]
        self.n_frames, self.size = settings["n_frames"], settings["size"]
        self.audio_steps_per_second = settings["sample_rate"] / settings["hop"]
        self.audio_shape = (1, settings["n_mels"],
                            round(settings["seconds"] * settings["sample_rate"]) // settings["hop"] + 1)
        self.feature_dim = len(next(iter(self.features.values()))) if self.features else 0
        keep = None if actors is None else {int(a) for a in actors}
        row = {take: i for i, take in enumerate(self._feature_ids)}
        clips_dir = Path(cache_dir).expanduser() / "clips" if cache_dir is not None else None
        self.records = [
            _Record(e["clip_id"], e["actor"], e["label"], clips_dir / f"{e['clip_id']}.npz" if clips_dir else None,
                    has_audio="audio" in modalities and e["has_audio"],
                    has_frames="visual" in modalities and visual == "frames" and e["has_video"],
                    feature_row=row.get(e["clip_id"]) if "visual" in modalities and visual == "features" else None)
            for e in entries if keep is None or e["actor"] in keep]
        self._matrix = np.stack([self.features[t] for t in self._feature_ids]) if self.features else None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def actors(self) -> list[int]:
        return sorted({r.actor for r in self.records})

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    def present_features(self) -> np.ndarray:
        """(n, D) feature rows (calibrated when the dataset is) of the clips that have them, for the
        standardisation statistics."""
        rows = [self._calibrated(r.actor, "features", self._matrix[r.feature_row])
                for r in self.records if r.feature_row is not None]
        return np.stack(rows) if rows else np.zeros((0, self.feature_dim), np.float32)

    def raw_inputs(self, i: int) -> dict[str, np.ndarray]:
        """Clip `i`'s inputs as stored, for the modalities it has: `logmel` (n_mels, T), `frames` uint8
        (N, S, S, 3), `features` (D,) unstandardised."""
        rec = self.records[i]
        arrays: dict[str, np.ndarray] = {}
        if rec.has_audio or rec.has_frames:
            with np.load(rec.npz) as z:  # reads only the members asked for
                if rec.has_audio:
                    arrays["logmel"] = z["logmel"]
                if rec.has_frames:
                    arrays["frames"] = z["frames"]
        if rec.feature_row is not None:
            arrays["features"] = self._matrix[rec.feature_row]
        return arrays

    def _calibrated(self, actor: int, kind: str, x: np.ndarray) -> np.ndarray:
        profile = self.profiles.get(actor)
        return x if profile is None else profile.calibrate(kind, x, self.population)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        arrays = self.raw_inputs(i)
        if rec.has_audio:
            audio = torch.from_numpy(self._calibrated(rec.actor, "logmel", arrays["logmel"])).unsqueeze(0)
        else:
            audio = torch.zeros(self.audio_shape)
        if rec.has_audio and self.spec_augment:
            audio = spec_augment(audio, self.spec_augment, self.audio_steps_per_second)
        sample = {"audio": audio, "has_audio": torch.tensor(rec.has_audio),
                  "label": torch.tensor(rec.label, dtype=torch.int64),
                  "actor": torch.tensor(rec.actor, dtype=torch.int64), "clip_id": rec.clip_id}
        if self.visual == "frames":
            sample["frames"] = self._frames(rec.actor, arrays.get("frames"))
            sample["has_visual"] = torch.tensor(rec.has_frames)
        elif self.visual == "features":
            sample["features"] = self._features(rec.actor, arrays.get("features"))
            sample["has_visual"] = torch.tensor(rec.feature_row is not None)
        else:
            sample["has_visual"] = torch.tensor(False)
        return sample

    def _frames(self, actor: int, frames: np.ndarray | None) -> torch.Tensor:
        if frames is None:
            return torch.zeros(self.n_frames, 3, self.size, self.size)
        pixels = self._calibrated(actor, "frames", frames.astype(np.float32) / 255.0)
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        if self.frame_augment:
            x = augment_frames(x)
        return (x - IMAGENET_MEAN) / IMAGENET_STD

    def _features(self, actor: int, x: np.ndarray | None) -> torch.Tensor:
        if x is None:
            return torch.zeros(self.feature_dim)
        x = self._calibrated(actor, "features", x)
        if self.feature_stats is not None:
            mean, std = self.feature_stats
            x = (x - mean) / std
        return torch.from_numpy(np.asarray(x, dtype=np.float32))


def _entry_from_take(take: str) -> dict:
    name = parse_name(f"01-{take}")
    return {"clip_id": take, "actor": name.actor, "label": name.emotion - 1, "has_audio": False, "has_video": False}


def shift_step_frames(shift_seconds: float, steps_per_second: float, shifts: int) -> int:
    """Log-mel frames between test-time shifts, so that `shifts` of them on each side reach the training time shift
    (`shift_seconds`); 0 when either is 0 (no test-time shifting)."""
    return round(shift_seconds * steps_per_second / shifts) if shifts else 0


def spec_augment(logmel: torch.Tensor, augment: AudioAugment = AudioAugment(),
                 steps_per_second: float = 100.0) -> torch.Tensor:
    """A random circular time shift, then SpecAugment frequency and time masks, on a (1, n_mels, T) log-mel.

    The shift wraps the clip around (RAVDESS clips are centred speech with silence at both ends), so the label
    stays true and no content is lost; masked cells take the clip's mean."""
    x = logmel.clone()
    max_shift = int(round(augment.time_shift_seconds * steps_per_second))
    if max_shift:
        x = torch.roll(x, int(torch.randint(-max_shift, max_shift + 1, ())), dims=2)
    fill = x.mean()
    time_width = int(round(augment.time_mask_seconds * steps_per_second))
    for axis, n_masks, width in ((1, augment.freq_masks, augment.freq_mask_bins), (2, augment.time_masks, time_width)):
        width = min(width, x.shape[axis])
        for _ in range(n_masks):
            w = int(torch.randint(0, width + 1, ()))
            start = int(torch.randint(0, x.shape[axis] - w + 1, ()))
            x.narrow(axis, start, w).fill_(fill)
    return x


def augment_frames(frames: torch.Tensor) -> torch.Tensor:
    """Random square crop (resized back), horizontal flip and colour jitter of (N, 3, S, S) frames in [0, 1], drawn
    once per clip."""
    n, _, s, _ = frames.shape
    side = int(round(s * float(torch.empty(()).uniform_(*CROP_SCALE)) ** 0.5))
    y0, x0 = (int(torch.randint(0, s - side + 1, ())) for _ in range(2))
    x = frames[:, :, y0:y0 + side, x0:x0 + side]
    if side != s:
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    brightness, contrast, saturation = (1 + JITTER * (2 * torch.rand(3) - 1)).tolist()
    x = x * brightness
    x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) * contrast + x.mean(dim=(1, 2, 3), keepdim=True)
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray) * saturation + gray
    return x.clamp_(0, 1)


def build_datasets(cache_dir: str | os.PathLike | None, split: Split, *,
                   features_file: str | os.PathLike | None = None, modalities: Sequence[str] = MODALITIES,
                   visual: str | None = "frames", spec_augment: bool | AudioAugment | None = False,
                   frame_augment: bool = False, standardize_features: bool = True,
                   calibration: CalibrationSettings | None = None
                   ) -> tuple[RavdessDataset, RavdessDataset, RavdessDataset]:
    """Train/val/test datasets of an actor split; augmentation only on train.

    Features are standardised with the mean and std of the training clips only (no test statistics leak in).
    `calibration` (data.calibration) with mode 'person' calibrates every clip by its own person's clips of the same
    part (a test person by test clips, unlabeled; never by another person's), onto the training population's
    statistics (`train.population`, kept in checkpoints); with source 'neutral' the calibration clips of the
    validation and test persons are not scored.
    Raises DataError when train or test (or a requested val) has no clips, e.g. actors missing from the data, and
    checks that no actor's samples are in two parts.
    """
    common = dict(features_file=features_file, modalities=modalities, visual=visual)
    train = RavdessDataset(cache_dir, split.train, spec_augment=spec_augment, frame_augment=frame_augment, **common)
    val = RavdessDataset(cache_dir, split.val, **common)
    test = RavdessDataset(cache_dir, split.test, **common)
    for part, ds in (("train", train), ("val", val), ("test", test)):
        if len(ds) == 0 and getattr(split, part):
            available = RavdessDataset(cache_dir, None, **common).actors
            raise DataError(f"no clips for the {part} actors {list(getattr(split, part))}; "
                            f"the data has actors {available}")
    check_actor_disjoint({"train": train.actors, "val": val.actors, "test": test.actors})
    population = moments_of(train, range(len(train))).stats()
    for part in (train, val, test):
        part.population = population
    if calibration is not None and calibration.on:
        calibrate_persons(train, val, test, calibration)
    if visual == "features" and standardize_features:
        rows = train.present_features()
        if len(rows):
            stats = (rows.mean(0), rows.std(0) + 1e-6)  # eps: an AU that never fires in train has std 0
            for ds in (train, val, test):
                ds.feature_stats = stats
    return train, val, test


def calibrate_persons(train: RavdessDataset, val: RavdessDataset, test: RavdessDataset,
                      calibration: CalibrationSettings) -> None:
    """Give each part its persons' profiles (data.calibration), calibrating onto the training population; drop the
    neutral calibration clips of validation and test persons from scoring."""
    for part in (train, val, test):
        profiles, used = person_profiles(part, calibration)
        part.profiles = profiles
        if calibration.source == "neutral" and part is not train:
            part.records = [r for i, r in enumerate(part.records) if i not in used]


def make_loaders(train: RavdessDataset, val: RavdessDataset, test: RavdessDataset, batch_size: int,
                 num_workers: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1
                 ) -> tuple[DataLoader, DataLoader, DataLoader]:
    """DataLoaders: train shuffled with a seeded generator (reproducible order) and without a last batch of one
    sample (BatchNorm cannot train on it); val and test in order.

    With `world_size` > 1 processes (torchrun) the training loader holds this rank's share of the shuffled order, a
    `DistributedSampler` (the same permutation on every rank, padded to equal shares; `Loaders.set_epoch` seeds
    it). Val and test stay whole: rank 0 evaluates them (training.evaluation.validate).

    With workers, every random stream a run draws from is a function of (seed, epoch), so a resumed run is the
    uninterrupted one: the training workers start afresh each epoch, seeded from the generator `Loaders.set_epoch`
    reseeds (persistent workers would carry their augmentation streams, and the order, from the first epoch on);
    val and test draw their workers' seeds from a generator of their own, not from the global stream that the
    model's dropout uses (a persistent loader draws once, so a resumed run would draw once more)."""
    generator = torch.Generator().manual_seed(seed)
    train_extra = dict(num_workers=num_workers, persistent_workers=False)
    if world_size > 1:
        sampler = DistributedSampler(train, world_size, rank, shuffle=True, seed=0)  # reseeded by set_epoch
        train_loader = DataLoader(train, batch_size, sampler=sampler, generator=generator,
                                  drop_last=len(sampler) % batch_size == 1, **train_extra)
    else:
        train_loader = DataLoader(train, batch_size, shuffle=True, generator=generator,
                                  drop_last=len(train) % batch_size == 1, **train_extra)
    # Without workers the global stream is left as it was (the runs made so far draw from it).
    eval_extra = dict(num_workers=num_workers, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed) if num_workers > 0 else None)
    return (train_loader,
            DataLoader(val, batch_size, shuffle=False, **eval_extra),
            DataLoader(test, batch_size, shuffle=False, **eval_extra))
