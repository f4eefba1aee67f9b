"""RAVDESS file names, clip discovery and actor-disjoint splits.

A RAVDESS file is named `MM-VV-EE-II-SS-RR-AA.ext`: modality (01 audio-video mp4, 02 video-only mp4, 03 audio-only
wav), vocal channel (01 speech, 02 song), emotion (01-08), intensity (01 normal, 02 strong), statement (01-02),
repetition (01-02), actor (01-24; odd actors are male, even female). The `01-` mp4's sound track, the `02-` mp4 and
the `03-` wav of one take are the same recording, so `discover_clips` groups them into one `Clip`: one sample,
never two, or a split would leak a recording from train into test.

    clips = discover_clips("/content/drive/MyDrive/RAVDESS")        # any folder layout, mp4/wav/flac, any case
    split = kfold_split(n_folds=5, fold=0, actors=range(1, 21))     # test 1-4, val 5-6, train 7-20
    split = split_actors(test_actors=[21, 22, 23, 24], val_actors=2)
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

EMOTIONS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")  # label = emotion - 1
ALL_ACTORS = tuple(range(1, 25))
MEDIA_EXTENSIONS = (".mp4", ".wav", ".flac")
CHANNELS = {"speech": (1,), "song": (2,), "all": (1, 2)}

# (field, allowed values) in file-name order.
_FIELDS = (
    ("modality", range(1, 4)),
    ("vocal_channel", range(1, 3)),
    ("emotion", range(1, 9)),
    ("intensity", range(1, 3)),
    ("statement", range(1, 3)),
    ("repetition", range(1, 3)),
    ("actor", range(1, 25)),
)


class DataError(ValueError):
    """A user mistake or unusable input in the data pipeline; scripts print it as one line and exit with status 2."""


class RavdessWarning(UserWarning):
    """Files that were skipped during discovery (malformed names, duplicates)."""


@dataclass(frozen=True)
class RavdessName:
    """The seven fields of a RAVDESS file name."""

    modality: int
    vocal_channel: int
    emotion: int
    intensity: int
    statement: int
    repetition: int
    actor: int

    @property
    def take(self) -> str:
        """The take key `VV-EE-II-SS-RR-AA`, shared by the 01-, 02- and 03- files of one recording."""
        return "-".join(f"{v:02d}" for v in (self.vocal_channel, self.emotion, self.intensity, self.statement,
                                              self.repetition, self.actor))


def parse_name(path: str | os.PathLike) -> RavdessName:
    """Parse a RAVDESS file name or stem; raise `DataError` naming the file and the offending field."""
    path = Path(path)
    ext = path.suffix.lower() if path.suffix.lower() in MEDIA_EXTENSIONS else ""
    stem = path.name[: len(path.name) - len(ext)] if ext else path.name
    parts = stem.split("-")
    if len(parts) != len(_FIELDS):
        raise DataError(f"{path.name}: not a RAVDESS name MM-VV-EE-II-SS-RR-AA ({len(parts)} fields instead of 7)")
    values = []
    for (field, allowed), text in zip(_FIELDS, parts):
        if not (len(text) == 2 and text.isascii() and text.isdigit() and int(text) in allowed):
            raise DataError(f"{path.name}: field {field} is '{text}', expected two digits "
                            f"{allowed.start:02d}-{allowed.stop - 1:02d}")
        values.append(int(text))
    name = RavdessName(*values)
    # Combinations that RAVDESS does not contain: a name claiming one is mislabelled, not a new kind of clip.
    if name.emotion == 1 and name.intensity == 2:
        raise DataError(f"{path.name}: field intensity is '02' (strong), but neutral has no strong intensity")
    if name.vocal_channel == 2 and name.emotion in (7, 8):
        raise DataError(f"{path.name}: field emotion is '{name.emotion:02d}', but song has no disgust or surprised")
    if ext and (ext == ".mp4") != (name.modality in (1, 2)):
        raise DataError(f"{path.name}: field modality is '{name.modality:02d}', which does not match a {ext} file")
    return name


@dataclass(frozen=True)
class Clip:
    """One take: every file of one recording. At least one of the three files is set."""

    clip_id: str            # take key VV-EE-II-SS-RR-AA
    actor: int
    emotion: int            # 1-8
    intensity: int
    statement: int
    repetition: int
    vocal_channel: int      # 1 speech, 2 song
    audio_file: Path | None = None  # 03- wav/flac
    av_file: Path | None = None     # 01- mp4: video with sound track
    video_file: Path | None = None  # 02- mp4: video without sound

    @property
    def label(self) -> int:
        return self.emotion - 1

    @property
    def audio_source(self) -> Path | None:
        """Where the sound comes from: the 03- file when there is one, else the 01- mp4's sound track."""
        return self.audio_file or self.av_file

    @property
    def video_source(self) -> Path | None:
        return self.av_file or self.video_file


@dataclass
class Discovery:
    clips: list[Clip]
    skipped: list[tuple[Path, str]]  # media files that were not used, with the reason


def _media_files(root: Path) -> Iterable[Path]:
    # Linked folders are followed (datasets are often linked in from Drive or a shared disk); a folder already
    # visited through another link is skipped, so a link cycle ends.
    visited: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        # macOS zip extraction leaves __MACOSX/ and ._name resource forks next to the real files: not media.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in MEDIA_EXTENSIONS:
                yield Path(folder) / name


def scan(root: str | os.PathLike, channel: str = "speech") -> Discovery:
    """Find RAVDESS files under `root` (recursively) and group them into clips; list what was skipped and why."""
    if channel not in CHANNELS:
        raise DataError(f"channel must be one of {sorted(CHANNELS)}, got '{channel}'")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data root {root} is a file: give the folder that holds the RAVDESS files")
    takes: dict[str, dict[int, Path]] = {}
    names: dict[str, RavdessName] = {}
    skipped: list[tuple[Path, str]] = []
    n_valid = 0
    for path in _media_files(root):
        try:
            name = parse_name(path)
        except DataError as e:
            skipped.append((path, str(e)))
            continue
        n_valid += 1
        if name.vocal_channel not in CHANNELS[channel]:
            continue
        files = takes.setdefault(name.take, {})
        if name.modality in files:
            skipped.append((path, f"duplicate of {files[name.modality]}"))
            continue
        files[name.modality] = path
        names[name.take] = name
    if not n_valid:
        others = f" ({len(skipped)} media files with other names, e.g. {skipped[0][0].name})" if skipped else ""
        raise DataError(f"no RAVDESS files (.mp4/.wav/.flac named MM-VV-EE-II-SS-RR-AA) under {root}{others}")
    if not takes:
        raise DataError(f"{n_valid} RAVDESS files under {root}, but none of channel '{channel}'")
    clips = [Clip(take, n.actor, n.emotion, n.intensity, n.statement, n.repetition, n.vocal_channel,
                  audio_file=takes[take].get(3), av_file=takes[take].get(1), video_file=takes[take].get(2))
             for take, n in sorted(names.items())]
    return Discovery(clips, skipped)


def discover_clips(root: str | os.PathLike, channel: str = "speech") -> list[Clip]:
    """Clips under `root`, sorted by clip id; skipped files (malformed names, duplicates) are listed in a warning."""
    found = scan(root, channel)
    if found.skipped:
        listing = "; ".join(f"{p}: {why}" for p, why in found.skipped)
        warnings.warn(f"skipped {len(found.skipped)} file(s): {listing}", RavdessWarning, stacklevel=2)
    return found.clips


# ----------------------------------------------------------------------------------------------------- splits

@dataclass(frozen=True)
class Split:
    """Actors of each part. Constructing one with an actor in two parts raises `DataError`."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.train or not self.test:
            raise DataError(f"a split needs training and test actors, got {self}")
        check_actor_disjoint({"train": self.train, "val": self.val, "test": self.test})

    def __str__(self) -> str:
        return " | ".join(f"{part} {_ranges(getattr(self, part))}" for part in ("train", "val", "test"))


def _ranges(actors: Sequence[int]) -> str:
    """(1, 2, 3, 4, 9) -> '1-4,9': short enough for a log line."""
    runs: list[list[int]] = []
    for a in sorted(actors):
        if runs and a == runs[-1][-1] + 1:
            runs[-1].append(a)
        else:
            runs.append([a])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs) or "-"


def check_actor_disjoint(parts: dict[str, Iterable[int]]) -> None:
    """Raise `DataError` if one actor appears in two parts (e.g. the actors of train and test samples)."""
    seen: dict[int, str] = {}
    for part, actors in parts.items():
        for actor in set(int(a) for a in actors):
            if actor in seen:
                raise DataError(f"actor {actor} is in both {seen[actor]} and {part}: splits must be actor-disjoint")
            seen[actor] = part


def _actor_list(actors: Iterable[int]) -> list[int]:
    actors = sorted(set(int(a) for a in actors))
    if not actors:
        raise DataError("the actor list is empty")
    return actors


def kfold_split(actors: Iterable[int] = ALL_ACTORS, n_folds: int = 6, fold: int = 0, n_val_actors: int = 2) -> Split:
    """Fold `fold` (0-based) of k-fold cross-validation over blocks of consecutive actors.

    Test = block `fold` (6 folds over 1-24: 1-4, 5-8, ...; 5 folds over 1-20: test fold k = actors 4k+1..4k+4).
    Validation = the first `n_val_actors` actors of the next block (wrapping round), never the test block;
    train = the rest. Blocks of 4 consecutive actors hold 2 men and 2 women; 2 validation actors keep 1 of each.
    """
    actors = _actor_list(actors)
    if not 2 <= n_folds <= len(actors):
        raise DataError(f"n_folds must be 2..{len(actors)} for {len(actors)} actors, got {n_folds}")
    if not 0 <= fold < n_folds:
        raise DataError(f"fold must be 0..{n_folds - 1}, got {fold}")
    bounds = [round(i * len(actors) / n_folds) for i in range(n_folds + 1)]
    blocks = [actors[bounds[i]:bounds[i + 1]] for i in range(n_folds)]
    nxt = blocks[(fold + 1) % n_folds]
    if not 0 <= n_val_actors <= len(nxt):
        raise DataError(f"n_val_actors must be 0..{len(nxt)} (the size of a fold), got {n_val_actors}")
    test, val = blocks[fold], nxt[:n_val_actors]
    train = [a for a in actors if a not in test and a not in val]
    return Split(tuple(train), tuple(val), tuple(test))


def split_actors(test_actors: int | Iterable[int], val_actors: int | Iterable[int] = 0,
                 actors: Iterable[int] = ALL_ACTORS) -> Split:
    """A train/val/test split by actor: explicit lists (`test_actors=[21, 22, 23, 24]`) or counts
    (`test_actors=4, val_actors=2`: test = the last 4 actors, val = the 2 before them); train = the rest."""
    actors = _actor_list(actors)
    rest = list(actors)

    def take(spec: int | Iterable[int], part: str) -> tuple[int, ...]:
        if isinstance(spec, int):
            if not 0 <= spec < len(rest):
                raise DataError(f"{part}_actors={spec} leaves no training actors out of {len(rest)}")
            chosen = rest[len(rest) - spec:]
        else:
            chosen = sorted(set(int(a) for a in spec))
            missing = [a for a in chosen if a not in actors]
            if missing:
                raise DataError(f"{part} actors {missing} are not among the actors {_ranges(actors)}")
        for a in chosen:
            if a in rest:
                rest.remove(a)
        return tuple(chosen)

    test = take(test_actors, "test")
    val = take(val_actors, "val")
    # Built from the chosen lists as given, so an actor named in both raises in Split's check.
    return Split(tuple(a for a in actors if a not in test and a not in val), val, test)
