"""The debugging tools: training/monitor.py, debug_gradients.py (training watch and crash replay) and
visualize_attention.py, on tiny models and a tiny synthetic cache."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import debug_gradients
import visualize_attention
from data.dataset import RavdessDataset
from data.synthetic import make_synthetic_cache, make_synthetic_ravdess
from models import build_model
from training.checkpoint import make_state, save_checkpoint
from common.config import run_script
from training.monitor import ModuleMonitor, hook_count
from training.runs import RunFolder
from training.runtime import Runtime
from training.stages import make_optimizer
from training.step import train_step

CPU = torch.device("cpu")
FP32, FP16 = Runtime(CPU, None), Runtime(CPU, torch.float16)
TINY_FULL = {"width": 32, "n_segments": 4, "audio_channels": [4, 8, 8, 16], "frame_backbone": "tiny",
             "frame_input_size": None, "layout": ["conv", "attn", "conv", "attn"], "n_heads": 4, "n_kv_heads": 2,
             "mlp_hidden": 64}
TINY_LITE = {"width": 32, "audio_channels": [4, 8, 8, 16], "audio_tokens": 4, "frame_backbone": "tiny",
             "visual_tokens": 4, "fusion": "cross_attention", "fusion_layers": 1, "n_heads": 4, "mlp_ratio": 2}
TINY_SIMPLE = {"channels": [4, 8, 8]}



@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 clips (one actor, 8 emotions), 4 frames of 32 px, 1 s of sound."""
    return make_synthetic_cache(tmp_path_factory.mktemp("tiny_cache"), actors=(1,), takes=1, n_frames=4, size=32,
                                seconds=1.0)


def tiny_batch(batch_size: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"audio": torch.randn(batch_size, 1, 64, 32, generator=g),
            "frames": torch.randn(batch_size, 2, 3, 16, 16, generator=g),
            "has_audio": torch.ones(batch_size, dtype=torch.bool), "has_visual": torch.ones(batch_size, dtype=torch.bool),
            "label": torch.randint(0, 8, (batch_size,), generator=g)}


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 50


class LogOfNegativeAfter(nn.Module):
    """Acts as a ReLU for its first `calls` forwards, then returns the log of a negative number (NaN)."""

    def __init__(self, calls: int):
        super().__init__()
        self.calls, self.seen = calls, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        return torch.relu(x) if self.seen <= self.calls else torch.log(-(x.abs() + 1))


class SqrtOfPositivePart(nn.Module):
    """Finite forward; its backward at the zeroed inputs is inf * 0 = NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x * (x > 0).to(x.dtype))


class SqrtNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = {}
        self.inp, self.sqrt, self.head = nn.Linear(3, 8), SqrtOfPositivePart(), nn.Linear(8, 8)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.sqrt(self.inp(batch["x"])))


# ------------------------------------------------------------------------------------------------- monitor
def test_monitor_registers_nothing_until_used_and_removes_every_hook():
    model = build_model("simple", TINY_SIMPLE)
    monitor = ModuleMonitor(model)
    assert hook_count(model) == 0  # constructing a monitor registers nothing
    with monitor:
        assert hook_count(model) == len(list(model.modules()))
        monitor.begin_step(0)
        nn.functional.cross_entropy(model(tiny_batch()), tiny_batch()["label"]).backward()
    assert hook_count(model) == 0
    recorded = monitor.rows()
    names = {r["module"] for r in recorded}
    assert {"(model)", "classifier.1"} <= names and any(name.startswith("audio_encoder.") for name in names)
    assert all(r["act_non_finite"] == 0 for r in recorded) and recorded[0]["out_grad_norm"] > 0
    model(tiny_batch()).sum().backward()  # nothing left behind records anything
    assert monitor.rows() == recorded


def test_injected_log_of_negative_is_named_with_its_step():
    torch.manual_seed(0)
    model = build_model("simple", TINY_SIMPLE)
    model.visual_encoder[6] = LogOfNegativeAfter(calls=3)  # the ReLU of the second visual conv block
    batches = [tiny_batch(seed=i) for i in range(6)]
    monitor, steps = debug_gradients.watch(model, batches, FP16, lr=1e-3, warmup=0, clip=None)
    event = monitor.first_non_finite()
    assert (event.module, event.module_type, event.step, event.phase) == \
        ("visual_encoder.6", "LogOfNegativeAfter", 3, "forward")
    assert event.inputs_finite and event.outputs[0].non_finite == 1.0
    assert [s["step"] for s in steps] == [0, 1, 2, 3]  # stopped at the failing step
    assert hook_count(model) == 0
    assert "step 3, forward of visual_encoder.6 (LogOfNegativeAfter)" in event.describe()


def test_non_finite_gradient_is_traced_to_the_backward_that_made_it():
    torch.manual_seed(0)
    model = SqrtNet()
    batch = {"x": torch.randn(8, 3), "label": torch.randint(0, 8, (8,))}
    monitor, _ = debug_gradients.watch(model, [batch, batch], FP32, lr=1e-3, warmup=0, clip=None)
    event = monitor.first_non_finite()
    assert (event.phase, event.module, event.produced_by, event.step) == ("backward", "inp", "sqrt", 0)
    assert hook_count(model) == 0


def test_gradient_norms_are_true_scale_under_float16_loss_scaling():
    norms = {}
    for runtime in (FP32, FP16):
        torch.manual_seed(0)
        model = build_model("simple", TINY_SIMPLE)
        monitor, steps = debug_gradients.watch(model, [tiny_batch()], runtime, lr=1e-3, warmup=0, clip=None)
        norms[runtime.precision] = monitor.records[0]["classifier.1"]
        assert steps[0]["scale"] == (65536.0 if runtime.use_scaler else 1.0)
    for key in ("grad_norm", "out_grad_norm"):  # a scaled norm would be 65536x larger
        assert norms["float16"][key] == pytest.approx(norms["float32"][key], rel=0.05)


# ----------------------------------------------------------------------------------------- debug_gradients
def test_debug_gradients_script_writes_stats_heatmap_and_report(tiny_cache, tmp_path, monkeypatch):
    for key, value in {"MODEL": "full", "RECIPE": "legacy", "MODEL_CONFIG": TINY_FULL, "DATA": "cache",
                       "CACHE_DIR": str(tiny_cache), "STEPS": 3, "BATCH_SIZE": 4, "OUTPUT_DIR": str(tmp_path),
                       "RUN_NAME": "t"}.items():
        monkeypatch.setattr(debug_gradients, key, value)
    debug_gradients.main()
    out = tmp_path / "debug_gradients" / "t"
    report = (out / "report.txt").read_text()
    assert "QK-norm False" in report and "float16 + GradScaler" in report and "3 of 3 steps run" in report
    assert "largest finite attention logit" in report
    rows = [json.loads(line) for line in (out / "module_stats.jsonl").read_text().splitlines()]
    attention = [r for r in rows if r["module"] == "fusion.blocks.1.operator.q_proj"]
    assert [r["step"] for r in attention] == [0, 1, 2] and all(r["grad_norm"] > 0 for r in attention)
    assert len((out / "steps.jsonl").read_text().splitlines()) == 3
    assert_png(out / "figures" / "grad_norm_heatmap.png")


def test_debug_gradients_legacy_cause_names_its_module_in_the_report(tiny_cache, tmp_path, monkeypatch):
    for key, value in {"MODEL": "full", "RECIPE": "legacy", "LEGACY_CAUSE": "mask_fill", "MODEL_CONFIG": TINY_FULL,
                       "DATA": "cache", "CACHE_DIR": str(tiny_cache), "STEPS": 2, "BATCH_SIZE": 4,
                       "OUTPUT_DIR": str(tmp_path), "RUN_NAME": "cause"}.items():
        monkeypatch.setattr(debug_gradients, key, value)
    debug_gradients.main()
    report = (tmp_path / "debug_gradients" / "cause" / "report.txt").read_text()
    assert "legacy cause mask_fill" in report and "1 of 2 steps run" in report
    assert "step 0, forward of fusion.blocks.1.operator.attention (ScaledDotProductAttention)" in report


def test_debug_gradients_never_overwrites_a_report_and_always_draws_a_heatmap(tiny_cache, tmp_path, monkeypatch,
                                                                              capsys):
    # mask_fill makes the loss non-finite at step 0, before any gradient: the heatmap is of the activations.
    for key, value in {"MODEL": "full", "RECIPE": "legacy", "LEGACY_CAUSE": "mask_fill", "MODEL_CONFIG": TINY_FULL,
                       "DATA": "cache", "CACHE_DIR": str(tiny_cache), "STEPS": 1, "BATCH_SIZE": 4,
                       "OUTPUT_DIR": str(tmp_path), "RUN_NAME": "default"}.items():
        monkeypatch.setattr(debug_gradients, key, value)
    debug_gradients.main()
    first = tmp_path / "debug_gradients" / "default"
    report = (first / "report.txt").read_text()
    assert_png(first / "figures" / "activation_heatmap.png")
    assert f"heatmap: {first / 'figures' / 'activation_heatmap.png'}" in report
    monkeypatch.setattr(debug_gradients, "STEPS", 2)
    debug_gradients.main()  # the same command again
    second = tmp_path / "debug_gradients" / "default_2"
    assert (first / "report.txt").read_text() == report and (second / "report.txt").is_file()
    out = capsys.readouterr().out
    assert f"{first} holds an earlier report: this run writes to {second}" in out and f"outputs in {second}" in out


def test_replay_of_a_crash_dump_names_the_first_non_finite_module(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model = build_model("simple", TINY_SIMPLE)
    with torch.no_grad():
        model.visual_encoder[4].weight[0, 0, 0, 0] = float("inf")  # the second visual convolution
    dump = RunFolder("train_simple_working", "crashed", root=tmp_path).save_crash_dump(
        tiny_batch(), make_state(model, "simple"), "non-finite loss (nan)")
    for key, value in {"REPLAY": str(dump), "OUTPUT_DIR": str(tmp_path), "RUN_NAME": "replay"}.items():
        monkeypatch.setattr(debug_gradients, key, value)
    debug_gradients.main()
    report = (tmp_path / "debug_gradients" / "replay" / "report.txt").read_text()
    assert "forward of visual_encoder.4 (Conv2d)" in report
    assert "its inputs were finite, so this module produced it" in report
    assert "forward of visual_encoder.4" in capsys.readouterr().out


def test_heatmap_shows_its_title_every_label_and_the_first_row(monkeypatch):
    """Issue 10 item 14: the title and the module names were cut off and the legend hid the first row."""
    monitor = ModuleMonitor(nn.Linear(2, 2))
    names = [f"visual_encoder.backbone.blocks.{i}.shortcut.{i % 3}.very_long_module_name" for i in range(40)]
    monitor.records = {step: {name: {"grad_norm": math.inf if (step, row) == (2, 0) else 0.1 * (row + 1)}
                              for row, name in enumerate(names)} for step in range(4)}
    title = "full model (small, 8.74M parameters), legacy recipe: init default, LR 0.0001, warmup 0 steps, " * 2
    fig = debug_gradients.heatmap_figure(monitor, title, max_modules=120)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    heatmap = fig.axes[0]
    texts = [heatmap.title] + list(heatmap.get_yticklabels())
    for text in texts:
        box = text.get_window_extent(renderer)
        assert box.x0 >= canvas.x0 - 1 and box.x1 <= canvas.x1 + 1 and box.y1 <= canvas.y1 + 1, text.get_text()
    assert [t.get_text() for t in heatmap.get_yticklabels()] == names
    legend = fig.legends[0].get_window_extent(renderer)
    assert not legend.overlaps(heatmap.get_window_extent(renderer))  # never over a row (the first one included)


# ------------------------------------------------------------------------------------- visualize_attention
def train_tiny(name: str, config: dict, cache: Path, path: Path, steps: int = 3) -> Path:
    """A freshly trained tiny model's checkpoint."""
    torch.manual_seed(0)
    model = build_model(name, config).train()
    optimizer = make_optimizer(model, 1e-3, 0.0)
    scaler = FP32.make_scaler()
    loader = DataLoader(RavdessDataset(cache), batch_size=4, shuffle=True, drop_last=True)
    for _, batch in zip(range(steps), loader):
        train_step(model, batch, optimizer, scaler, FP32)
    save_checkpoint(path, make_state(model, name))
    return path


def visualize(monkeypatch, checkpoint: Path, output: Path, **constants: object) -> list[Path]:
    for key, value in {"CHECKPOINT": str(checkpoint), "OUTPUT_DIR": str(output), **constants}.items():
        monkeypatch.setattr(visualize_attention, key, value)
    return visualize_attention.main()


@pytest.mark.parametrize("name, config, n_maps", [("full", TINY_FULL, 3), ("lite", TINY_LITE, 4)])
def test_attention_figures_of_a_trained_model(name, config, n_maps, tiny_cache, tmp_path, monkeypatch):
    checkpoint = train_tiny(name, config, tiny_cache, tmp_path / "ckpt.pt")
    written = visualize(monkeypatch, checkpoint, tmp_path, CACHE_DIR=str(tiny_cache), CLIP_ID="01-03-01-01-01-01")
    figures = tmp_path / "visualize_attention" / "default" / "figures"
    assert sorted(written) == sorted(figures.glob("*.png"))
    assert len(written) == n_maps + 1 and (figures / "frames_attention.png") in written
    for path in written:
        assert_png(path)
    summary = json.loads((tmp_path / "visualize_attention" / "default" / "attention.json").read_text())
    received = [sum(layer["received"]) for layer in summary["layers"].values()]
    assert summary["clip"] == "01-03-01-01-01-01" and all(math.isclose(r, 1.0, rel_tol=1e-4) for r in received)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="writing an mp4 with sound needs ffmpeg")
def test_attention_figures_from_a_video_file(tiny_cache, tmp_path, monkeypatch):
    video = make_synthetic_ravdess(tmp_path / "video", actors=(2,), takes=1, emotions=(5,), files=("av",),
                                   seconds=1.0)[0]
    checkpoint = train_tiny("lite", TINY_LITE, tiny_cache, tmp_path / "ckpt.pt", steps=1)
    written = visualize(monkeypatch, checkpoint, tmp_path, CACHE_DIR=str(tiny_cache), VIDEO_FILE=str(video))
    assert (tmp_path / "visualize_attention" / "default" / "figures" / "frames_attention.png") in written
    for path in written:
        assert_png(path)


@pytest.mark.parametrize("name, config, message", [
    ("simple", TINY_SIMPLE, "the 'simple' model has no attention layers"),
    ("simple", TINY_SIMPLE, "python train_lite_model.py --width=64 --frame_backbone=small --fusion_layers=1 "
                            "--fusion=cross_attention"),  # the quick-start model's refusal names what works
    ("lite", {**TINY_LITE, "fusion": "concat"}, "fuses by 'concat', attention pooling only"),
])
def test_model_without_attention_gets_one_line(name, config, message, tiny_cache, tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "ckpt.pt"
    save_checkpoint(checkpoint, make_state(build_model(name, config), name))
    for key, value in {"CHECKPOINT": str(checkpoint), "OUTPUT_DIR": str(tmp_path), "CACHE_DIR": str(tiny_cache)}.items():
        monkeypatch.setattr(visualize_attention, key, value)
    with pytest.raises(SystemExit) as exit_info:
        run_script(visualize_attention.main, vars(visualize_attention), [])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err
