"""Predict the emotion in face videos and speech recordings with a checkpoint of any of the three models.

Give files or folders (searched recursively) of video (mp4, avi, mov, webm, mkv) or audio (wav, flac, mp3), named
anything. Each file goes through the preprocessing of training (data/preprocess.py: 16 kHz log-mel, N frames, one
face box, SxS crops) with the settings the checkpoint was trained with: the manifest of the cache its run used (found
from the run config stored in the checkpoint), else that run config's frames per clip and crop size, else the
defaults of data/preprocess.py. A file longer than the training window is cut into sliding windows whose
probabilities are averaged. A sound file gives the model no face, a video without sound no sound: the model uses
its learned missing-modality token. A file that cannot be read is reported and the rest go on; the exit status is 1
only if nothing could be predicted.

--checkpoint takes a checkpoint file or a run folder: a folder gives its ckpt_best.pt, a cross-validation run
folder with one fold that fold's (with several, name one: .../fold2). The default is the quick start's run.
Several checkpoints separated by commas (e.g. the same recipe trained with 3 seeds) form an ensemble: their class
probabilities are averaged. --time_shifts=k also averages each window over 2k circular time shifts of its audio
(up to the training run's TIME_SHIFT_SECONDS), the test-time averaging of the training scripts' TEST_TIME_SHIFTS.

    python predict.py my_clips/ talk.wav                  # the model of the README's quick start
    python predict.py interview.mp4 --checkpoint=checkpoints/train_lite_model/lite --output=preds.csv
    python predict.py --webcam --checkpoint=checkpoints/train_simple_working/simple   (live, face only)
    python predict.py talk.wav --checkpoint=runs/seed0,runs/seed1,runs/seed2 --time_shifts=2   (ensemble + TTA)
Person calibration (data/calibration.py): a few unlabeled recordings of the same person set that person's baseline
(mean and spread of each input), and every prediction compares the person with it:
    python predict.py --calibrate=me/recordings/ --save_profile=me.npz today.wav    # build, save and use a profile
    python predict.py --profile=me.npz tomorrow.mp4                                 # reuse it
    python predict.py --calibrate=self interview.mp4      # a long recording calibrated on its own windows
    python predict.py --webcam --webcam_calibration_seconds=10   # the first 10 s of camera frames: the baseline
Colab:
    !python predict.py /content/drive/MyDrive/my_clips --checkpoint=/content/drive/MyDrive/ckpt_best.pt --output=preds.json
"""
from __future__ import annotations

import csv
import json
import sys
from collections import deque
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data.calibration import Moments, PersonProfile, add_inputs
from data.dataset import shift_step_frames
from data.preprocess import ClipError, Settings, face_crops, sample_frame_indices
from data.ravdess import EMOTIONS, DataError
from data.setup import cache_plan, run_data_settings
from data.windows import MEDIA_EXTENSIONS, Windows, is_video, read_windows, to_batch, window_inputs
from models import ModelConfigError
from training.checkpoint import load_checkpoint, rebuild_model, resolve_checkpoint, stored_calibration
from common.config import ConfigError, run_script
from training.runtime import resolve_device

# ---- model
CHECKPOINT = "checkpoints/train_simple_working/simple"  # a run folder (its best checkpoint) or a ckpt_*.pt file;
# several separated by commas: an ensemble averaging their probabilities
TIME_SHIFTS = 0  # k > 0: average each window over the audio and 2k circular time shifts of it (test-time averaging)
DEVICE = "auto"  # "auto" (GPU if there is one), "cpu", "cuda", "cuda:1"

# ---- preprocessing
PREPROCESS_FROM = ""  # a cache folder (or its manifest.json) whose settings to use; "" = found via the checkpoint
WINDOW_HOP_SECONDS = 1.0  # seconds between sliding windows on files longer than the training window
MAX_WINDOWS = 16  # windows per file at most; a longer file gets this many, spread evenly (frames kept: x N)

# ---- person calibration (data/calibration.py)
CALIBRATE = ""  # recordings of the person to calibrate on: files or folders, comma-separated (unlabeled, any
# length); "self": each file is calibrated on its own windows (a long recording); "" = no calibration
PROFILE = ""  # a person profile saved with SAVE_PROFILE (.npz), used instead of CALIBRATE
SAVE_PROFILE = ""  # write the profile that CALIBRATE builds here (.npz), to reuse with --profile
PERSON = ""  # the person's name kept in the profile; "" = the name of the first CALIBRATE file or folder

# ---- output
OUTPUT = ""  # "" = table only; "preds.json" or "preds.csv" also writes the predictions there
TOP_K = 3  # classes listed per file

# ---- live camera (face frames only: no sound is recorded)
WEBCAM = False  # True (or a bare --webcam): predict from a camera instead of files, until Ctrl-C
CAMERA = "0"  # OpenCV camera index ("0", "1"), or a stream URL or video file (played as if live)
WEBCAM_EVERY_SECONDS = 1.0  # seconds of video between two live predictions
WEBCAM_CALIBRATION_SECONDS = 0.0  # > 0: the first this many seconds of frames are the person's baseline profile


@dataclass
class Predictor:
    """A checkpoint's model (or an ensemble of models of one kind) in eval mode with the preprocessing it was
    trained with."""

    models: list[nn.Module]
    model_name: str
    settings: Settings
    settings_source: str
    device: torch.device
    checkpoint: Path  # the file it was loaded from (a run folder resolves to its best checkpoint); the first one
    shift_steps: list[int] = field(default_factory=lambda: [0])  # circular audio shifts averaged, in log-mel frames
    # Each model's training population statistics ({kind: (mean, std)}; None in checkpoints made before person
    # calibration existed) and its run's calibration settings (data.calibration; None: not calibrated)
    populations: list[dict | None] = field(default_factory=list)
    calibration: dict | None = None
    profile: PersonProfile | None = None  # the person profile applied to every file (--calibrate, --profile)
    trained_on: str = ""  # the training run's DATASET ("synthetic", "ravdess"; "" when the checkpoint does not say)

    @property
    def model(self) -> nn.Module:
        """The first model: all of an ensemble's models see the same inputs (checked when loaded)."""
        return self.models[0]

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.model.config["modalities"])

    @property
    def visual_input(self) -> str:
        return self.model.config.get("visual_input", "frames")

    @property
    def uses_audio(self) -> bool:
        return "audio" in self.modalities

    @property
    def uses_frames(self) -> bool:
        return "visual" in self.modalities and self.visual_input == "frames"

    @property
    def inputs(self) -> str:
        """What the model sees, in words: "audio", "face frames", "audio + per-clip visual features"..."""
        visual = {"frames": "face frames", "features": "per-clip visual features"}.get(self.visual_input,
                                                                                       self.visual_input)
        return " + ".join(("audio" if m == "audio" else visual) for m in self.modalities)

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        what = f"model '{self.model_name}' ({params:,} parameters)"
        if len(self.models) > 1:
            what = f"ensemble of {len(self.models)} {what}"
        shifts = f", averaged over {len(self.shift_steps)} audio time shifts" if len(self.shift_steps) > 1 else ""
        return f"{what} on {self.inputs}{shifts}"

    @property
    def calibrated_training(self) -> bool:
        return bool(self.calibration) and self.calibration["mode"] == "person"

    def use_profile(self, profile: PersonProfile) -> PersonProfile:
        """`profile` as this model applies it: only its mean when the model was calibrated on neutral clips (as in
        training, PersonProfile.for_model); a ConfigError when a checkpoint keeps no population statistics."""
        if any(population is None for population in self.populations):
            raise ConfigError(f"{self.checkpoint} was written before person calibration existed (it keeps no "
                              "training population statistics): retrain it to use --calibrate or --profile")
        for population in self.populations:
            profile = profile.for_model(self.calibration, population)
        return profile

    def describe_calibration(self, profile: PersonProfile | None) -> str:
        trained = ("trained with person calibration" if self.calibrated_training else
                   "trained without person calibration")
        if profile is None and self.calibrated_training:
            return (f"the model was {trained}: without --calibrate or --profile it uses its training population's "
                    "statistics, as if the person were the average training actor")
        if profile is None:
            return f"no person calibration (the model was {trained})"
        onto = ("" if self.calibrated_training else
                ": the person's inputs are moved onto its training population's range")
        return f"person profile '{profile.person}' ({profile.describe()}); the model was {trained}{onto}"

    def batches(self, windows: Windows, profile: PersonProfile | None) -> list[dict]:
        """Each model's input batch of the windows, calibrated onto that model's training population."""
        feature_dim = self.model.config.get("feature_dim", 35)
        batches = []
        for population in self.populations or [None] * len(self.models):
            calibrate = None
            if profile is not None:
                calibrate = partial(profile.calibrate, population=population)
            batch = to_batch(windows, self.settings, self.visual_input, feature_dim, calibrate)
            batches.append({k: v.to(self.device) for k, v in batch.items()})
        return batches

    @torch.inference_mode()
    def probabilities(self, windows: Windows, profile: PersonProfile | None = None) -> np.ndarray:
        """Class probabilities of a file: the softmax of each window, averaged over the windows, the audio time
        shifts and the models of an ensemble. `profile`: the person's (default: the predictor's own, if any)."""
        batches = self.batches(windows, profile or self.profile)
        total = 0.0
        for shift in self.shift_steps if self.uses_audio else [0]:
            for model, batch in zip(self.models, batches):
                shifted = {**batch, "audio": torch.roll(batch["audio"], shift, dims=-1)} if shift else batch
                total = total + model(shifted).float().softmax(dim=-1).mean(dim=0)
        return (total / (len(self.models) * len(self.shift_steps if self.uses_audio else [0]))).cpu().numpy()


@dataclass
class Prediction:
    """One row of the output: the averaged probabilities, or the reason the file could not be predicted."""

    file: str
    probabilities: list[float] | None = None
    windows: int = 0
    inputs: str = ""  # modalities the model was given, e.g. "audio+video"
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def top(self, k: int) -> list[tuple[str, float]]:
        order = np.argsort(self.probabilities)[::-1][:k]
        return [(EMOTIONS[i], float(self.probabilities[i])) for i in order]

    def record(self, k: int) -> dict:
        """The row as plain types (JSON); a file that failed has no emotion and no probabilities."""
        top = self.top(k) if self.probabilities is not None else []
        return {"file": self.file, "emotion": top[0][0] if top else None, "probability": top[0][1] if top else None,
                "top": [{"emotion": e, "probability": p} for e, p in top],
                "probabilities": dict(zip(EMOTIONS, self.probabilities)) if top else None,
                "windows": self.windows, "inputs": self.inputs, "notes": self.notes, "error": self.error}


# ------------------------------------------------------------------------------------------------ loading

def _settings_from(values: dict) -> Settings:
    known = {f.name for f in fields(Settings)}
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
    return Settings(**kept)


def _manifest_settings(path: Path) -> Settings | None:
    manifest = path / "manifest.json" if path.is_dir() else path
    if not manifest.is_file():
        return None
    try:
        return _settings_from(json.loads(manifest.read_text())["settings"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{manifest} is not a cache manifest (no usable 'settings')") from None


def preprocessing_settings(state: dict, preprocess_from: str = "") -> tuple[Settings, str]:
    """The preprocessing settings for a checkpoint and where they came from: PREPROCESS_FROM if given, else the
    manifest of the cache the checkpoint's run trained on (found from its run config, as data/setup.py names it),
    else the frames per clip and crop size of that run config with the defaults of data/preprocess.py."""
    if preprocess_from:
        settings = _manifest_settings(Path(preprocess_from).expanduser())
        if settings is None:
            raise ConfigError(f"--preprocess_from={preprocess_from}: no manifest.json there")
        return settings, f"cache manifest {preprocess_from}"
    data = run_data_settings(state.get("run_config") or {})
    if data is None:
        return Settings(), "the defaults of data/preprocess.py (the checkpoint has no training run config)"
    _, cache, n_frames, size = cache_plan(data)
    settings = _manifest_settings(cache)
    if settings is not None:
        return settings, f"the training cache manifest {cache / 'manifest.json'}"
    return (Settings(n_frames=n_frames, size=size),
            f"the checkpoint's run config (its cache {cache} is not here: the rest are the defaults of "
            "data/preprocess.py)")


def load_predictor(checkpoint: str | Path, device: str = "auto", preprocess_from: str = "",
                   time_shifts: int = 0) -> Predictor:
    """Rebuild each checkpoint's model (checkpoint files or run folders, comma-separated for an ensemble) from its
    stored name and config, load the weights, eval mode."""
    paths = [resolve_checkpoint(part.strip()) for part in str(checkpoint).split(",") if part.strip()]
    if not paths:
        raise ConfigError("--checkpoint is empty")
    resolved = resolve_device(device)
    states = [load_checkpoint(path) for path in paths]
    models = [rebuild_model(state, path).to(resolved).eval() for state, path in zip(states, paths)]
    for path, model in zip(paths[1:], models[1:]):
        if [model.config.get(k) for k in ("modalities", "visual_input")] != \
                [models[0].config.get(k) for k in ("modalities", "visual_input")]:
            raise ConfigError(f"{path} sees other inputs than {paths[0]}; an ensemble needs models of the same inputs")
    settings, source = preprocessing_settings(states[0], preprocess_from)
    shift_seconds = states[0].get("run_config", {}).get("TIME_SHIFT_SECONDS", 0.0) or 0.0
    step = shift_step_frames(shift_seconds, settings.sample_rate / settings.hop, time_shifts)
    shifts = [i * step for i in range(-time_shifts, time_shifts + 1)] if step else [0]
    if time_shifts and not step:
        print(f"note: {paths[0]} was trained without a time shift; --time_shifts is ignored")
    calibrations = [stored_calibration(state) for state in states]
    populations = [entry[1] if entry else None for entry in calibrations]
    predictor = Predictor(models, states[0]["model_name"], settings, source, resolved, paths[0], shifts,
                          populations, calibrations[0][0] if calibrations[0] else None,
                          trained_on=str(states[0].get("run_config", {}).get("DATASET", "")))
    if not predictor.uses_audio and not predictor.uses_frames:
        raise ConfigError(f"{paths[0]}: this model sees only per-clip visual features (visual_input='features', "
                          "e.g. OpenFace action units), which predict.py cannot compute from a video or sound file")
    return predictor


# ---------------------------------------------------------------------------------------------- prediction

def collect_files(paths: list[str]) -> tuple[list[Path], list[Prediction]]:
    """The media files named or found (recursively) under `paths`, and a failed row for each path that is
    neither."""
    files: list[Path] = []
    problems: list[Prediction] = []
    for text in paths:
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_EXTENSIONS
                           and not p.name.startswith("."))
            files += found
            if not found:
                problems.append(Prediction(text, error=f"no {'/'.join(e[1:] for e in MEDIA_EXTENSIONS)} files here"))
        elif path.is_file():
            files.append(path)
        else:
            problems.append(Prediction(text, error="no such file or folder"))
    return files, problems


def build_profile(paths: list[str], predictor: Predictor, person: str, hop: float, max_windows: int
                  ) -> PersonProfile:
    """A person profile from the windows of every readable file under `paths` (one person's recordings,
    unlabeled), with the model's preprocessing; files that cannot be read are listed and skipped."""
    files, problems = collect_files(paths)
    moments, used, stretches = Moments(), [], 0
    for path in tqdm(files, desc="calibrating", unit="file", disable=len(files) < 2, leave=False):
        try:
            windows = read_windows(path, predictor.settings, audio=predictor.uses_audio,
                                   frames=predictor.uses_frames, hop=hop, max_windows=max_windows)
        except ClipError as err:
            problems.append(Prediction(str(path), error=str(err)))
            continue
        add_inputs(moments, window_inputs(windows))
        used.append(path)
        stretches += clip_stretches(windows, predictor.settings.seconds)
    for problem in problems:
        print(f"calibration: skipped {problem.file}: {problem.error}")
    if not used:
        raise ConfigError(f"--calibrate={','.join(paths)}: no recording there could be read for calibration")
    name = person or Path(paths[0]).expanduser().resolve().stem
    return PersonProfile(name, stretches, moments.stats(),
                         source=f"{len(used)} recording(s) under {', '.join(paths)}")


def clip_stretches(windows: Windows, seconds: float) -> int:
    """How many clip-length stretches of a recording its windows cover: what the recording weighs in a profile
    against the population's PRIOR_CLIPS (a 4 s RAVDESS clip is one; a minute read in 16 windows of 3 s is 16)."""
    return min(windows.n_windows, max(1, round(windows.duration / seconds)))


def self_profile(windows: Windows, seconds: float) -> PersonProfile:
    """--calibrate=self: a file's own windows as the person's baseline."""
    moments = Moments()
    add_inputs(moments, window_inputs(windows))
    return PersonProfile(windows.path.stem, clip_stretches(windows, seconds), moments.stats(),
                         source=f"its own {windows.n_windows} window(s)")


def predict_file(path: Path, predictor: Predictor, hop: float, max_windows: int, calibrate_self: bool = False
                 ) -> Prediction:
    """One file's prediction; a file that cannot be read or holds nothing the model uses gives a failed row.
    `calibrate_self`: the file is calibrated on its own windows (--calibrate=self)."""
    notes = []
    if is_video(path) and "visual" in predictor.modalities and not predictor.uses_frames:
        notes.append("video frames not used: the model's visual input is per-clip features (audio only)")
    try:
        windows = read_windows(path, predictor.settings, audio=predictor.uses_audio, frames=predictor.uses_frames,
                               hop=hop, max_windows=max_windows)
    except ClipError as err:
        return Prediction(str(path), notes=notes, error=str(err))
    inputs = "+".join(m for m, present in (("audio", windows.logmel is not None),
                                           ("video", windows.frames is not None)) if present)
    if windows.n_windows > 1:
        apart = windows.starts[1] - windows.starts[0]
        notes.append(f"{windows.n_windows} windows of {predictor.settings.seconds:g} s, {apart:.2f} s apart, over "
                     f"{windows.duration:.2f} s")
    profile = None
    if calibrate_self:
        profile = predictor.use_profile(self_profile(windows, predictor.settings.seconds))
        notes.append(f"calibrated on its own {windows.n_windows} window(s)")
    return Prediction(str(path), predictor.probabilities(windows, profile).tolist(), windows.n_windows, inputs,
                      notes + windows.notes)


def format_table(predictions: list[Prediction], k: int) -> str:
    """A fixed-width table: file, predicted emotion, probability, top k, windows, inputs, notes or error."""
    rows = [("file", "emotion", "prob", f"top {k}", "windows", "inputs", "notes")]
    for p in predictions:
        if p.error:
            rows.append((p.file, "-", "-", "-", "-", "-", f"error: {p.error}"))
        else:
            (emotion, prob), top = p.top(1)[0], p.top(k)
            rows.append((p.file, emotion, f"{prob:.2f}", ", ".join(f"{e} {q:.2f}" for e, q in top), str(p.windows),
                         p.inputs, "; ".join(p.notes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]).rstrip() for r in rows)


def write_output(predictions: list[Prediction], path: Path, k: int, header: dict) -> None:
    """predictions as JSON (header + one record per file) or CSV (one row per file, a column per class)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [p.record(k) for p in predictions]
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({**header, "predictions": records}, indent=1))
        return
    columns = ["file", "emotion", "probability", "top", "windows", "inputs", "notes", "error",
               *(f"p_{e}" for e in EMOTIONS)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in records:
            probabilities = r.pop("probabilities") or {}
            writer.writerow({**r, "top": "; ".join(f"{t['emotion']} {t['probability']:.4f}" for t in r["top"]),
                             "notes": "; ".join(r["notes"]), "error": r["error"] or "",
                             **{f"p_{e}": probabilities.get(e, "") for e in EMOTIONS}})


def check_output(output: str) -> Path | None:
    if not output:
        return None
    path = Path(output).expanduser()
    if path.suffix.lower() not in (".json", ".csv"):
        raise ConfigError(f"--output={output}: give a file name ending in .json or .csv")
    return path


# --------------------------------------------------------------------------------------------------- camera

def open_camera(camera: int | str) -> cv2.VideoCapture:
    index = str(camera).isdigit()
    # OpenCV logs its own multi-line warnings for a missing camera; the one-line error below says it all.
    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        cap = cv2.VideoCapture(int(camera) if index else str(camera))
        if not cap.isOpened():
            where = f"at index {camera}" if index else f"at {camera}"
            raise ConfigError(f"no camera found {where} (--camera=N picks another one)")
    finally:
        cv2.utils.logging.setLogLevel(previous)
    return cap


def run_webcam(predictor: Predictor, camera: int | str, every: float, k: int, calibration_seconds: float = 0.0
               ) -> None:
    """Print the running prediction of the last training window of camera frames until Ctrl-C or the stream
    ends. `calibration_seconds` > 0: the windows of the first that many seconds build the person's profile (their
    face crops' statistics) instead of being predicted; predictions start after it."""
    if not predictor.uses_frames:
        raise ConfigError("--webcam needs a model that sees face frames (no sound is recorded); this one sees "
                          f"{predictor.inputs}")
    cap = open_camera(camera)
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0  # some cameras report 0
    settings = predictor.settings
    recent: deque = deque(maxlen=max(settings.n_frames, round(settings.seconds * fps)))
    # Counted in frames, not wall time: a video file played "live" then gives the same predictions as a camera.
    step, seen = max(1, round(every * fps)), 0
    baseline, calibrating = Moments(), calibration_seconds > 0
    print(f"camera {camera} at {fps:.0f} fps, a prediction every {every:g} s from the last {settings.seconds:g} s "
          "of frames (no sound); Ctrl-C stops")
    if calibrating:
        print(f"calibrating on the first {calibration_seconds:g} s: look at the camera as you usually do ...")
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                print(f"\ncamera {camera}: no more frames")
                return
            recent.append(frame)
            seen += 1
            if len(recent) < recent.maxlen or (seen - recent.maxlen) % step:
                continue
            picks = sample_frame_indices(len(recent), fps, settings.n_frames, settings.seconds)
            crops, face = face_crops([recent[i] for i in picks], settings)
            windows = Windows(Path(f"camera {camera}"), settings.seconds, [None], None, crops[None], int(face))
            if calibrating:
                add_inputs(baseline, window_inputs(windows))
                if seen / fps >= calibration_seconds:
                    calibrating = False
                    predictor.profile = predictor.use_profile(
                        PersonProfile(f"camera {camera}", max(1, round(seen / fps / settings.seconds)),
                                      baseline.stats(),
                                      source=f"the first {seen / fps:.1f} s of the camera"))
                    print(f"calibration: {predictor.describe_calibration(predictor.profile)}")
                continue
            top = Prediction("camera", predictor.probabilities(windows).tolist()).top(k)
            line = ", ".join(f"{e} {p:.2f}" for e, p in top) + ("" if face else "  (no face found)")
            print(f"\r{line:<70}", end="", flush=True)
    except KeyboardInterrupt:
        print()
    finally:
        cap.release()


# ----------------------------------------------------------------------------------------------------- main

def check_calibration_flags() -> None:
    """The person calibration flags make sense together (before any slow work)."""
    if CALIBRATE and PROFILE:
        raise ConfigError("give --calibrate (build a profile) or --profile (a saved one), not both")
    if SAVE_PROFILE and (not CALIBRATE or CALIBRATE == "self"):
        raise ConfigError("--save_profile needs --calibrate=PATH (the recordings the profile is built from)")
    if SAVE_PROFILE and not SAVE_PROFILE.endswith(".npz"):
        raise ConfigError(f"--save_profile={SAVE_PROFILE}: a profile is saved as a .npz file")
    if WEBCAM and CALIBRATE == "self":
        raise ConfigError("--calibrate=self is for files; with --webcam use --webcam_calibration_seconds=N")
    if WEBCAM_CALIBRATION_SECONDS < 0 or (WEBCAM_CALIBRATION_SECONDS and not WEBCAM):
        raise ConfigError("--webcam_calibration_seconds takes seconds >= 0, with --webcam")
    if WEBCAM_CALIBRATION_SECONDS and (CALIBRATE or PROFILE):
        raise ConfigError("give --webcam_calibration_seconds or a profile (--calibrate, --profile), not both")


def main(paths: list[str]) -> int:
    """Predict every file under `paths` (or the camera with WEBCAM); returns the exit status."""
    output = check_output(OUTPUT)
    if WEBCAM and paths:
        raise ConfigError("give files or --webcam, not both")
    if not WEBCAM and not paths:
        raise ConfigError("give one or more files or folders to predict (see the docstring of predict.py)")
    if not WINDOW_HOP_SECONDS > 0 or MAX_WINDOWS < 1 or not 1 <= TOP_K <= len(EMOTIONS):
        raise ConfigError(f"--window_hop_seconds must be > 0, --max_windows >= 1 and --top_k 1-{len(EMOTIONS)}")
    # Unreadable files are reported in the table; OpenCV's own warnings about them would only add noise.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    if TIME_SHIFTS < 0:
        raise ConfigError(f"--time_shifts must be >= 0, got {TIME_SHIFTS}")
    check_calibration_flags()
    predictor = load_predictor(CHECKPOINT, DEVICE, PREPROCESS_FROM, TIME_SHIFTS)
    print(f"{predictor.describe()} from {predictor.checkpoint}")
    if predictor.trained_on == "synthetic":
        print("note: this checkpoint was trained on the synthetic quick-start set (drawn faces, synthetic voices): "
              "it checks that the pipeline runs, its predictions on real recordings mean nothing (README: Getting "
              "RAVDESS)")
    s = predictor.settings
    print(f"preprocessing from {predictor.settings_source}: {s.seconds:g} s windows, {s.n_frames} frames of "
          f"{s.size}x{s.size}, {s.n_mels} mel bands at {s.sample_rate} Hz")
    calibrate_self = CALIBRATE == "self"
    if PROFILE or (CALIBRATE and not calibrate_self):
        profile = (PersonProfile.load(PROFILE) if PROFILE else
                   build_profile(CALIBRATE.split(","), predictor, PERSON, WINDOW_HOP_SECONDS, MAX_WINDOWS))
        predictor.profile = predictor.use_profile(profile)
        if SAVE_PROFILE:
            print(f"saved the person profile to {profile.save(SAVE_PROFILE)} (reuse it with --profile)")
    calibration = ("each file calibrated on its own windows (--calibrate=self)" if calibrate_self else
                   predictor.describe_calibration(predictor.profile))
    if not (WEBCAM and WEBCAM_CALIBRATION_SECONDS):
        print(f"calibration: {calibration}")
    if WEBCAM:
        run_webcam(predictor, CAMERA, WEBCAM_EVERY_SECONDS, TOP_K, WEBCAM_CALIBRATION_SECONDS)
        return 0
    files, predictions = collect_files(paths)
    for path in tqdm(files, desc="predicting", unit="file", disable=len(files) < 2, leave=False):
        predictions.append(predict_file(path, predictor, WINDOW_HOP_SECONDS, MAX_WINDOWS, calibrate_self))
    print(format_table(predictions, TOP_K))
    n_ok = sum(p.error is None for p in predictions)
    print(f"{n_ok} of {len(predictions)} predicted")
    if output is not None:
        header = {"checkpoint": str(predictor.checkpoint), "model": predictor.model_name,
                  "preprocessing": s.to_json(), "calibration": calibration}
        write_output(predictions, output, TOP_K, header)
        print(f"wrote {output}")
    return 0 if n_ok else 1


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:], user_errors=(DataError, ModelConfigError), takes_paths=True)
