"""Preprocess RAVDESS clips once into a cache, so that an epoch never touches a video or audio file again.

Per clip: the video is decoded once with OpenCV, keeping N frames sampled evenly over a window of SECONDS centred
on the clip (skipped frames are only grabbed, never converted); a Haar cascade finds the face on a few downscaled
frames, the boxes are merged into one box per clip (no face -> centre crop, listed in the summary); every kept
frame is cropped to that box and resized to SxS. The audio comes from the `03-` file when there is one, else from
the `01-` mp4's sound track; it is mixed to mono, resampled to 16 kHz, centre-cropped or padded to the same
SECONDS window and turned into a log-mel spectrogram. Both windows are centred on their own recording, which is
the same take, so the frames and the sound cover the same moment.

Layout (docs/internals.md): `<cache>/manifest.json` (settings, one entry per clip, failures) and
`<cache>/clips/<clip_id>.npz` (`logmel` float32 (64, T), `frames` uint8 (N, S, S, 3) RGB, `meta` = the entry as
JSON). A missing modality is absent from the npz and marked false in the entry, never filled with zeros.

Several processes may prepare one cache at once (parallel folds, two `tune.py`, two notebooks on one Drive
folder): the first takes `<cache>/.prepare.lock` (flock, which Linux also honours across NFS clients) and the others
wait for it, then find the clips done. Each temp file carries its writer's host and pid, and only those of dead
writers are removed. A clip that cannot be written to the cache stops the run with an error naming it.

The script `data/prepare_ravdess.py` is the command-line front end of `prepare_cache`.
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf
import torch
import torchaudio
from tqdm import tqdm

from data.ravdess import Clip, DataError, Discovery, scan
from common.files import atomic_savez, atomic_write_text, remove_stale_temps

try:
    import fcntl
except ImportError:  # Windows: no flock; preparation then relies on the owned temp files alone
    fcntl = None

CACHE_VERSION = 1
# Audio features: fixed by docs/internals.md (models are built for 64 mel bands at 16 kHz, 10 ms hop).
SAMPLE_RATE = 16000  # Hz
N_MELS = 64
N_FFT = 400          # samples (25 ms)
HOP = 160            # samples (10 ms)
LOG_EPS = 1e-6       # log(mel_power + LOG_EPS): finite for digital silence
SILENCE_PEAK = 1e-4  # a recording whose peak amplitude stays below this (-80 dBFS) is treated as having no sound
# Face finding.
FACE_FRAMES = 4      # sampled frames searched for a face
FACE_WIDTH = 256     # px, detection runs on frames downscaled to this width (a RAVDESS face is then ~50 px)
FACE_MARGIN = 1.25   # crop side = FACE_MARGIN x the detected face box side
FRAME_SHORTFALL = 0.05  # a video may end this fraction of its declared frame count early (container rounding)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".webm", ".mkv", ".m4v")  # sound tracks are read with ffmpeg
# Several processes on one cache.
LOCK_NAME = ".prepare.lock"  # file in the cache folder that one preparing process at a time holds (flock)
WAIT_NOTICE_SECONDS = 1.0    # s, a lock held longer than this gets the "waiting for another process" line


class CacheWriteError(DataError):
    """A clip could not be written to the cache (disk full, permissions, a vanished folder): the run stops."""


class ClipError(Exception):
    """This clip cannot be used; the message is the reason shown in the summary."""


class NoSound(ClipError):
    """The recording holds no usable sound (no sound track, zero-length, silent): audio is marked absent."""


@dataclass(frozen=True)
class Settings:
    """Everything that determines the content of a cached clip. A cache is only reused with equal settings."""

    channel: str = "speech"
    modalities: tuple[str, ...] = ("audio", "video")
    n_frames: int = 16
    size: int = 112
    seconds: float = 3.6
    sample_rate: int = SAMPLE_RATE
    n_mels: int = N_MELS
    n_fft: int = N_FFT
    hop: int = HOP
    face_frames: int = FACE_FRAMES
    face_width: int = FACE_WIDTH
    face_margin: float = FACE_MARGIN
    version: int = CACHE_VERSION

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class Summary:
    """What `prepare_cache` did; `str()` gives the closing report."""

    cache_dir: Path
    n_clips: int = 0
    n_new: int = 0
    n_cached: int = 0
    n_audio: int = 0
    n_video: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (clip_id, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)     # (clip_id, what was odd but usable)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0

    @property
    def clips_per_s(self) -> float:
        return self.n_new / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        ok = self.n_clips - len(self.failures)
        lines = [f"cache {self.cache_dir}: {ok} clips ready ({self.n_new} new, {self.n_cached} already cached), "
                 f"{len(self.failures)} failures",
                 f"  audio present {self.n_audio}/{ok}, video present {self.n_video}/{ok}",
                 f"  {self.n_new} clips in {self.seconds:.1f} s: {self.clips_per_s:.1f} clips/s" if self.n_new else
                 f"  nothing new to preprocess ({self.seconds:.1f} s)"]
        for title, rows in (("failures", self.failures), ("notes", self.notes), ("skipped files", self.skipped_files)):
            if rows:
                lines.append(f"{title} ({len(rows)}):")
                lines += [f"  {name}: {why}" for name, why in rows]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- audio

def _ffprobe_audio(path: Path) -> tuple[int, int, float | None] | None:
    """(sample rate, channels, declared duration in s or None) of the first audio stream of `path`, or None when
    it has no sound track."""
    out = _run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
                "stream=sample_rate,channels,duration", "-of", "json", str(path)], path)
    streams = json.loads(out or b"{}").get("streams", [])
    if not streams:
        return None
    duration = streams[0].get("duration")
    return int(streams[0]["sample_rate"]), int(streams[0]["channels"]), float(duration) if duration else None


def _run(cmd: list[str], path: Path) -> bytes:
    if shutil.which(cmd[0]) is None:
        raise ClipError(f"{cmd[0]} is not installed; it is needed to read the sound track of {path.name}")
    proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        reason = lines[-1].replace(f"{path}: ", "") if lines else f"{cmd[0]} failed"
        raise ClipError(f"cannot read {path.name}: {reason}")
    return proc.stdout


def read_audio(path: Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray | None:
    """Mono float32 samples of a wav/flac/mp3 file or a video's sound track at `sample_rate`; None if the video
    has none."""
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        info = _ffprobe_audio(path)
        if info is None:
            return None
        rate, channels, duration = info
        raw = _run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-map", "0:a:0", "-f", "f32le", "pipe:1"],
                   path)
        samples = np.frombuffer(raw, dtype=np.float32)
        samples = samples[: len(samples) // channels * channels].reshape(-1, channels)
        # ffmpeg decodes a cut-off file without an error: compare with the duration the container declares.
        if duration and len(samples) < 0.9 * duration * rate:
            raise ClipError(f"sound track of {path.name} ends after {len(samples) / rate:.2f} of {duration:.2f} s "
                            f"(truncated or corrupt)")
    else:
        try:
            samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
        except Exception as e:  # libsndfile raises several types for corrupt, truncated or empty files
            raise ClipError(f"cannot read {path.name}: {e}") from None
    mono = samples.mean(axis=1)
    if rate != sample_rate and len(mono):
        mono = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(mono)), rate, sample_rate).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)


def fix_length(wave: np.ndarray, n: int) -> np.ndarray:
    """Centre-crop or zero-pad (evenly on both sides) `wave` to exactly n samples."""
    if len(wave) >= n:
        start = (len(wave) - n) // 2
        return wave[start:start + n]
    left = (n - len(wave)) // 2
    return np.pad(wave, (left, n - len(wave) - left))


@lru_cache(maxsize=4)
def _mel_transform(sample_rate: int, n_fft: int, hop: int, n_mels: int) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels,
                                                power=2.0)


def log_mel(wave: np.ndarray, settings: Settings = Settings(), eps: float = LOG_EPS) -> np.ndarray:
    """float32 (n_mels, T) = log(mel power + eps) of a 16 kHz mono wave already cut to the clip window.
    (`eps=0` is the legacy pipeline of issue 12: -inf wherever the window is digital silence or zero padding.)"""
    mel = _mel_transform(settings.sample_rate, settings.n_fft, settings.hop, settings.n_mels)
    with torch.no_grad():
        power = mel(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)))
    return torch.log(power + eps).numpy().astype(np.float32)


def read_sound(path: Path, settings: Settings) -> np.ndarray:
    """The whole recording as mono samples at `settings.sample_rate`; NoSound when it has no usable sound."""
    wave = read_audio(path, settings.sample_rate)
    if wave is None:
        raise NoSound(f"{path.name} has no sound track")
    if len(wave) == 0:
        raise NoSound(f"{path.name} has no samples (zero-length audio)")
    if np.abs(wave).max() < SILENCE_PEAK:
        raise NoSound(f"{path.name} is silent (peak below {SILENCE_PEAK})")
    return wave


def audio_features(path: Path, settings: Settings) -> np.ndarray:
    """The cached log-mel of one recording; ClipError when it has no usable sound."""
    wave = read_sound(path, settings)
    mel = log_mel(fix_length(wave, round(settings.seconds * settings.sample_rate)), settings)
    if not np.isfinite(mel).all():
        raise ClipError(f"non-finite log-mel values from {path.name}")
    return mel


# ------------------------------------------------------------------------------------------------------- video

def sample_frame_indices(n_total: int, fps: float, n: int, seconds: float, start: float | None = None) -> np.ndarray:
    """Indices of n frames at the centres of n equal segments of a window of `seconds` centred on the video, or
    beginning at `start` seconds (the sliding windows of predict.py)."""
    duration = n_total / fps
    window = min(seconds, duration)
    start = (duration - window) / 2 if start is None else start
    times = start + (np.arange(n) + 0.5) * window / n
    return np.clip(np.floor(times * fps).astype(int), 0, n_total - 1)


def read_frames(path: Path, n: int, seconds: float) -> list[np.ndarray]:
    """n BGR frames of the video sampled by `sample_frame_indices`, decoding it once (see `read_frames_at`)."""
    return read_frames_at(path, lambda n_total, fps: sample_frame_indices(n_total, fps, n, seconds))


def read_frames_at(path: Path, pick: Callable[[int, float], np.ndarray]) -> list[np.ndarray]:
    """Decode the video once and return the BGR frames at the indices `pick(frame_count, fps)` chooses. Frames
    that are not wanted are only grabbed (decoded, never converted to BGR), and decoding stops after the last
    wanted frame."""
    # Decoder threads follow OpenCV's thread setting: one in a worker process (one process per core, where frame
    # threading only adds overhead), all cores when a single process reads a video.
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, cv2.getNumThreads()])
    try:
        if not cap.isOpened():
            raise ClipError(f"cannot open video {path.name} (corrupt, truncated or not a video)")
        n_total, fps = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), cap.get(cv2.CAP_PROP_FPS)
        if n_total <= 0 or not fps > 0:
            raise ClipError(f"video {path.name} reports {n_total} frames at {fps} fps")
        indices = pick(n_total, fps)
        wanted = set(int(i) for i in indices)
        got: dict[int, np.ndarray] = {}
        n_read = 0
        for i in range(max(wanted) + 1):
            if not cap.grab():
                break
            n_read += 1
            if i in wanted:
                ok, frame = cap.retrieve()
                if not ok:
                    break
                got[i] = frame
    finally:
        cap.release()
    missing = [i for i in indices if i not in got]
    if missing:
        # Containers may declare a frame or two more than they hold; a video cut short is an error.
        if not got or n_total - n_read > FRAME_SHORTFALL * n_total:
            raise ClipError(f"video {path.name} ended after {n_read} of {n_total} frames (truncated or corrupt)")
        last = got[max(got)]
        return [got.get(int(i), last) for i in indices]
    return [got[int(i)] for i in indices]


@lru_cache(maxsize=1)
def _face_cascade() -> cv2.CascadeClassifier:
    cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))
    if cascade.empty():
        raise DataError("OpenCV's Haar face cascade could not be loaded (broken opencv install?)")
    return cascade


def find_face(frames: Sequence[np.ndarray], settings: Settings = Settings()) -> tuple[int, int, int] | None:
    """One face box (centre x, centre y, side) for the clip, in full-resolution pixels, or None if no face.

    Detection runs on `face_frames` evenly spread frames downscaled to `face_width`; the largest face of each is
    kept and the median box is taken, so one missed or wrong frame does not move the crop. Once a face is found,
    later frames are searched only around it and at nearby sizes, which costs a fraction of a full search.
    """
    h, w = frames[0].shape[:2]
    scale = min(1.0, settings.face_width / w)
    picks = np.unique(np.linspace(0, len(frames) - 1, min(settings.face_frames, len(frames))).round().astype(int))
    boxes: list[tuple[float, float, float]] = []  # (cx, cy, side) in downscaled pixels
    for i in picks:
        small = cv2.resize(frames[i], None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 \
            else frames[i]
        gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY))
        box = _detect_near(gray, np.median(boxes, axis=0)) if boxes else None
        box = box or _detect(gray, 0, 0, max(20, gray.shape[0] // 6), gray.shape[0])
        if box:
            boxes.append(box)
    if not boxes:
        return None
    cx, cy, side = np.median(boxes, axis=0) / scale
    return int(round(cx)), int(round(cy)), int(round(side))


def _detect(gray: np.ndarray, x0: int, y0: int, min_side: int, max_side: int) -> tuple[float, float, float] | None:
    """The largest face in `gray` as (cx, cy, side), offset by (x0, y0); None if there is none."""
    found = _face_cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side),
                                             maxSize=(max_side, max_side))
    if not len(found):
        return None
    x, y, bw, bh = max(found, key=lambda b: b[2] * b[3])
    return x0 + x + bw / 2, y0 + y + bh / 2, float(max(bw, bh))


def _detect_near(gray: np.ndarray, box: np.ndarray) -> tuple[float, float, float] | None:
    """A face of 0.8-1.25 times the size of `box`, in a window of 1.5 box sides around it (a seated speaker
    moves little within a clip)."""
    cx, cy, side = box
    x0, y0 = max(0, int(cx - 0.75 * side)), max(0, int(cy - 0.75 * side))
    x1, y1 = min(gray.shape[1], int(cx + 0.75 * side)), min(gray.shape[0], int(cy + 0.75 * side))
    return _detect(gray[y0:y1, x0:x1], x0, y0, max(20, int(0.8 * side)), int(1.25 * side) + 1)


def crop_box(shape: tuple[int, ...], face: tuple[int, int, int] | None, margin: float) -> tuple[int, int, int]:
    """(x0, y0, side) of the square crop: the face box times `margin`, shifted (not shrunk) to stay inside the
    frame; the centre square when there is no face."""
    h, w = shape[:2]
    if face is None:
        side = min(h, w)
        return (w - side) // 2, (h - side) // 2, side
    cx, cy, face_side = face
    side = min(int(round(face_side * margin)), h, w)
    x0 = min(max(cx - side // 2, 0), w - side)
    y0 = min(max(cy - side // 2, 0), h - side)
    return x0, y0, side


def video_features(path: Path, settings: Settings) -> tuple[np.ndarray, bool]:
    """uint8 (N, S, S, 3) RGB face crops of one video, and whether a face was found."""
    return face_crops(read_frames(path, settings.n_frames, settings.seconds), settings)


def face_crops(frames: Sequence[np.ndarray], settings: Settings) -> tuple[np.ndarray, bool]:
    """uint8 (N, S, S, 3) RGB crops of the BGR frames of one clip around its face box, and whether a face was
    found."""
    face = find_face(frames, settings)
    x0, y0, side = crop_box(frames[0].shape, face, settings.face_margin)
    crops = [cv2.resize(f[y0:y0 + side, x0:x0 + side], (settings.size, settings.size), interpolation=cv2.INTER_AREA)
             for f in frames]
    return np.stack([cv2.cvtColor(c, cv2.COLOR_BGR2RGB) for c in crops]), face is not None


# -------------------------------------------------------------------------------------------------------- clips

def _relative(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def clip_entry(clip: Clip, root: Path, settings: Settings) -> dict:
    """The manifest entry of a clip before processing: identity, label and the sources it will be read from."""
    audio = clip.audio_source if "audio" in settings.modalities else None
    video = clip.video_source if "video" in settings.modalities else None
    return {"clip_id": clip.clip_id, "actor": clip.actor, "emotion": clip.emotion, "label": clip.label,
            "vocal_channel": clip.vocal_channel, "intensity": clip.intensity, "statement": clip.statement,
            "repetition": clip.repetition, "audio_source": _relative(audio, root),
            "video_source": _relative(video, root), "has_audio": False, "has_video": False, "face_found": None,
            "notes": []}


def process_clip(clip: Clip, root: Path, settings: Settings) -> tuple[dict, dict[str, np.ndarray]]:
    """The manifest entry and arrays of one clip. A modality whose source has no usable content (no sound track,
    zero-length or silent audio) or cannot be read (a corrupt or truncated file) is left out and noted, so a
    broken mp4 does not cost the take its good wav; a clip with nothing usable raises ClipError."""
    entry = clip_entry(clip, root, settings)
    arrays: dict[str, np.ndarray] = {}
    failures: list[ClipError] = []
    audio = clip.audio_source if "audio" in settings.modalities else None
    video = clip.video_source if "video" in settings.modalities else None
    if audio is not None:
        try:
            arrays["logmel"] = audio_features(audio, settings)
            entry["has_audio"] = True
        except ClipError as e:  # NoSound included
            failures.append(e)
            entry["notes"].append(f"audio absent: {e}")
    if video is not None:
        try:
            arrays["frames"], entry["face_found"] = video_features(video, settings)
            entry["has_video"] = True
        except ClipError as e:
            failures.append(e)
            entry["notes"].append(f"video absent: {e}")
        if entry["face_found"] is False:
            entry["notes"].append("no face found: centre crop")
    if not arrays and len(failures) == 1:  # the take's only source: its own error says it all
        raise failures[0]
    if not arrays:
        wanted = " or ".join(settings.modalities)
        reasons = "; ".join(entry["notes"]) or f"no {wanted} file for this take"
        raise ClipError(f"no usable {wanted}: {reasons}")
    return entry, arrays


def write_clip(clips_dir: Path, entry: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write `<clip_id>.npz` atomically: the writer's own temp name first, then a rename, so an interrupted run
    leaves no half-written file that a rerun would take as finished (its temp file goes on a later run)."""
    atomic_savez(clips_dir / f"{entry['clip_id']}.npz", meta=np.array(json.dumps(entry)), **arrays)


def read_meta(npz_path: Path) -> dict | None:
    """The entry stored in a cached clip, or None if the file is unreadable."""
    try:
        with np.load(npz_path) as z:
            return json.loads(str(z["meta"]))
    except Exception:  # a damaged file is simply redone
        return None


def write_manifest(cache_dir: Path, settings: Settings, entries: list[dict], failures: list[tuple[str, str]],
                   complete: bool, root: Path | None = None) -> None:
    """Atomically write `<cache>/manifest.json`. `complete` is false while a run is going on or was interrupted."""
    manifest = {"version": CACHE_VERSION, "settings": settings.to_json(), "root": str(root) if root else None,
                "complete": complete, "clips": sorted(entries, key=lambda e: e["clip_id"]),
                "failures": [{"clip_id": c, "reason": r} for c, r in failures]}
    atomic_write_text(cache_dir / "manifest.json", json.dumps(manifest, indent=1))


_VIDEO_SETTINGS = ("n_frames", "size", "face_frames", "face_width", "face_margin")


def _is_complete(cache_dir: Path) -> bool:
    try:
        return bool(json.loads((cache_dir / "manifest.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def _check_settings(cache_dir: Path, settings: Settings) -> None:
    path = cache_dir / "manifest.json"
    if not path.exists():
        return
    try:
        manifest = json.loads(path.read_text())
        old = manifest["settings"]
    except (ValueError, KeyError):
        raise DataError(f"{path} is not a cache manifest; use an empty folder for the cache") from None
    new = settings.to_json()
    # Frame and face settings do not matter to a cache that holds no video (e.g. the audio-only FLACs).
    ignored = _VIDEO_SETTINGS if not any(e.get("has_video") for e in manifest.get("clips", [])) else ()
    changed = [f"{k}: {old.get(k)} -> {new[k]}" for k in new if old.get(k) != new[k] and k not in ignored]
    if changed:
        raise DataError(f"cache {cache_dir} was made with other settings ({', '.join(changed)}); "
                        f"use another cache folder or delete this one")


def _worker_init() -> None:
    # Each worker is one process on one core: library thread pools would only fight over the same cores (on a
    # busy machine torch's spinning threads make a 50 us op on a small spectrogram take 50 ms).
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _start_worker(parent_pid: int) -> None:
    """Initializer of a pool worker: one thread per library, and a watch that ends the worker when its parent is
    gone. A parent killed with kill -9 cannot stop its pool, and orphaned workers would go on writing to the
    cache."""
    _worker_init()

    def exit_with_parent() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, name="exit-with-parent", daemon=True).start()


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run the block with one torch and one OpenCV thread, then restore the caller's settings."""
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    _worker_init()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)


_held_locks: set[str] = set()  # lock files this process holds (cache_lock is re-entrant within a process)


@contextmanager
def cache_lock(cache_dir: Path, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the preparation lock of `cache_dir` for the block; another process that holds it is waited for, with
    one line saying so. Re-entrant in one process (data/setup.py holds it around generating the synthetic set and
    preparing its cache). Where the file system has no locks, preparation goes on unlocked: the owned temp files
    still keep each process's writes safe, only the work may be done twice."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = str((cache_dir / LOCK_NAME).resolve())
    if path in _held_locks:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _acquire(fd, cache_dir, log)
        _held_locks.add(path)
        try:
            yield
        finally:
            _held_locks.discard(path)
    finally:
        os.close(fd)  # releases the lock


def _acquire(fd: int, cache_dir: Path, log: Callable[[str], None]) -> None:
    if fcntl is None:
        return
    deadline = time.monotonic() + WAIT_NOTICE_SECONDS
    try:
        # Poll briefly before saying anything: parallel folds on a finished cache each hold it for a moment.
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        log(f"waiting for another process to finish preparing {cache_dir} ...")
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        log(f"note: {cache_dir} does not support file locks ({e.strerror}); preparing without one")


def _process_one(clip: Clip, root: Path, settings: Settings, clips_dir: Path) -> tuple[str, dict | str]:
    """Worker body: ('ok', entry), ('failed', reason) for a clip whose input files are unusable, or
    ('write_failed', reason) when the cache itself could not take the clip. Never raises."""
    try:
        entry, arrays = process_clip(clip, root, settings)
    except ClipError as e:
        return "failed", str(e)
    except Exception as e:  # an unexpected decoder error must not stop the other 1199 clips
        return "failed", f"{type(e).__name__}: {e}"
    try:
        write_clip(clips_dir, entry, arrays)
    except Exception as e:  # disk full, permissions, a folder removed under us: the cache is broken, not the clip
        return "write_failed", f"{type(e).__name__}: {e}"
    return "ok", entry


def prepare_cache(root: str | os.PathLike, cache_dir: str | os.PathLike, *, channel: str = "speech",
                  modalities: Sequence[str] = ("audio", "video"), n_frames: int = 16, size: int = 112,
                  seconds: float = 3.6, workers: int | None = None, progress: bool = True,
                  log: Callable[[str], None] = print) -> Summary:
    """Preprocess every clip under `root` into `cache_dir`; return the summary (also logged).

    Resumable: clips already in the cache from the same sources with the same settings are skipped, failed clips
    are retried. `workers` processes (default: one per CPU; 0 or 1 runs in this process). Safe for several
    processes at once: they take turns (`cache_lock`). Raises DataError for user mistakes (missing root, no
    RAVDESS files, a cache made with other settings) and CacheWriteError, naming the clip, when a clip cannot be
    written (the manifest then stays incomplete, and a rerun redoes what is missing).
    """
    modalities = tuple(modalities)
    unknown = set(modalities) - {"audio", "video"}
    if unknown or not modalities:
        raise DataError(f"modalities must be a non-empty subset of ('audio', 'video'), got {modalities}")
    settings = Settings(channel=channel, modalities=modalities, n_frames=n_frames, size=size, seconds=seconds)
    start = time.perf_counter()
    root, cache_dir = Path(root).expanduser(), Path(cache_dir).expanduser()
    found = scan(root, channel)
    with cache_lock(cache_dir, log):
        return _prepare_locked(found, root, cache_dir, settings, workers, progress, log, start)


def _prepare_locked(found: Discovery, root: Path, cache_dir: Path, settings: Settings, workers: int | None,
                    progress: bool, log: Callable[[str], None], start: float) -> Summary:
    """`prepare_cache` once this process holds the cache's lock."""
    summary = Summary(cache_dir, n_clips=len(found.clips),
                      skipped_files=[(str(p), why) for p, why in found.skipped])
    clips_dir = cache_dir / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(cache_dir, settings)
    remove_stale_temps(clips_dir)  # left by killed runs; a live writer's (another machine's, unlocked) stays

    entries, todo = [], []
    for clip in found.clips:
        meta = read_meta(clips_dir / f"{clip.clip_id}.npz") if (clips_dir / f"{clip.clip_id}.npz").exists() else None
        fresh = clip_entry(clip, root, settings)
        if meta and (meta["audio_source"], meta["video_source"]) == (fresh["audio_source"], fresh["video_source"]):
            entries.append(meta)
        else:
            todo.append(clip)
    summary.n_cached = len(entries)
    # A finished cache is left untouched when nothing changed, so that several training processes (one per fold)
    # can start on it at once without one seeing the other's "incomplete" manifest.
    finished = not todo and _is_complete(cache_dir)
    if not finished:
        write_manifest(cache_dir, settings, entries, [], complete=False, root=root)

    results = _run_all(todo, root, settings, clips_dir, workers, progress)  # CacheWriteError stops the run here
    for clip, (status, result) in zip(todo, results):
        if status == "ok":
            entries.append(result)
        else:
            summary.failures.append((clip.clip_id, result))
    summary.n_new = len(todo) - len(summary.failures)
    summary.notes = [(e["clip_id"], note) for e in sorted(entries, key=lambda e: e["clip_id"]) for note in e["notes"]]
    summary.n_audio = sum(e["has_audio"] for e in entries)
    summary.n_video = sum(e["has_video"] for e in entries)
    if not finished:
        write_manifest(cache_dir, settings, entries, summary.failures, complete=True, root=root)
    summary.seconds = time.perf_counter() - start
    log(str(summary))
    return summary


def _run_all(todo: list[Clip], root: Path, settings: Settings, clips_dir: Path, workers: int | None,
             progress: bool) -> list[tuple[str, dict | str]]:
    """Results in the order of `todo`, computed in worker processes with a progress bar."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    bar = tqdm(total=len(todo), desc="preprocessing", unit="clip", disable=not progress or not todo)
    results: list[tuple[str, dict | str] | None] = [None] * len(todo)
    try:
        if workers <= 1 or len(todo) <= 1:
            with single_threaded():
                for i, clip in enumerate(todo):
                    results[i] = _check_written(clip, _process_one(clip, root, settings, clips_dir), clips_dir)
                    bar.update()
        else:
            # spawn, not fork: forking a parent whose torch/OpenMP threads are running can deadlock the children.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context, initializer=_start_worker,
                                     initargs=(os.getpid(),)) as pool:
                futures = {pool.submit(_process_one, clip, root, settings, clips_dir): i
                           for i, clip in enumerate(todo)}
                try:
                    for future in as_completed(futures):
                        i = futures[future]
                        results[i] = _check_written(todo[i], future.result(), clips_dir)
                        bar.update()
                except CacheWriteError:
                    pool.shutdown(wait=True, cancel_futures=True)  # the clips not started would fail alike
                    raise
    finally:
        bar.close()
    return results


def _check_written(clip: Clip, result: tuple[str, dict | str], clips_dir: Path) -> tuple[str, dict | str]:
    """The result of a clip, or CacheWriteError naming it when the cache could not take it."""
    if result[0] == "write_failed":
        raise CacheWriteError(f"could not write clip {clip.clip_id} to {clips_dir}: {result[1]}; the cache is "
                              f"incomplete (free space or fix the folder, then rerun: finished clips are kept)")
    return result
