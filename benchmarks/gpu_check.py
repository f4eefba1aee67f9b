"""Does it fit, and how long will it take? Training steps of every model on this machine's GPU, at the real input
shapes, through the scripts' own train step.

For SimpleCNN, Lite (default, ResNet-18 frames) and the full model (150M, frames): STEPS training steps on one
synthetic batch of the real shapes (16 face frames of 112 px, 3.6 s of audio as a 64-band log-mel) at the scripts'
default batch size, in float16 + GradScaler (the T4 setting, forced) and in bfloat16 where the GPU has it natively
(compute capability 8.0+), the full model with and without gradient checkpointing. The table gives step time,
clips/s, peak memory (`torch.cuda.max_memory_allocated`), non-finite and skipped steps, and the projected time of
EPOCHS epochs of RAVDESS (EPOCH_CLIPS clips; training steps only: no data loading, no evaluation). A row that runs
out of memory says so and the others go on. Without a CUDA GPU it says so in one line and exits 0.

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --batch_size=16 --steps=50 --models="('full',)"
    !python benchmarks/gpu_check.py   # Colab / Kaggle
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/...` from anywhere

from models import build_model  # noqa: E402
from common.config import ConfigError, run_script  # noqa: E402
from training.runtime import Runtime, resolve_amp_dtype  # noqa: E402
from training.stages import make_optimizer  # noqa: E402
from training.step import NonFiniteLossError, train_step  # noqa: E402

# ---- models (the training scripts' default configurations)
MODELS = ("simple", "lite", "full")  # any of these
MODEL_CONFIGS = {  # constructor arguments that differ from the model's defaults, as the scripts set them
    "simple": {},
    "lite": {"modality_dropout": 0.2},
    "full": {"modality_dropout": 0.2},
}
INIT = "scaled_residual"  # init strategy of lite and full (simple uses kaiming, as its script does)

# ---- input (the cache's real shapes)
BATCH_SIZE = 32  # the scripts' default
N_FRAMES = 16  # face frames per clip
FRAME_SIZE = 112  # pixels
N_MELS = 64
AUDIO_FRAMES = 361  # log-mel frames of 3.6 s at hop 160 (16 kHz)

# ---- measurement
PRECISIONS = ("float16", "bfloat16")  # float16 always runs with a GradScaler; bfloat16 only where native
STEPS = 20  # timed training steps per row
WARMUP_STEPS = 3  # untimed first steps (cuDNN autotuning, allocator growth, GradScaler calibration)
LR = 1e-4
CLIP_NORM = 1.0

# ---- projection
EPOCH_CLIPS = 1440  # RAVDESS speech: 24 actors x 60 clips
EPOCHS = 20

# ---- device
DEVICE = "cuda"  # "cuda" or "cuda:1"; the tests set "cpu" with tiny shapes to run the same loop

GIB = 2 ** 30


@dataclass
class Row:
    model: str
    parameters: int
    precision: str
    checkpointing: bool | None  # None: the model has no such option
    step_s: float | None = None  # mean seconds per training step; None when the row did not run
    peak_gib: float | None = None
    non_finite: int = 0
    skipped: int = 0
    error: str = ""

    @property
    def clips_per_s(self) -> float:
        return BATCH_SIZE / self.step_s

    @property
    def projected_min(self) -> float:
        return EPOCHS * math.ceil(EPOCH_CLIPS / BATCH_SIZE) * self.step_s / 60


def synthetic_batch(device: torch.device) -> dict:
    """One batch of the shapes a DataLoader over the cache yields, made on the device."""
    return {"audio": torch.randn(BATCH_SIZE, 1, N_MELS, AUDIO_FRAMES, device=device),
            "frames": torch.randn(BATCH_SIZE, N_FRAMES, 3, FRAME_SIZE, FRAME_SIZE, device=device),
            "has_audio": torch.ones(BATCH_SIZE, dtype=torch.bool, device=device),
            "has_visual": torch.ones(BATCH_SIZE, dtype=torch.bool, device=device),
            "label": torch.randint(0, 8, (BATCH_SIZE,), device=device)}


def precisions(device: torch.device) -> list[str]:
    """PRECISIONS this device runs natively: bfloat16 needs compute capability 8.0+ (a T4 only emulates it)."""
    native_bf16 = device.type != "cuda" or resolve_amp_dtype("auto", device) == torch.bfloat16
    return [p for p in PRECISIONS if p != "bfloat16" or native_bf16]


def variants() -> list[tuple[str, bool | None]]:
    """(model, gradient checkpointing) pairs: the full model with and without, the others have no such option."""
    return [(name, flag) for name in MODELS for flag in ((False, True) if name == "full" else (None,))]


def measure(name: str, checkpointing: bool | None, precision: str, device: torch.device) -> Row:
    """STEPS training steps of one configuration through `training.step.train_step`."""
    config = dict(MODEL_CONFIGS.get(name, {}))
    if checkpointing is not None:
        config["gradient_checkpointing"] = checkpointing
    model = build_model(name, config)
    model.init_weights("kaiming" if name == "simple" else INIT)
    model.to(device).train()
    row = Row(name, sum(p.numel() for p in model.parameters()), precision, checkpointing)
    runtime = Runtime(device, resolve_amp_dtype(precision, device))
    optimizer = make_optimizer(model, LR, weight_decay=0.05)
    scaler = runtime.make_scaler()
    batch = synthetic_batch(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for step in range(WARMUP_STEPS + STEPS):
            if step == WARMUP_STEPS:
                synchronize(device)
                start = time.perf_counter()
                row.non_finite = row.skipped = 0  # only the timed steps count
            try:
                result = train_step(model, batch, optimizer, scaler, runtime, clip_norm=CLIP_NORM)
                row.skipped += int(result.skipped)
            except NonFiniteLossError:
                row.non_finite += 1
        synchronize(device)
        row.step_s = (time.perf_counter() - start) / STEPS
        if device.type == "cuda":
            row.peak_gib = torch.cuda.max_memory_allocated(device) / GIB
    except torch.cuda.OutOfMemoryError:
        row.error = "out of memory"
        if device.type == "cuda":
            row.peak_gib = torch.cuda.max_memory_allocated(device) / GIB
    return row


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


HEADER = (f"{'model':<7} {'params':>8} {'precision':<19} {'ckpt':<4} {'batch':>5} {'step ms':>8} {'clips/s':>8} "
          f"{'peak GiB':>8} {'non-fin':>7} {'skipped':>7} {'projected':>10}")


def format_row(r: Row) -> str:
    precision = r.precision + (" + GradScaler" if r.precision == "float16" else "")
    ckpt = {None: "-", False: "no", True: "yes"}[r.checkpointing]
    peak = f"{r.peak_gib:.2f}" if r.peak_gib is not None else "-"
    params = f"{r.parameters / 1e6:.1f}M" if r.parameters >= 1e5 else f"{r.parameters / 1e3:.0f}K"
    start = f"{r.model:<7} {params:>8} {precision:<19} {ckpt:<4} {BATCH_SIZE:>5}"
    if r.step_s is None:
        return f"{start} {r.error:>17} {peak:>8}"
    return (f"{start} {r.step_s * 1e3:>8.1f} {r.clips_per_s:>8.1f} {peak:>8} {r.non_finite:>7} {r.skipped:>7} "
            f"{r.projected_min:>6.1f} min")


def main() -> None:
    unknown = [m for m in MODELS if m not in MODEL_CONFIGS]
    if unknown:
        raise ConfigError(f"MODELS: unknown {unknown}; choose from {tuple(MODEL_CONFIGS)}")
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU on this machine (torch {torch.__version__}); nothing to measure")
        return
    device = torch.device(DEVICE)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"{props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / GIB:.1f} GiB; "
              f"torch {torch.__version__}, CUDA {torch.version.cuda}")
        if torch.cuda.device_count() > 1:
            print(f"{torch.cuda.device_count()} GPUs: these rows use {device} alone; for DDP over all of them, train "
                  f"with `torchrun --nproc_per_node={torch.cuda.device_count()} train_lite_model.py ...` "
                  "(docs/scaling.md) and read the s/it of its progress bar")
    print(f"{STEPS} timed steps after {WARMUP_STEPS} warm-up steps; batch of {N_FRAMES} frames of {FRAME_SIZE} px + "
          f"{N_MELS}x{AUDIO_FRAMES} log-mel; {EPOCHS} epochs = {EPOCHS} x {math.ceil(EPOCH_CLIPS / BATCH_SIZE)} steps "
          f"({EPOCH_CLIPS} clips), training steps only, in 'projected'")
    print(HEADER)
    print("-" * len(HEADER))
    for name, checkpointing in variants():
        for precision in precisions(device):
            print(format_row(measure(name, checkpointing, precision, device)), flush=True)


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:])
