"""benchmarks/gpu_check.py: without CUDA one line and exit 0; its measuring loop, run on the CPU with tiny shapes,
prints a row per configuration with measured numbers."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from tests.conftest import imported_script
import torch
from tests.shared_paths import REPO

TINY_FULL = {"width": 32, "n_segments": 4, "audio_channels": [4, 8, 8, 16], "frame_backbone": "tiny",
             "layout": ["conv", "attn"], "n_heads": 4, "n_kv_heads": 2, "mlp_hidden": 64}
TINY_LITE = {"width": 32, "audio_channels": [4, 8, 8, 16], "audio_tokens": 3, "visual_tokens": 2, "fusion_layers": 1,
             "n_heads": 2, "mlp_ratio": 2, "frame_backbone": "tiny"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would measure it")
def test_without_cuda_one_line_and_exit_0():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == [out.stdout.strip()] and "no CUDA GPU" in out.stdout


@pytest.fixture
def gpu_check():
    yield from imported_script("benchmarks.gpu_check")


def test_the_measuring_loop_prints_measured_rows(gpu_check, capsys):
    vars(gpu_check).update({"DEVICE": "cpu", "BATCH_SIZE": 2, "N_FRAMES": 2, "FRAME_SIZE": 32, "AUDIO_FRAMES": 40,
                            "STEPS": 2, "WARMUP_STEPS": 1, "PRECISIONS": ("float16", "bfloat16"),
                            "MODEL_CONFIGS": {"simple": {}, "lite": TINY_LITE, "full": TINY_FULL}})
    torch.manual_seed(0)
    gpu_check.main()
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[lines.index(gpu_check.HEADER) + 2:]]
    # simple, lite, full without and with checkpointing, each in float16 (+ GradScaler) and bfloat16
    assert [(r[0], r[2], r[-9]) for r in rows] == [
        (m, p, c) for m, c in (("simple", "-"), ("lite", "-"), ("full", "no"), ("full", "yes"))
        for p in ("float16", "bfloat16")]
    for r in rows:
        step_ms, clips_per_s, peak, non_finite, skipped, projected = r[-7:-1]
        assert float(step_ms) > 0 and float(clips_per_s) == pytest.approx(2 / (float(step_ms) / 1e3), rel=0.01, abs=0.06)
        assert peak == "-" and int(non_finite) == 0 and 0 <= int(skipped) <= 2  # no CUDA memory counter on a CPU
        steps = 20 * math.ceil(1440 / 2)
        assert float(projected) == pytest.approx(steps * float(step_ms) / 1e3 / 60, rel=0.05, abs=0.1)


def test_measure_counts_the_timed_steps(gpu_check):
    vars(gpu_check).update({"BATCH_SIZE": 2, "N_FRAMES": 2, "FRAME_SIZE": 32, "AUDIO_FRAMES": 40, "STEPS": 3,
                            "WARMUP_STEPS": 0})
    calls = []
    original = gpu_check.train_step

    def counting_step(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    vars(gpu_check)["train_step"] = counting_step
    try:
        row = gpu_check.measure("simple", None, "float16", torch.device("cpu"))
    finally:
        vars(gpu_check)["train_step"] = original
    expected = sum(p.numel() for p in gpu_check.build_model("simple", {}).parameters())
    assert len(calls) == 3 and row.step_s > 0 and row.parameters == expected and row.error == ""
