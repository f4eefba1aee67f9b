"""A synthetic stand-in for RAVDESS in the real file format, for tests and for a quick start without the dataset.

`make_synthetic_ravdess(root)` writes `Actor_XX/01-01-EE-II-SS-RR-AA.mp4` (video + AAC sound track),
`02-...mp4` (video only) and `03-...wav` (48 kHz, 16-bit) whose content depends on the emotion:
- video: a drawn face whose brows (height, slant) and mouth (curve, opening, width) follow the emotion, the
  expression building up over the first half of the clip; per actor the face position, size, skin and hair
  colour, background and a resting-face bias change; per take small head motion, lighting and pixel noise;
- audio: a harmonic voice whose pitch level and contour, syllable rate, vibrato, brightness and loudness follow the
  emotion; per actor the base pitch (lower for odd, male, actors), speaking rate and timbre; per take noise.
Neutral and calm are close, as in RAVDESS, and intensity 01 shows half-strength expressions, so a model has to
learn the classes rather than read them off one pixel.

`make_synthetic_cache(cache_dir)` renders the same content straight into a preprocessed cache (no mp4), for tests
of models and training that need many clips fast; the real path (mp4 -> prepare_cache -> cache) is what
tests/test_preprocess.py covers.

    python -c "from data.synthetic import make_synthetic_ravdess as m; m('synthetic_ravdess')"
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf

from data.preprocess import Settings, fix_length, log_mel, single_threaded, write_clip, write_manifest
from data.ravdess import DataError

# Expression per emotion 1-8: brow raise, brow slant (+ inner ends up), mouth curve (+ smile), mouth opening,
# mouth width (relative), mouth asymmetry. Neutral is all zeros; calm is a faint smile.
_FACE = {
    1: (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    2: (0.0, 0.1, 0.3, 0.0, -0.05, 0.0),
    3: (0.15, 0.0, 1.0, 0.3, 0.25, 0.0),
    4: (0.2, 0.9, -0.8, 0.0, -0.1, 0.0),
    5: (-0.6, -1.0, -0.3, 0.15, -0.15, 0.0),
    6: (0.7, 0.6, -0.4, 0.5, 0.0, 0.0),
    7: (-0.4, -0.3, -0.5, 0.1, -0.05, 0.6),
    8: (1.0, 0.0, 0.0, 0.9, -0.3, 0.0),
}
# Voice per emotion 1-8: pitch factor, pitch slope (per clip), syllables/s, vibrato depth, brightness, gain in dB,
# breathiness (noise within the voice, relative to it).
_VOICE = {
    1: (1.00, 0.00, 3.0, 0.00, 0.55, 0.0, 0.05),
    2: (0.95, -0.08, 2.4, 0.00, 0.45, -3.0, 0.15),
    3: (1.25, 0.25, 4.0, 0.02, 0.70, 3.0, 0.05),
    4: (0.85, -0.30, 2.0, 0.015, 0.35, -6.0, 0.25),
    5: (1.15, -0.10, 4.5, 0.00, 0.85, 7.0, 0.10),
    6: (1.35, 0.10, 5.0, 0.07, 0.60, 0.0, 0.30),
    7: (0.90, -0.20, 2.6, 0.03, 0.50, -1.0, 0.20),
    8: (1.40, 0.50, 3.4, 0.01, 0.65, 3.0, 0.05),
}
_SKIN = ((170, 195, 235), (140, 170, 220), (110, 145, 195), (90, 120, 170))  # BGR
_HAIR = ((30, 30, 40), (40, 60, 90), (20, 20, 20), (70, 100, 140))
FILE_KINDS = ("av", "video", "audio")  # 01- mp4 with sound, 02- mp4 without, 03- wav


@dataclass(frozen=True)
class Take:
    actor: int
    emotion: int
    intensity: int
    statement: int
    repetition: int

    def name(self, modality: int) -> str:
        return (f"{modality:02d}-01-{self.emotion:02d}-{self.intensity:02d}-{self.statement:02d}-"
                f"{self.repetition:02d}-{self.actor:02d}")


def takes_for(actors: Iterable[int], emotions: Iterable[int] = range(1, 9), takes: int = 2) -> list[Take]:
    """The first `takes` valid RAVDESS takes of each actor and emotion, intensity varying fastest (so two takes
    give a normal and a strong one), then statement, then repetition; neutral has no strong intensity."""
    out = []
    for actor in actors:
        for emotion in emotions:
            combos = [(i, s, r) for r in (1, 2) for s in (1, 2) for i in (1, 2) if not (emotion == 1 and i == 2)]
            out += [Take(actor, emotion, *c) for c in combos[:takes]]
    return out


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _actor_style(seed: int, actor: int) -> dict:
    r = _rng(seed, actor)
    return {"cx": r.uniform(-0.12, 0.12), "cy": r.uniform(-0.08, 0.08), "radius": r.uniform(0.26, 0.36),
            "skin": _SKIN[r.integers(len(_SKIN))], "hair": _HAIR[r.integers(len(_HAIR))],
            "background": tuple(int(v) for v in r.integers(60, 150, 3)),
            "bias": r.normal(0, 0.15, 6),  # resting face: some actors look a little sad or surprised at rest
            "f0": r.uniform(95, 140) if actor % 2 else r.uniform(170, 240),
            "rate": r.uniform(0.9, 1.1), "timbre": r.uniform(-0.08, 0.08)}


def _take_style(seed: int, take: Take) -> dict:
    r = _rng(seed, take.actor, take.emotion, take.intensity, take.statement, take.repetition, 1)
    strength = (0.55 if take.intensity == 1 else 1.0) * r.uniform(0.8, 1.15)
    return {"strength": strength, "phase": r.uniform(0, 2 * np.pi), "light": r.uniform(0.85, 1.15),
            "noise": r.uniform(4, 10), "snr_db": r.uniform(12, 25), "onset": r.uniform(0.3, 0.5),
            "rng": r}


def _expression(take: Take, actor: dict, style: dict, progress: float) -> np.ndarray:
    """Expression parameters at `progress` (0-1) through the clip: they build up to full strength by the onset."""
    ramp = min(1.0, progress / style["onset"])
    return actor["bias"] + np.array(_FACE[take.emotion]) * style["strength"] * ramp


def draw_face(canvas: np.ndarray, cx: float, cy: float, r: float, skin: tuple, hair: tuple,
              expression: Sequence[float]) -> None:
    """Draw a frontal cartoon face (Haar-detectable) of radius r on a BGR canvas, in place."""
    brow, slant, curve, opening, width, asym = expression
    cx, cy, line = int(cx), int(cy), max(1, int(0.06 * r))
    aa = cv2.LINE_AA
    cv2.ellipse(canvas, (cx, int(cy - 0.1 * r)), (int(0.85 * r), int(1.05 * r)), 0, 0, 360, hair, -1, aa)
    cv2.ellipse(canvas, (cx, cy), (int(0.75 * r), int(r)), 0, 0, 360, skin, -1, aa)
    eye_y, eye_dx = int(cy - 0.15 * r), int(0.32 * r)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        cv2.ellipse(canvas, (ex, eye_y), (int(0.14 * r), int((0.07 + 0.03 * max(brow, 0)) * r)), 0, 0, 360,
                    (245, 245, 245), -1, aa)
        cv2.circle(canvas, (ex, eye_y), max(1, int(0.06 * r)), (40, 30, 20), -1, aa)
        brow_y = eye_y - (0.22 + 0.12 * brow) * r
        inner = (cx + side * int(0.12 * r), int(brow_y - 0.12 * slant * r))
        outer = (cx + side * int(0.5 * r), int(brow_y + 0.02 * r))
        cv2.line(canvas, inner, outer, hair, line, aa)
    shade = tuple(int(c * 0.7) for c in skin)
    cv2.line(canvas, (cx, eye_y + int(0.05 * r)), (cx - int(0.06 * r), cy + int(0.25 * r)), shade,
             max(1, int(0.03 * r)), aa)
    mouth_y, half = cy + 0.5 * r, 0.3 * r * (1 + width)
    xs = np.linspace(-1, 1, 21)
    ys = mouth_y - curve * 0.15 * r * (xs ** 2 - 0.5) + asym * 0.08 * r * xs
    if opening > 0.05:
        cv2.ellipse(canvas, (cx, int(mouth_y)), (int(half * 0.8), max(1, int(opening * 0.2 * r))), 0, 0, 360,
                    (40, 20, 60), -1, aa)
    cv2.polylines(canvas, [np.stack([cx + xs * half, ys], 1).astype(np.int32)], False, (60, 40, 120), line, aa)


def render_frames(take: Take, width: int, height: int, n_frames: int, fps: float, seed: int = 0,
                  crop: bool = False) -> Iterator[np.ndarray]:
    """BGR frames of one take; with crop=True the face fills a square frame, as after face cropping."""
    actor, style = _actor_style(seed, take.actor), _take_style(seed, take)
    side = min(width, height)
    base_cx = width / 2 if crop else width / 2 + actor["cx"] * width
    base_cy = height / 2 if crop else height / 2 + actor["cy"] * height
    radius = side * (0.4 if crop else actor["radius"])
    # Pixel noise stored around 128 in uint8, so that lighting + noise is one saturating OpenCV call per frame.
    noise = np.clip(style["rng"].normal(128, style["noise"], (height, width, 3)), 0, 255).astype(np.uint8)
    background = np.empty((height, width, 3), np.uint8)
    background[:] = actor["background"]
    for i in range(n_frames):
        t = i / fps
        wobble = 0.015 * side
        frame = background.copy()
        draw_face(frame, base_cx + wobble * np.sin(1.7 * t + style["phase"]),
                  base_cy + wobble * np.sin(1.1 * t + 2 * style["phase"]), radius, actor["skin"], actor["hair"],
                  _expression(take, actor, style, i / max(1, n_frames - 1)))
        # The noise field drifts sideways so it is not a fixed pattern that a model could key on.
        yield cv2.addWeighted(frame, style["light"], np.roll(noise, 3 * i, axis=1), 1.0, -128.0)


def render_audio(take: Take, seconds: float, sample_rate: int, seed: int = 0) -> np.ndarray:
    """float32 mono voice of one take in [-1, 1]: silence, then 'speech' from ~15% to ~85% of the clip."""
    actor, style = _actor_style(seed, take.actor), _take_style(seed, take)
    pitch, slope, rate, vibrato, bright, gain_db, breath = (np.array(_VOICE[1]) + style["strength"] *
                                                            (np.array(_VOICE[take.emotion]) - np.array(_VOICE[1])))
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    rng = style["rng"]
    on, off = seconds * rng.uniform(0.1, 0.2), seconds * rng.uniform(0.8, 0.9)
    u = np.clip((t - on) / (off - on), 0, 1)
    f0 = actor["f0"] * pitch * (1 + slope * (u - 0.5)) * (1 + vibrato * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    # Harmonics 1..K with amplitudes decay**k, K kept below Nyquist: the geometric series in closed form,
    # sum_k (d z)**k = d z (1 - (d z)**K) / (1 - d z) with z = exp(i phase), instead of K sine evaluations.
    decay = np.clip(bright + actor["timbre"], 0.2, 0.9)
    n_harmonics = int(min(12, 0.45 * sample_rate // f0.max()))
    dz = decay * np.exp(1j * phase)
    voice = np.imag(dz * (1 - dz ** n_harmonics) / (1 - dz))
    # Syllables: the statement fixes the rhythm pattern, the emotion and the actor the rate.
    beats = np.abs(np.sin(np.pi * rate * actor["rate"] * (t - on) + 0.7 * take.statement)) ** 1.5
    envelope = beats * ((t > on) & (t < off))
    voice = voice / (np.abs(voice).max() + 1e-9) + breath * rng.normal(0, 0.3, n)
    voice = voice * envelope
    voice *= 10 ** (gain_db / 20) * 0.25 / (np.abs(voice).max() + 1e-9)
    rms = np.sqrt(np.mean(voice[envelope > 0] ** 2)) if (envelope > 0).any() else 0.01
    voice += rng.normal(0, rms * 10 ** (-style["snr_db"] / 20), n)
    return np.clip(voice, -1, 1).astype(np.float32)


def _ffmpeg_mux(jobs: list[tuple[Path, Path | None, Path]], codec: str) -> None:
    """One ffmpeg run for many outputs (process start-up dominates for tiny clips): each job is
    (video input, wav input or None, mp4 output)."""
    args, n_inputs = ["ffmpeg", "-v", "error", "-y", "-nostdin"], 0
    outputs: list[str] = []
    video_codec = ["-c:v", "copy"] if codec == "copy" else \
        ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]
    for video, wav, out in jobs:
        args += ["-i", str(video)]
        outputs += ["-map", f"{n_inputs}:v:0", *video_codec]
        n_inputs += 1
        if wav is not None:
            args += ["-i", str(wav)]
            outputs += ["-map", f"{n_inputs}:a:0", "-c:a", "aac", "-aac_coder", "fast", "-b:a", "96k", "-shortest"]
            n_inputs += 1
        outputs.append(str(out))
    proc = subprocess.run(args + outputs, capture_output=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise DataError(f"ffmpeg could not write the synthetic mp4 files: {proc.stderr.decode()[-500:]}")


def _write_actor(root: Path, takes: list[Take], files: tuple[str, ...], width: int, height: int, fps: float,
                 seconds: float, sample_rate: int, codec: str, seed: int) -> list[Path]:
    folder = root / f"Actor_{takes[0].actor:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    outputs, jobs = [], []  # every file is written in this call's own temp folder, then renamed into place
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp") as tmp_dir:
        tmp = Path(tmp_dir)
        for take in takes:
            wav = tmp / f"{take.name(3)}.wav"
            sf.write(wav, render_audio(take, seconds, sample_rate, seed), sample_rate, subtype="PCM_16")
            if "audio" in files:
                outputs.append(wav)
            if "av" in files or "video" in files:
                # OpenCV's MPEG-4 output is already a valid video-only mp4: the 02- file itself unless re-encoded.
                keep_raw = "video" in files and codec == "copy"
                raw = tmp / (f"{take.name(2)}.mp4" if keep_raw else f"raw-{take.name(2)}.mp4")
                writer = cv2.VideoWriter(str(raw), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
                for frame in render_frames(take, width, height, int(round(seconds * fps)), fps, seed):
                    writer.write(frame)
                writer.release()
                if keep_raw:
                    outputs.append(raw)
                elif "video" in files:
                    jobs.append((raw, None, tmp / f"{take.name(2)}.mp4"))
                if "av" in files:
                    jobs.append((raw, wav, tmp / f"{take.name(1)}.mp4"))
        if jobs:
            _ffmpeg_mux(jobs, codec)
            outputs += [out for _, _, out in jobs]
        # Renamed only once complete: another process reading or writing the same folder never meets a half-written
        # mp4 (two writers at once used to break each other's files: "moov atom not found").
        written = [folder / out.name for out in outputs]
        for out, final in zip(outputs, written):
            os.replace(out, final)
    return written


def make_synthetic_ravdess(root: str | os.PathLike, actors: Sequence[int] = (1, 2, 3, 4), takes: int = 2,
                           emotions: Sequence[int] = range(1, 9), width: int = 160, height: int = 120,
                           fps: float = 15.0, seconds: float = 2.0, sample_rate: int = 48000,
                           files: Sequence[str] = FILE_KINDS, codec: str = "copy", seed: int = 0,
                           workers: int = 2) -> list[Path]:
    """Write a synthetic RAVDESS under `root` (`Actor_XX/` folders) and return the files written.

    `files` picks the kinds: 'av' (01- mp4 with sound), 'video' (02- mp4 without), 'audio' (03- wav).
    `codec` 'copy' keeps OpenCV's MPEG-4 part 2 (fast, for tests); 'libx264' encodes H.264 like the real files.
    The default (4 actors x 8 emotions x 2 takes at 160x120, 2 s) takes a few seconds. Needs ffmpeg for mp4.
    """
    files = tuple(files)
    if not files or set(files) - set(FILE_KINDS):
        raise DataError(f"files must be a non-empty subset of {FILE_KINDS}, got {files}")
    if codec not in ("copy", "libx264"):
        raise DataError(f"codec must be 'copy' or 'libx264', got '{codec}'")
    if width % 2 or height % 2:
        raise DataError(f"width and height must be even (H.264 needs it), got {width}x{height}")
    if {"av", "video"} & set(files) and shutil.which("ffmpeg") is None:
        raise DataError("ffmpeg is not installed; it is needed to write mp4 files with a sound track")
    root = Path(root)
    by_actor = [takes_for([a], emotions, takes) for a in actors]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        done = pool.map(lambda ts: _write_actor(root, ts, files, width, height, fps, seconds, sample_rate, codec,
                                                seed), by_actor)
        return sorted(p for paths in done for p in paths)


def make_synthetic_cache(cache_dir: str | os.PathLike, actors: Sequence[int] = (1, 2, 3, 4), takes: int = 2,
                         emotions: Sequence[int] = range(1, 9), n_frames: int = 16, size: int = 112,
                         seconds: float = 3.6, modalities: Sequence[str] = ("audio", "video"),
                         seed: int = 0) -> Path:
    """Render synthetic clips straight into a cache in the format `prepare_cache` writes (no mp4 involved)."""
    settings = Settings(modalities=tuple(modalities), n_frames=n_frames, size=size, seconds=seconds)
    cache_dir = Path(cache_dir)
    (cache_dir / "clips").mkdir(parents=True, exist_ok=True)
    with single_threaded():
        entries = [_cache_take(cache_dir / "clips", take, settings, seed)
                   for take in takes_for(actors, emotions, takes)]
    write_manifest(cache_dir, settings, entries, [], complete=True)
    return cache_dir


def _cache_take(clips_dir: Path, take: Take, settings: Settings, seed: int) -> dict:
    arrays = {}
    if "audio" in settings.modalities:
        wave = render_audio(take, settings.seconds, settings.sample_rate, seed)
        arrays["logmel"] = log_mel(fix_length(wave, round(settings.seconds * settings.sample_rate)), settings)
    if "video" in settings.modalities:
        frames = render_frames(take, settings.size, settings.size, settings.n_frames,
                               settings.n_frames / settings.seconds, seed, crop=True)
        arrays["frames"] = np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in frames])
    entry = {"clip_id": take.name(3)[3:], "actor": take.actor, "emotion": take.emotion, "label": take.emotion - 1,
             "vocal_channel": 1, "intensity": take.intensity, "statement": take.statement,
             "repetition": take.repetition, "audio_source": None, "video_source": None,
             "has_audio": "logmel" in arrays, "has_video": "frames" in arrays,
             "face_found": True if "frames" in arrays else None, "notes": []}
    write_clip(clips_dir, entry, arrays)
    return entry
