"""From a script's data constants to DataLoaders: one place, so the training and debugging scripts agree.

    settings = DataSettings(dataset="ravdess", data_root="../shared/data/ravdess_speech_16k", ...)
    cache = prepare_data(settings)                         # builds the cache on first use, then reuses it
    split = make_split(cache, actors, n_folds, fold, n_val_actors)
    loaders = build_loaders(cache, split, settings)        # .train .val .test .feature_dim .class_names
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, DistributedSampler

from common import distributed
from common.config import parse_actors
from data.calibration import CalibrationSettings
from data.dataset import AudioAugment, build_datasets, load_manifest, make_loaders, shift_step_frames
from data.preprocess import cache_lock, prepare_cache
from data.ravdess import EMOTIONS, DataError, Split, kfold_split, split_actors
from data.synthetic import make_synthetic_ravdess

DATASETS = ("synthetic", "ravdess")
# The quick-start synthetic set: 12 actors so that a 6-fold split has 8 training actors per fold.
SYNTHETIC_ACTORS = tuple(range(1, 13))
# Frames per clip and crop size when N_FRAMES / FRAME_SIZE are 0: RAVDESS's 16 x 112 px, and 8 x 64 px for the
# synthetic set so that the quick start trains in minutes on a CPU.
DEFAULT_FRAMES = {"ravdess": (16, 112), "synthetic": (8, 64)}


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    """A script's data constants, each passed by keyword (`DataSettings(batch_size=BATCH_SIZE, ...)`): no field has a
    default here, so each value has one home, the constant of the script that sets it."""

    dataset: str  # "synthetic" or "ravdess"
    data_root: str
    cache_dir: str  # "" = <output_dir>/cache/<name of data_root>_<frames>x<size> (cache_plan)
    channel: str
    modalities: tuple[str, ...]
    visual_input: str  # "frames" or "features"
    feature_file: str
    n_frames: int  # 0 = the dataset's default (DEFAULT_FRAMES)
    frame_size: int
    spec_augment: bool
    freq_masks: int  # SpecAugment and time shift of training log-mels: see data.dataset.AudioAugment
    freq_mask_bins: int
    time_masks: int
    time_mask_seconds: float
    time_shift_seconds: float
    frame_augment: bool
    batch_size: int
    num_workers: int
    seed: int
    output_dir: str
    prepare_workers: int  # processes that preprocess the data into the cache on first use; 0 = one per CPU
    calibration: str  # person calibration (data.calibration): none | person
    calibration_clips: int  # 0 = all of a person's clips, K = K clips drawn with `seed`
    calibration_source: str  # any | neutral

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(self.modalities))  # a list from a run config or --modalities

    @property
    def calibration_settings(self) -> CalibrationSettings:
        return CalibrationSettings(mode=self.calibration, clips=self.calibration_clips,
                                   source=self.calibration_source, seed=self.seed)


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader
    feature_dim: int  # width of the per-clip visual features (0 without a feature file)
    class_names: list[str]
    calibration_settings: CalibrationSettings
    seed: int = 0

    @property
    def calibration(self) -> tuple[CalibrationSettings, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """The run's calibration settings and the training population's input statistics {kind: (mean, std)},
        onto which calibrated inputs are mapped; checkpoints keep both for predict.py (data.calibration)."""
        return self.calibration_settings, self.train.dataset.population

    @property
    def feature_stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(mean, std) of the training actors' features that standardise every split; None without features.
        Checkpoints store them, so the model is applied later to features scaled as in training."""
        return self.train.dataset.feature_stats

    def time_shift_steps(self, shifts: int) -> int:
        """Log-mel frames between the `shifts` test-time shifts on each side, so the widest is the training
        shift (TIME_SHIFT_SECONDS); 0 when either is 0."""
        dataset = self.train.dataset
        if dataset.spec_augment is None:
            return 0
        return shift_step_frames(dataset.spec_augment.time_shift_seconds, dataset.audio_steps_per_second, shifts)

    def set_epoch(self, epoch: int) -> None:
        """Seed the training order and the data-loader workers' augmentation from (seed, epoch), so a resumed run
        visits and augments batches as an uninterrupted one (each epoch starts its workers afresh from this seed:
        data.dataset.make_loaders).

        Under torchrun each rank's DistributedSampler draws the permutation one process would draw, so the ranks'
        batches together are one process's batches of N x BATCH_SIZE; the loader's generator, which seeds the
        workers' augmentation, is offset by the rank so that ranks augment differently."""
        epoch_seed = self.seed * 100_003 + epoch
        sampler = self.train.sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch_seed)  # its seed is 0: the permutation is seeded with epoch_seed
            self.train.generator.manual_seed(epoch_seed + 1_000_003 * sampler.rank)
        else:
            self.train.generator.manual_seed(epoch_seed)


def _check(settings: DataSettings) -> None:
    if settings.dataset not in DATASETS:
        raise DataError(f"DATASET must be one of {DATASETS}, got '{settings.dataset}'")
    if settings.visual_input not in ("frames", "features"):
        raise DataError(f"VISUAL_INPUT must be 'frames' or 'features', got '{settings.visual_input}'")
    if settings.visual_input == "features" and "visual" in settings.modalities and not settings.feature_file:
        raise DataError("VISUAL_INPUT='features' needs FEATURE_FILE (an .npz of per-clip features)")
    settings.calibration_settings  # validates CALIBRATION, CALIBRATION_CLIPS and CALIBRATION_SOURCE


def cache_plan(settings: DataSettings) -> tuple[Path, Path, int, int]:
    """Data root, cache folder, frames per clip and crop size for `settings`, without touching any file (predict.py
    uses it to find the preprocessing a checkpoint's run used)."""
    if settings.dataset == "synthetic":
        root = Path(settings.output_dir) / "synthetic_ravdess"
    else:
        root = Path(settings.data_root).expanduser()
    cache = Path(settings.cache_dir) if settings.cache_dir else Path(settings.output_dir) / "cache" / root.name
    n_frames, size = DEFAULT_FRAMES[settings.dataset]
    n_frames, size = settings.n_frames or n_frames, settings.frame_size or size
    if not settings.cache_dir:
        cache = cache.with_name(f"{cache.name}_{n_frames}x{size}")
    return root, cache, n_frames, size


# Reading old run configs only: a run made before a constant existed trained with this value, so a stored config
# that lacks the key behaves as it did (predict.py and visualize_attention.py read such configs through
# `run_data_settings`). A training script never falls back on this table: it passes every value itself.
_BEFORE_CONSTANT = {"DATA_ROOT": "data/RAVDESS", "CACHE_DIR": "", "CHANNEL": "speech",
                    "MODALITIES": ("audio", "visual"), "VISUAL_INPUT": "frames", "FEATURE_FILE": "", "N_FRAMES": 0,
                    "FRAME_SIZE": 0, "SPEC_AUGMENT": True, "FREQ_MASKS": 1, "FREQ_MASK_BINS": 10, "TIME_MASKS": 1,
                    "TIME_MASK_SECONDS": 0.6, "TIME_SHIFT_SECONDS": 0.3, "FRAME_AUGMENT": True, "BATCH_SIZE": 32,
                    "NUM_WORKERS": 2, "SEED": 0, "OUTPUT_DIR": "checkpoints", "PREPARE_WORKERS": 0,
                    "CALIBRATION": "none", "CALIBRATION_CLIPS": 0, "CALIBRATION_SOURCE": "any"}


def run_data_settings(run_config: dict) -> DataSettings | None:
    """The DataSettings of a training run, from the run config a checkpoint stores; None when it holds none
    (predict.py and visualize_attention.py use it to find the cache and feature file a checkpoint was trained on)."""
    if run_config.get("DATASET") not in DATASETS:
        return None
    c = {**_BEFORE_CONSTANT, **run_config}
    return DataSettings(
        dataset=c["DATASET"], data_root=c["DATA_ROOT"], cache_dir=c["CACHE_DIR"], channel=c["CHANNEL"],
        modalities=c["MODALITIES"], visual_input=c["VISUAL_INPUT"], feature_file=c["FEATURE_FILE"],
        n_frames=c["N_FRAMES"], frame_size=c["FRAME_SIZE"], spec_augment=c["SPEC_AUGMENT"],
        freq_masks=c["FREQ_MASKS"], freq_mask_bins=c["FREQ_MASK_BINS"], time_masks=c["TIME_MASKS"],
        time_mask_seconds=c["TIME_MASK_SECONDS"], time_shift_seconds=c["TIME_SHIFT_SECONDS"],
        frame_augment=c["FRAME_AUGMENT"], batch_size=c["BATCH_SIZE"], num_workers=c["NUM_WORKERS"], seed=c["SEED"],
        output_dir=c["OUTPUT_DIR"], prepare_workers=c["PREPARE_WORKERS"], calibration=c["CALIBRATION"],
        calibration_clips=c["CALIBRATION_CLIPS"], calibration_source=c["CALIBRATION_SOURCE"])


def prepare_data(settings: DataSettings) -> Path:
    """The cache folder for `settings`, preprocessing (or, for 'synthetic', generating) the data on first use.

    Under torchrun rank 0 prepares while the others wait. Independent processes (two tune.py, parallel folds, two
    notebooks on one Drive cache) take turns through the cache's lock (data.preprocess.cache_lock), on one machine
    or across machines that share the cache's file system."""
    _check(settings)
    if distributed.is_main():
        _prepare(settings)
    distributed.barrier()
    return cache_plan(settings)[1]


def _prepare(settings: DataSettings) -> None:
    root, cache, n_frames, size = cache_plan(settings)
    # The cache always holds every modality the files have; MODALITIES only selects what the model sees.
    cache_args = dict(channel=settings.channel, n_frames=n_frames, size=size, workers=settings.prepare_workers or None)
    if settings.dataset == "synthetic":
        # The generated media only feed the cache: once it is complete they are deleted (the quick start would
        # otherwise leave ~100 MB in the output folder), and regenerated, identical, only to rebuild the cache.
        if _is_complete(cache):
            return
        # Held from generation to deletion: two processes must not write the media of one folder at once, nor
        # one delete them while the other still reads them.
        with cache_lock(cache):
            if _is_complete(cache):  # made by the process this one waited for
                return
            print(f"generating the synthetic RAVDESS-format quick-start set in {root} ...")
            # 16 kHz is the rate training uses: a 48 kHz wav would only triple the disk space.
            make_synthetic_ravdess(root, actors=SYNTHETIC_ACTORS, seconds=3.6, sample_rate=16000)
            prepare_cache(root, cache, **cache_args)  # re-enters the lock this process holds
            shutil.rmtree(root)
        return
    if not root.exists():
        raise DataError(f"DATA_ROOT {root} does not exist (see README: Getting RAVDESS)")
    if not root.is_dir():
        raise DataError(f"DATA_ROOT {root} is a file: give the folder that holds the RAVDESS files")
    prepare_cache(root, cache, **cache_args)  # takes the cache's lock itself


def _is_complete(cache: Path) -> bool:
    """True once a preparation of `cache` finished (its manifest says so)."""
    try:
        return bool(json.loads((cache / "manifest.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def cached_actors(cache: Path) -> list[int]:
    """The actors of the clips in the cache; DataError naming the cause when it holds none."""
    manifest = load_manifest(cache)
    actors = sorted({clip["actor"] for clip in manifest["clips"]})
    if not actors:
        failures = manifest.get("failures", [])
        cause = (f"all {len(failures)} clips failed in preprocessing (e.g. {failures[0]['clip_id']}: "
                 f"{failures[0]['reason']})" if failures else "no clip was found")
        raise DataError(f"the cache {cache} holds no usable clip: {cause}")
    return actors


def make_split(cache: Path, actors: str | list[int], n_folds: int, fold: int, n_val_actors: int,
               test_actors: list[int] | str = "", val_actors: list[int] | str = "") -> Split:
    """Explicit TEST_ACTORS/VAL_ACTORS when given, else fold `fold` of the k-fold split over `actors`
    ("auto": every actor in the cache, e.g. 1-24 for the full RAVDESS, 1-12 for the synthetic set)."""
    from data.ravdess import _ranges

    available = cached_actors(cache)
    actors = available if actors == "auto" else parse_actors(actors)
    missing = sorted(set(actors) - set(available))
    if missing:  # else a fold of absent actors would train or test on nothing, under a label naming them
        raise DataError(f"ACTORS names actors the data does not have ({_ranges(missing)}); "
                        f"the data has actors {_ranges(available)}")
    if test_actors:
        return split_actors(parse_actors(test_actors), parse_actors(val_actors) if val_actors else 0, actors)
    return kfold_split(actors, n_folds, fold, n_val_actors)


def audio_augment(settings: DataSettings) -> AudioAugment | None:
    if not settings.spec_augment:
        return None
    return AudioAugment(settings.freq_masks, settings.freq_mask_bins, settings.time_masks,
                        settings.time_mask_seconds, settings.time_shift_seconds)


def build_loaders(cache: Path, split: Split, settings: DataSettings) -> Loaders:
    visual = settings.visual_input if "visual" in settings.modalities else None
    train, val, test = build_datasets(cache, split, features_file=settings.feature_file or None,
                                      modalities=settings.modalities, visual=visual,
                                      spec_augment=audio_augment(settings), frame_augment=settings.frame_augment,
                                      calibration=settings.calibration_settings)
    train_loader, val_loader, test_loader = make_loaders(train, val, test, settings.batch_size, settings.num_workers,
                                                         settings.seed, distributed.rank(), distributed.world_size())
    return Loaders(train_loader, val_loader, test_loader, train.feature_dim, list(EMOTIONS),
                   settings.calibration_settings, settings.seed)
