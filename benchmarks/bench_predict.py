"""CPU inference latency per 3.5 s clip of predict.py's pipeline: preprocessing and model, separately, per model.

Writes CLIPS synthetic 1280x720, 30 fps, 3.5 s H.264 mp4 files with an AAC sound track (data/synthetic.py, the
format of RAVDESS), then times on the CPU with THREADS threads:
- preprocessing: `data.windows.read_windows` as predict.py calls it (sound track via ffprobe + ffmpeg -> 16 kHz
  log-mel; 16 frames decoded -> Haar face box -> 112x112 crops), plus the batch; the same for every model at its
  default configuration (all three see audio + frames), so it is measured once and also split into its two halves;
- model: one forward pass of that batch (one window: 3.5 s is shorter than the 3.6 s training window) for each
  model at its default configuration with random weights (the latency does not depend on their values).
Each time is the median over REPEATS runs of each clip after one warm-up run, because the machine may be shared.
On a machine whose cores are busy with other work, OpenMP's default spin-waiting makes the model 5-20x slower with 2
threads than with 1 (a thread spins for a partner that is not scheduled); OMP_WAIT_POLICY=PASSIVE, which has to be
set before Python starts, removes that and measures the model rather than the contention.

    python benchmarks/bench_predict.py
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_predict.py   # a shared machine
    python benchmarks/bench_predict.py --threads=4 --repeats=10 --models="('simple', 'lite')"
    !python benchmarks/bench_predict.py   # Colab
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/...` from anywhere

from data.preprocess import Settings  # noqa: E402
from data.ravdess import DataError  # noqa: E402
from data.synthetic import make_synthetic_ravdess  # noqa: E402
from data.windows import read_windows, to_batch  # noqa: E402
from models import ModelConfigError, build_model  # noqa: E402
from common.config import ConfigError, run_script  # noqa: E402

# --- machine
THREADS = 2  # torch and OpenCV threads (ffmpeg, a separate process, picks its own)
REPEATS = 5  # timed runs per clip; the median over all clips and runs is reported
# --- clips
CLIPS = 3  # synthetic clips (one actor and emotion each)
WIDTH, HEIGHT = 1280, 720  # pixels
FPS = 30.0  # frames per second
SECONDS = 3.5  # clip length
WORK_DIR = ""  # where the clips are written; "" = a temporary folder, removed at the end
# --- models
MODELS = ("simple", "lite", "full")  # each at its default configuration
HOP = 1.0  # predict.py's WINDOW_HOP_SECONDS (unused for clips shorter than the window)


def median_ms(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of `run` in ms over `repeats` runs after one warm-up, and its last result."""
    result = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def time_preprocessing(clips: list[Path], settings: Settings) -> tuple[dict[str, float], list[dict]]:
    """Median ms per clip of the whole preprocessing and of its sound and frame halves; the batches."""
    totals: dict[str, list[float]] = {"total": [], "sound": [], "frames": []}
    batches = []
    for clip in clips:
        for part, audio, frames in (("sound", True, False), ("frames", False, True), ("total", True, True)):
            ms, batch = median_ms(lambda: to_batch(read_windows(clip, settings, audio=audio, frames=frames,
                                                                  hop=HOP), settings), REPEATS)
            totals[part].append(ms)
        batches.append(batch)
    return {k: statistics.median(v) for k, v in totals.items()}, batches


@torch.inference_mode()
def time_model(name: str, batches: list[dict]) -> tuple[int, float]:
    """Parameters and median forward ms per clip of model `name` at its default configuration."""
    torch.manual_seed(0)
    model = build_model(name, {}).eval()
    per_clip = [median_ms(lambda: model(batch), REPEATS)[0] for batch in batches]
    return sum(p.numel() for p in model.parameters()), statistics.median(per_clip)


def write_clips(folder: Path) -> list[Path]:
    return make_synthetic_ravdess(folder, actors=range(1, CLIPS + 1), takes=1, emotions=(5,), width=WIDTH,
                                  height=HEIGHT, fps=FPS, seconds=SECONDS, files=("av",), codec="libx264")


def main() -> None:
    if REPEATS < 1 or CLIPS < 1:
        raise ConfigError("--repeats and --clips must be at least 1")
    torch.set_num_threads(THREADS)
    cv2.setNumThreads(THREADS)
    settings = Settings()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(WORK_DIR) if WORK_DIR else Path(tmp)
        clips = write_clips(folder)
        print(f"{len(clips)} clips {WIDTH}x{HEIGHT}, {FPS:g} fps, {SECONDS:g} s, H.264 + AAC; CPU, {THREADS} threads, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; median of {REPEATS} runs per clip "
              "after a warm-up")
        pre, batches = time_preprocessing(clips, settings)
        rows = [(name, *time_model(name, batches)) for name in MODELS]
    print()
    print("| model | params | preprocessing ms/clip | model ms/clip | total ms/clip |")
    print("|---|---:|---:|---:|---:|")
    for name, params, model_ms in rows:
        print(f"| {name} | {params / 1e6:.2f}M | {pre['total']:.0f} | {model_ms:.0f} | {pre['total'] + model_ms:.0f} |")
    print(f"\npreprocessing (the same for every model): sound track + log-mel {pre['sound']:.0f} ms, "
          f"{settings.n_frames} frames decoded + face box + crops {pre['frames']:.0f} ms")


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:], user_errors=(DataError, ModelConfigError))
