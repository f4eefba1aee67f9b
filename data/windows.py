"""Model inputs from any audio or video file (any name, any length) with the preprocessing of training.

`read_windows` runs data/preprocess.py's steps on one file: its sound (a wav/flac/mp3 file or a video's sound
track) at 16 kHz -> log-mel, and N frames -> one face box -> SxS crops. A file no longer than the training window
(`settings.seconds`) gives one window centred on it, exactly what the cache holds for a clip; a longer file gives
sliding windows of that length, `hop` seconds apart, the first at the start and the last ending at the end of the
file (predict.py averages their probabilities). Frames and sound of a window cover the same stretch of time.
`to_batch` turns the windows into the batch dict of docs/internals.md.

    windows = read_windows(Path("interview.mp4"), Settings(), audio=True, frames=True, hop=1.0)
    probs = model(to_batch(windows, Settings())).softmax(-1).mean(0)
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.dataset import IMAGENET_MEAN, IMAGENET_STD
from data.preprocess import (VIDEO_EXTENSIONS, ClipError, Settings, face_crops, fix_length, log_mel,
                             read_frames_at, read_sound, sample_frame_indices)

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + AUDIO_EXTENSIONS


@dataclass
class Windows:
    """The model inputs of one file; a modality that was not read or is absent is None."""

    path: Path
    duration: float                # seconds (of the video when frames were read, else of the sound)
    starts: list[float | None]     # window starts in seconds; [None] = one window centred on the file
    logmel: np.ndarray | None      # float32 (W, n_mels, T)
    frames: np.ndarray | None      # uint8 (W, N, S, S, 3) RGB face crops
    faces_found: int = 0           # windows in which a face was found (the others use a centre crop)
    notes: list[str] = field(default_factory=list)

    @property
    def n_windows(self) -> int:
        return len(self.starts)


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def window_starts(duration: float, seconds: float, hop: float, max_windows: int) -> list[float | None]:
    """Start times of windows of `seconds` covering `duration`: [None] (one centred window, as in training) when
    the file is at most half a hop longer than a window (a 4 s RAVDESS clip, like its cache entry), else `hop` apart
    from 0 to `duration - seconds`, evenly spread so the last window ends at the end. More than `max_windows`
    windows are thinned to `max_windows` over the same span."""
    span = duration - seconds
    # A second window starting a few milliseconds after the first would see the same sound and frames.
    count = 1 if span < hop / 2 else min(max_windows, 1 + math.ceil(span / hop - 1e-9))
    if count == 1:
        return [None]
    return [float(s) for s in np.linspace(0.0, span, count)]


def _window_wave(wave: np.ndarray, start: float | None, settings: Settings) -> np.ndarray:
    n = round(settings.seconds * settings.sample_rate)
    if start is None:
        return fix_length(wave, n)
    begin = round(start * settings.sample_rate)
    # The sound track may end a little before the video: fix_length pads the last window.
    return fix_length(wave[begin:begin + n], n)


def audio_windows(wave: np.ndarray, starts: list[float | None], settings: Settings, name: str) -> np.ndarray:
    """float32 (W, n_mels, T) log-mels of the windows of a 16 kHz mono wave."""
    mels = np.stack([log_mel(_window_wave(wave, start, settings), settings) for start in starts])
    if not np.isfinite(mels).all():
        raise ClipError(f"non-finite log-mel values from {name}")
    return mels


def frame_windows(path: Path, settings: Settings, hop: float, max_windows: int
                  ) -> tuple[np.ndarray, list[float | None], float, int]:
    """uint8 (W, N, S, S, 3) face crops of the windows of a video (decoded once), the window starts, the video's
    duration and the number of windows in which a face was found (each window finds its own face box)."""
    plan: dict = {}

    def pick(n_total: int, fps: float) -> np.ndarray:
        # The windows depend on the frame count and rate, which only the open video knows.
        plan["duration"] = n_total / fps
        plan["starts"] = window_starts(plan["duration"], settings.seconds, hop, max_windows)
        return np.concatenate([sample_frame_indices(n_total, fps, settings.n_frames, settings.seconds, start)
                               for start in plan["starts"]])

    frames = read_frames_at(path, pick)
    n = settings.n_frames
    crops, found = zip(*(face_crops(frames[i:i + n], settings) for i in range(0, len(frames), n)))
    return np.stack(crops), plan["starts"], plan["duration"], sum(found)


def read_windows(path: Path, settings: Settings, *, audio: bool, frames: bool, hop: float,
                 max_windows: int = 16) -> Windows:
    """The windows of one file with the modalities asked for that it has. A modality that is absent or cannot be
    read is noted and left out (an audio-only mp4, a damaged sound track); ClipError when nothing is left."""
    path = Path(path)
    if path.suffix.lower() not in MEDIA_EXTENSIONS:
        raise ClipError(f"{path.name}: not a supported file type ({', '.join(MEDIA_EXTENSIONS)})")
    notes: list[str] = []
    crops, starts, duration, faces = None, None, 0.0, 0
    if frames and is_video(path):
        try:
            crops, starts, duration, faces = frame_windows(path, settings, hop, max_windows)
        except ClipError as err:
            notes.append(f"no video frames: {err}")
        else:
            if faces < len(crops):
                notes.append(f"no face found in {len(crops) - faces} of {len(crops)} windows: centre crop")
    mels = None
    if audio:
        try:
            wave = read_sound(path, settings)
        except ClipError as err:  # NoSound included: a silent recording is an absent modality
            notes.append(f"no sound: {err}")
        else:
            if starts is None:
                duration = len(wave) / settings.sample_rate
                starts = window_starts(duration, settings.seconds, hop, max_windows)
            mels = audio_windows(wave, starts, settings, path.name)
    if mels is None and crops is None:
        wanted = " or ".join(m for m, on in (("sound", audio), ("video frames", frames)) if on)
        raise ClipError("; ".join(notes) if notes else f"{path.name} has no {wanted}")
    return Windows(path, duration, starts, mels, crops, faces, notes)


def to_batch(windows: Windows, settings: Settings, visual_input: str = "frames", feature_dim: int = 35,
             calibrate: Callable[[str, np.ndarray], np.ndarray] | None = None) -> dict:
    """The batch dict of docs/internals.md for the windows of one file. An absent modality is a zero placeholder
    with `has_*` false (models substitute their learned token); per-clip visual features cannot be computed from a
    file, so with `visual_input="features"` the visual input is always absent. `calibrate(kind, x)`: a person
    calibration of the log-mels and of the frames as pixels in [0, 1] (data.calibration.PersonProfile.calibrate)."""
    w = windows.n_windows
    if windows.logmel is not None:
        logmel = calibrate("logmel", windows.logmel) if calibrate else windows.logmel
        audio = torch.from_numpy(logmel).unsqueeze(1)
    else:
        audio = torch.zeros(w, 1, settings.n_mels, round(settings.seconds * settings.sample_rate) // settings.hop + 1)
    batch = {"audio": audio, "has_audio": torch.full((w,), windows.logmel is not None)}
    if visual_input == "features":
        batch["features"] = torch.zeros(w, feature_dim)
        batch["has_visual"] = torch.zeros(w, dtype=torch.bool)
    elif windows.frames is not None:
        pixels = windows.frames.astype(np.float32) / 255.0
        pixels = calibrate("frames", pixels) if calibrate else pixels
        x = torch.from_numpy(pixels).permute(0, 1, 4, 2, 3)
        batch["frames"] = (x - IMAGENET_MEAN) / IMAGENET_STD
        batch["has_visual"] = torch.ones(w, dtype=torch.bool)
    else:
        batch["frames"] = torch.zeros(w, settings.n_frames, 3, settings.size, settings.size)
        batch["has_visual"] = torch.zeros(w, dtype=torch.bool)
    return batch


def window_inputs(windows: Windows) -> dict[str, np.ndarray]:
    """The raw inputs of a file's windows, for a person profile (data.calibration.add_inputs)."""
    return {kind: x for kind, x in (("logmel", windows.logmel), ("frames", windows.frames)) if x is not None}
