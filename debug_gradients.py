"""Watch every module of a model for a few training steps, and name the first one that produces NaN/inf.

Runs N training steps (the same `train_step` as the training scripts) with hooks on every module, recording per
module and step the activation statistics (max |x|, mean, fraction non-finite) and the true-scale gradient norms
(read after the GradScaler unscaled them, so float16 loss scaling does not hide their size). It stops at the first
module whose output or gradient is non-finite and names it: module path, type, statistics of its inputs and
output, the step. Outputs go to checkpoints/debug_gradients/<RUN_NAME>/: module_stats.jsonl (one line per module
and step), steps.jsonl (loss, global gradient norm, loss scale), figures/grad_norm_heatmap.png (modules x steps,
log10 gradient norm; when no step got as far as gradients, e.g. a loss already non-finite at step 0, it is
figures/activation_heatmap.png instead: log10 max |activation|) and report.txt. A RUN_NAME whose folder already
holds a report is not overwritten: the outputs go to the next free name (default_2, default_3, ...), as printed.

`--legacy_cause=NAME` recreates one plausible cause of the original 149M model's first-batch NaN (issue 12; the
table in docs/first_batch_nan.md): the full model's legacy switches for it (with `--recipe=legacy` only) plus
what the original model's weights or data held (with either recipe: emulated massive activations, a zero-padded
clip, a silent clip, a missing modality, each made through data/preprocess.py the legacy or the stable way). `--legacy_cause=all` puts
every cause in at once.

`--replay=path/to/crash.pt` instead replays the batch of a crash dump written by a training script
(`RunFolder.save_crash_dump`) on the model state saved with it, with hooks on every module, and names the first
module that produced NaN/inf.

    python debug_gradients.py --model=full --recipe=legacy --steps=30
    python debug_gradients.py --recipe=legacy --legacy_cause=mask_fill --steps=1
    python debug_gradients.py --recipe=stable --legacy_cause=all --steps=300
    python debug_gradients.py --model=lite --data=cache --cache_dir=cache/ravdess --steps=50
    python debug_gradients.py --replay=checkpoints/train_full_model/run1/crash/crash.pt
Colab: `!python debug_gradients.py --model=full --recipe=legacy --model_size=real --device=cuda`
"""
from __future__ import annotations

import difflib
import itertools
import json
import math
import sys
import textwrap
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle

import models
from data.dataset import RavdessDataset
from data.preprocess import NoSound, Settings, audio_features, fix_length, log_mel, read_audio
from models.lfm2 import LFM2Stack
from data.ravdess import DataError
from data.synthetic import make_synthetic_cache
from training.checkpoint import load_checkpoint, rebuild_model
from common.config import ConfigError, config_keys, run_script
from training.monitor import ModuleMonitor
from training.runs import RunFolder
from training.runtime import Runtime, setup_runtime
from training.stages import make_optimizer
from training.step import NonFiniteLossError, cross_entropy, move_batch, set_lr, train_step

# --- model ---
MODEL = "full"  # simple | lite | full
_MODEL_CHOICES = ("simple", "lite", "full")
MODEL_SIZE = "small"  # small: CPU-sized widths with the real block layout | real: the constructors' defaults
_MODEL_SIZE_CHOICES = ("small", "real")
MODEL_CONFIG = {}  # extra constructor arguments over the size's config, e.g. "{'width': 128}"
# --- recipe ---
RECIPE = "legacy"  # legacy: the original 149M recipe | stable: this toolkit's recipe (see RECIPES)
_RECIPE_CHOICES = ("legacy", "stable")
INIT = None  # None: the recipe's; else default | xavier | kaiming | scaled_residual | zero_residual
_INIT_CHOICES = (None, "default", "xavier", "kaiming", "scaled_residual", "zero_residual")
LR = None  # None: the recipe's learning rate
WARMUP_STEPS = None  # None: the recipe's linear warmup length, in steps
CLIP_NORM = None  # None: the recipe's global gradient-norm clip (0 turns clipping off)
QK_NORM = None  # None: the recipe's (full model only)
WEIGHT_DECAY = 0.01
LEGACY_CAUSE = ""  # "" none | a name in LEGACY_CAUSES | "all" (full model only)
# --- data ---
DATA = "synthetic"  # synthetic: a small rendered cache (64 clips) | cache: a cache written by data/prepare_ravdess.py
_DATA_CHOICES = ("synthetic", "cache")
CACHE_DIR = "checkpoints/cache/RAVDESS"  # used when DATA == "cache"
VISUAL_INPUT = "frames"  # frames (face crops from the cache) | features (per-clip vectors from FEATURE_FILE)
_VISUAL_INPUT_CHOICES = ("frames", "features")
FEATURE_FILE = ""  # .npz of per-clip visual features, e.g. ../shared/data/ravdess_clip_features/au_mfcc.npz
SYNTHETIC_FRAMES = 8  # frames per synthetic clip
SYNTHETIC_SIZE = 64  # px, synthetic face crops
BATCH_SIZE = 8
# --- run ---
STEPS = 30  # training steps to watch
REPLAY = ""  # path to a crash.pt: replay its batch instead of training
DEVICE = "auto"  # auto | cpu | cuda | cuda:1
_DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:1")
AMP_DTYPE = None  # None: the recipe's | auto | float32 | float16 | bfloat16
_AMP_DTYPE_CHOICES = (None, "auto", "float32", "float16", "bfloat16")
SEED = 0
# --- output ---
RUN_NAME = "default"  # checkpoints/debug_gradients/<RUN_NAME>/ (taken: <RUN_NAME>_2, _3, ... instead)
OUTPUT_DIR = "checkpoints"
HEATMAP_MAX_MODULES = 120  # rows of the heatmap: the modules with the largest gradient norms when there are more

# The two recipes compared. "legacy" is how the original 149M model was trained (it produced NaN from the first
# batch on a T4); "stable" is this toolkit's (QK-norm, depth-scaled init, warmup, clipping at 1.0). Both use the
# same LR and precision, so a difference between them comes from the other four settings.
RECIPES = {
    "legacy": {"init": "default", "lr": 1e-4, "warmup_steps": 0, "clip_norm": 0.0, "qk_norm": False,
               "amp_dtype": "float16"},
    "stable": {"init": "scaled_residual", "lr": 1e-4, "warmup_steps": 10, "clip_norm": 1.0, "qk_norm": True,
               "amp_dtype": "float16"},
}
# The plausible causes of the original first-batch NaN (issue 12). "legacy": the full model's constructor switches
# that recreate what the original did (applied with RECIPE="legacy" only). "present": what the original's weights
# held (applied with both recipes: the stable recipe must survive it). "inputs": clips put into every batch, made
# through data/preprocess.py the legacy way or the stable way (`cause_batches`).
MASSIVE_ACTIVATIONS = 10000.0  # knob of the emulated massive activations (see models.lfm2.plant_massive_activations)
LEGACY_CAUSES = {
    # A bfloat16-trained model's massive activations: its MLP product overflows float16.
    "massive_activations": {"legacy": {"float32_mlp_product": False},
                            "present": {"massive_activations": MASSIVE_ACTIVATIONS}},
    # The same activations through norms computed in float16 (a model loaded in float16).
    "float16_norms": {"legacy": {"float32_norms": False, "float32_residual": False},
                      "present": {"massive_activations": MASSIVE_ACTIVATIONS}},
    # Each layer called three times in a row, float16 residual stream as in the original.
    "repeated_layer_calls": {"legacy": {"repeat_layer_calls": 3, "float32_residual": False}},
    # Hugging Face LFM2's causal attention + a missing modality masked with -1e9 added in float16.
    "mask_fill": {"legacy": {"causal_attention": True, "attention_mask_fill": -1e9},
                  "inputs": ("missing_audio", "missing_visual")},
    # A clip shorter than the window, zero-padded, log-mel without eps: log(0) = -inf.
    "log_of_zero": {"inputs": ("zero_padded_audio",)},
    # A silent clip standardised per clip: (x - mean) / std = 0 / 0.
    "silent_clip": {"inputs": ("silent_audio",)},
}
# The sample of every batch that each input replaces (a batch needs at least 4 samples).
INPUT_SLOTS = {"zero_padded_audio": 0, "silent_audio": 1, "missing_audio": 2, "missing_visual": 3}

# Small widths for a CPU. The full model keeps LFM2's 16-block layout (6 attention blocks), its head size (64: the
# attention logits' scale depends on it), the 3:1 ratio of query to key/value heads and the MLP ratio.
SMALL_CONFIGS = {
    "simple": {"channels": [8, 16, 16]},
    "lite": {"width": 64, "audio_channels": [8, 16, 32, 64], "frame_backbone": "tiny"},
    "full": {"width": 192, "n_heads": 3, "n_kv_heads": 1, "mlp_hidden": 704, "audio_channels": [8, 16, 32, 64],
             "frame_backbone": "tiny", "frame_input_size": 48},
}


def recipe_value(name: str, override: object) -> object:
    if RECIPE not in RECIPES:
        raise ConfigError(f"RECIPE='{RECIPE}': choose {' or '.join(RECIPES)}")
    return RECIPES[RECIPE][name] if override is None else override


def legacy_cause(name: str) -> dict:
    """The cause `name` ("all": every cause merged) as {"legacy": {...}, "present": {...}, "inputs": (...)}."""
    if name == "all":
        causes = list(LEGACY_CAUSES.values())
    elif name in LEGACY_CAUSES:
        causes = [LEGACY_CAUSES[name]]
    else:
        close = difflib.get_close_matches(name, list(LEGACY_CAUSES), n=1)
        raise ConfigError(f"LEGACY_CAUSE='{name}': choose all or one of {', '.join(LEGACY_CAUSES)}"
                          + (f" (did you mean {close[0]}?)" if close else ""))
    merged: dict = {"legacy": {}, "present": {}, "inputs": ()}
    for cause in causes:
        merged["legacy"].update(cause.get("legacy", {}))
        merged["present"].update(cause.get("present", {}))
        merged["inputs"] += tuple(i for i in cause.get("inputs", ()) if i not in merged["inputs"])
    return merged


def cause_model_config(name: str, legacy: bool) -> dict:
    """The full model's constructor switches of cause `name` under the legacy (or the stable) recipe."""
    if not name:
        return {}
    cause = legacy_cause(name)
    return {**cause["present"], **(cause["legacy"] if legacy else {})}


def model_config(dataset: RavdessDataset) -> dict:
    if MODEL_SIZE not in ("small", "real"):
        raise ConfigError(f"MODEL_SIZE='{MODEL_SIZE}': choose small or real")
    if LEGACY_CAUSE and MODEL != "full":
        raise ConfigError(f"LEGACY_CAUSE is for the full model, not MODEL='{MODEL}'")
    config = dict(SMALL_CONFIGS.get(MODEL, {})) if MODEL_SIZE == "small" else {}
    config.update(visual_input=VISUAL_INPUT, feature_dim=dataset.feature_dim or 35)
    if MODEL == "full":
        config["qk_norm"] = recipe_value("qk_norm", QK_NORM)
        config.update(cause_model_config(LEGACY_CAUSE, RECIPE == "legacy"))
    return {**config, **MODEL_CONFIG}


# ------------------------------------------------------------------------------------------- legacy inputs
def short_recording(seconds: float = 1.0, sample_rate: int = 16000) -> np.ndarray:
    """A voiced sound (harmonics of 150 Hz with a little noise) shorter than the clip window."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 6))
    return (0.1 * wave + 0.01 * np.random.default_rng(0).standard_normal(len(t))).astype(np.float32)


def standardise_per_clip(logmel: np.ndarray) -> np.ndarray:
    """The legacy per-clip standardisation of a log-mel: 0 / 0 = NaN for a silent clip, whose log-mel is
    constant. (The stable AudioEncoder standardises with BatchNorm over the batch, never per clip.)"""
    with np.errstate(invalid="ignore", divide="ignore"):  # the NaN is what this legacy step is kept to show
        return (logmel - logmel.mean()) / logmel.std()


def input_logmel(kind: str, n_frames: int, legacy: bool, folder: Path) -> np.ndarray | None:
    """(n_mels, n_frames) log-mel of the clip `kind` ("zero_padded_audio" or "silent_audio"), written to a wav in
    `folder` and read back. Legacy: read, pad, log-mel without eps (+ per-clip standardisation for the silent
    clip). Stable: `data.preprocess.audio_features`, the cache writer's path (silence -> audio absent: None;
    eps; non-finite values refused)."""
    settings = Settings()
    n_samples = (n_frames - 1) * settings.hop  # a centred STFT gives 1 + n_samples // hop frames
    wave = short_recording() if kind == "zero_padded_audio" else np.zeros(n_samples, dtype=np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}.wav"
    sf.write(path, wave, settings.sample_rate, subtype="FLOAT")
    if not legacy:
        try:
            return audio_features(path, Settings(seconds=n_samples / settings.sample_rate))
        except NoSound:
            return None
    mel = log_mel(fix_length(read_audio(path), n_samples), settings, eps=0.0)
    return standardise_per_clip(mel) if kind == "silent_audio" else mel


def cause_batches(batches: Iterable[dict], inputs: Iterable[str], legacy: bool, folder: Path) -> Iterator[dict]:
    """`batches` with the inputs of a legacy cause in the samples of INPUT_SLOTS: a clip's audio replaced by the
    log-mel `input_logmel` makes, or a modality marked missing (its tensor zeroed, as the dataset does)."""
    inputs = tuple(inputs)
    made: dict[tuple[str, int], np.ndarray | None] = {}
    for batch in batches:
        batch = dict(batch, has_audio=batch["has_audio"].clone(), has_visual=batch["has_visual"].clone(),
                     audio=batch["audio"].clone())
        if len(batch["label"]) < len(INPUT_SLOTS):
            raise ConfigError(f"a legacy cause needs BATCH_SIZE >= {len(INPUT_SLOTS)}")
        for kind in inputs:
            slot = INPUT_SLOTS[kind]
            if kind in ("missing_audio", "missing_visual"):
                modality = kind.split("_")[1]
                batch[f"has_{modality}"][slot] = False
                key = "audio" if modality == "audio" else VISUAL_INPUT
                if key in batch:
                    batch[key] = batch[key].clone()
                    batch[key][slot] = 0.0
                continue
            n_frames = batch["audio"].shape[-1]
            if (kind, n_frames) not in made:
                made[kind, n_frames] = input_logmel(kind, n_frames, legacy, folder)
            mel = made[kind, n_frames]
            batch["has_audio"][slot] = mel is not None
            batch["audio"][slot] = 0.0 if mel is None else torch.from_numpy(mel)[None]
        yield batch


def make_dataset() -> RavdessDataset:
    """The clips to train on: a small synthetic cache (rendered on first use, then reused) or CACHE_DIR."""
    if DATA == "synthetic":
        if VISUAL_INPUT != "frames":
            raise ConfigError("DATA='synthetic' has face frames only; use --visual_input=frames")
        cache = Path(OUTPUT_DIR) / "debug_gradients" / f"synthetic_cache_{SYNTHETIC_FRAMES}x{SYNTHETIC_SIZE}"
        if not (cache / "manifest.json").exists():
            make_synthetic_cache(cache, n_frames=SYNTHETIC_FRAMES, size=SYNTHETIC_SIZE)
    elif DATA == "cache":
        cache = Path(CACHE_DIR)
    else:
        raise ConfigError(f"DATA='{DATA}': choose synthetic or cache")
    return RavdessDataset(cache, visual=VISUAL_INPUT, features_file=FEATURE_FILE or None)


def make_batches(dataset: RavdessDataset, n_batches: int) -> Iterator[dict]:
    """`n_batches` shuffled training batches, loaded one at a time, cycling over the clips as often as needed."""
    if len(dataset) < BATCH_SIZE:
        raise ConfigError(f"{len(dataset)} clips are fewer than BATCH_SIZE={BATCH_SIZE}")
    loader = DataLoader(dataset, BATCH_SIZE, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(SEED))
    return itertools.islice((batch for _ in itertools.count() for batch in loader), n_batches)


# ------------------------------------------------------------------------------------------------- outputs
# The heatmaps a run can draw: {monitor key: (file name, colour-bar label, legend of the red cells)}.
HEATMAPS = {"grad_norm": ("grad_norm_heatmap.png", "log10 gradient norm (true scale)",
                          "non-finite (incl. float16 overflows that the GradScaler skipped)"),
            "act_max_abs": ("activation_heatmap.png", "log10 max |activation| (finite values)",
                            "output with a non-finite value")}


def heatmap_values(monitor: ModuleMonitor, key: str) -> tuple[list[str], list[int], list[list[float | None]]]:
    """(modules, steps, values) of `key` for a heatmap; an activation cell with any non-finite value is inf (its
    max |x| is over the finite values only), so that it is drawn red like a non-finite gradient."""
    names, steps, values = monitor.grad_norm_matrix(key)
    if key == "act_max_abs":
        _, _, fractions = monitor.grad_norm_matrix("act_non_finite")
        values = [[math.inf if f else v for v, f in zip(row, fraction_row)]
                  for row, fraction_row in zip(values, fractions)]
    return names, steps, values


def heatmap_figure(monitor: ModuleMonitor, title: str, max_modules: int, key: str = "grad_norm"):
    """The heatmap figure (matplotlib), or None without values: modules x steps, log10 of each module's own
    parameter-gradient norm (or, with `key` "act_max_abs", of its largest activation); non-finite cells in red,
    zero or absent values blank.

    The figure is sized from its contents (label length, modules, steps) and laid out by matplotlib's constrained
    layout, with the legend below the plot, so the title, the module names and the first row stay visible."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, steps, values = heatmap_values(monitor, key)
    if not names:
        return None
    # None: the module had no gradient that step (not run, frozen); NaN/inf: a non-finite gradient.
    missing = np.array([[v is None for v in row] for row in values])
    matrix = np.array([[math.nan if v is None else v for v in row] for row in values], dtype=np.float64)
    if len(names) > max_modules:
        peaks = np.where(np.isfinite(matrix), matrix, np.where(missing, 0.0, np.inf)).max(axis=1)
        keep = np.sort(np.argsort(-peaks)[:max_modules])
        names, matrix, missing = [names[i] for i in keep], matrix[keep], missing[keep]
    bad = ~np.isfinite(matrix) & ~missing
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(np.where(np.isfinite(matrix) & (matrix > 0), matrix, np.nan))
    # 6-point labels are ~0.05 inch per character; the cells get 0.25 inch per step and 0.13 inch per module.
    label_width = 0.05 * max(len(name) for name in names)
    width = min(label_width + 2.5 + max(0.25 * len(steps), 3.0), 24)
    fig, ax = plt.subplots(figsize=(width, min(2.5 + 0.13 * len(names), 60)), layout="constrained")
    image = ax.imshow(logs, aspect="auto", cmap="viridis", interpolation="nearest")
    rows, cols = np.nonzero(bad)
    if len(rows):
        ax.scatter(cols, rows, marker="s", color="red", s=12, label=HEATMAPS[key][2])
        fig.legend(loc="outside lower center", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xticks(range(len(steps)), steps, fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(textwrap.fill(title, max(40, int(width * 14))), fontsize=8)
    fig.colorbar(image, ax=ax, label=HEATMAPS[key][1], fraction=0.04)
    return fig


def plot_heatmap(monitor: ModuleMonitor, folder: Path, title: str, max_modules: int) -> Path | None:
    """The gradient-norm heatmap saved as a PNG in `folder`; the activation heatmap when no step got as far as
    gradients (a loss non-finite at the first step); None when the monitor recorded nothing at all."""
    for key, (name, _, _) in HEATMAPS.items():
        fig = heatmap_figure(monitor, title, max_modules, key)
        if fig is not None:
            break
    else:
        return None
    import matplotlib.pyplot as plt
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    return folder / name


def growth_lines(monitor: ModuleMonitor, key: str, label: str, top: int = 5) -> list[str]:
    """The modules whose `key` grew most between the first and the last step where it was finite."""
    names, _, values = monitor.grad_norm_matrix(key)
    ratios = []
    for name, row in zip(names, values):
        finite = [v for v in row if v is not None and math.isfinite(v)]
        if len(finite) >= 2 and finite[0] > 0:
            ratios.append((finite[-1] / finite[0], name, finite[0], finite[-1], max(finite)))
    ratios.sort(reverse=True)
    if not ratios:
        return []
    return [f"largest growth of {label} (first -> last step):"] + [
        f"  {name}: {first:.3g} -> {last:.3g} (x{ratio:.3g}, max {peak:.3g})"
        for ratio, name, first, last, peak in ratios[:top]]


def largest_lines(monitor: ModuleMonitor, key: str, label: str, top: int = 5) -> list[str]:
    """The modules with the largest `key` at the last recorded step."""
    last = max(monitor.records) if monitor.records else None
    if last is None:
        return []
    ranked = sorted(((r[key], name) for name, r in monitor.records[last].items() if key in r), reverse=True)
    if not ranked:
        return []
    return [f"largest {label} at step {last}:"] + [f"  {name}: {value:.4g}" for value, name in ranked[:top]]


def fusion_lines(steps: list[dict]) -> list[str]:
    """First, largest and last value of the fusion's attention logits and residual stream (full model only)."""
    lines = []
    for suffix, label in (("attn_logit_max", "largest finite attention logit"),
                          ("act_max", "largest finite residual value")):
        per_step = [max((v for k, v in s.items() if k.endswith(suffix)), default=None) for s in steps]
        per_step = [v for v in per_step if v is not None]
        if per_step:
            lines.append(f"fusion {label} (over blocks): first {per_step[0]:.4g}, max {max(per_step):.4g}, "
                         f"last {per_step[-1]:.4g}")
    return lines


def write_outputs(run: RunFolder, monitor: ModuleMonitor, steps: list[dict], header: list[str]) -> str:
    """module_stats.jsonl, steps.jsonl, the heatmap and report.txt; returns the report's text."""
    with open(run.dir / "module_stats.jsonl", "w") as f:
        for row in monitor.rows():
            f.write(json.dumps(row) + "\n")
    with open(run.dir / "steps.jsonl", "w") as f:
        for row in steps:
            f.write(json.dumps(row) + "\n")
    event = monitor.first_non_finite()
    lines = list(header)
    if steps:
        finite = [s["grad_norm"] for s in steps if math.isfinite(s["grad_norm"])]
        lines.append(f"loss: step {steps[0]['step']} {steps[0]['loss']:.4g} -> step {steps[-1]['step']} "
                     f"{steps[-1]['loss']:.4g}")
        if finite:
            lines.append(f"global gradient norm (true scale, before clipping): first {finite[0]:.4g}, "
                         f"max {max(finite):.4g}, last {finite[-1]:.4g}")
        lines += fusion_lines(steps)
        skipped = [s["step"] for s in steps if s.get("skipped")]
        if skipped:
            lines.append(f"GradScaler skipped {len(skipped)} step(s) for float16 overflow: {skipped}")
    for step, module in sorted(monitor.overflows.items()):
        lines.append(f"step {step}: the loss-scaled float16 gradients overflowed (first seen at {module}); with a "
                     "loss scale above 1 the scaler skips the step and halves the scale: not an error")
    lines.append(event.describe() if event is not None else
                 f"no non-finite activation or gradient in {len(monitor.records)} step(s)")
    lines += largest_lines(monitor, "grad_norm", "parameter-gradient norm")
    lines += growth_lines(monitor, "grad_norm", "parameter-gradient norm")
    lines += largest_lines(monitor, "act_max_abs", "max |activation|")
    title = f"{header[0]}" + (f" - first non-finite: {event.module} at step {event.step}" if event else "")
    heatmap = plot_heatmap(monitor, run.dir / "figures", title, HEATMAP_MAX_MODULES)
    lines.append(f"heatmap: {heatmap}" if heatmap else "heatmap: none (no module recorded any value)")
    report = "\n".join(lines) + "\n"
    (run.dir / "report.txt").write_text(report)
    return report


# -------------------------------------------------------------------------------------------------- modes
def finite_max(tensor: torch.Tensor) -> float:
    """Largest finite |value| of `tensor` (0.0 when none is finite), as the module monitor reports it."""
    values = tensor.detach().float().abs()
    return values[torch.isfinite(values)].max().item() if torch.isfinite(values).any() else 0.0


def watch_fusion(model: torch.nn.Module) -> tuple[dict[str, float], list[RemovableHandle]]:
    """For the full model's LFM2 stack: hooks that record, from the training forward itself, the largest |value|
    of the residual stream after each block (`block{i}.act_max`, and per call `block{i}.call{c}.act_max` when
    blocks are repeated) and the largest |attention logit| of each attention block (`block{i}.attn_logit_max`),
    the quantities whose growth precedes a float16 overflow. The caller clears the dict each step. Other models:
    nothing is registered."""
    fusion = getattr(model, "fusion", None)
    if not isinstance(fusion, LFM2Stack):
        return {}, []
    stats: dict[str, float] = {}

    def keep_max(key: str, value: float) -> None:
        stats[key] = max(stats.get(key, value), value)

    def block_hook(index: int):
        def hook(module: torch.nn.Module, args: tuple, output: tuple) -> None:
            calls = stats.setdefault(f"block{index}.calls", 0)
            stats[f"block{index}.calls"] = calls + 1
            value = finite_max(output[0])
            keep_max(f"block{index}.act_max", value)
            if fusion.repeat_calls > 1:
                keep_max(f"block{index}.call{calls % fusion.repeat_calls}.act_max", value)
        return hook

    def logit_hook(index: int):
        def hook(module: torch.nn.Module, args: tuple, output: tuple) -> None:
            q, k = args[0].detach().float(), args[1].detach().float()
            keep_max(f"block{index}.attn_logit_max", finite_max((q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5))
        return hook

    handles = []
    for index, block in enumerate(fusion.blocks):
        handles.append(block.register_forward_hook(block_hook(index)))
        if block.kind == "attn":
            handles.append(block.operator.attention.register_forward_hook(logit_hook(index)))
    return stats, handles


def print_step(record: dict) -> None:
    print(f"step {record['step']}: loss {record['loss']:.4g}, gradient norm {record['grad_norm']:.4g}, "
          f"loss scale {record['scale']:g}" + (", skipped" if record["skipped"] else ""), flush=True)


def watch(model: torch.nn.Module, batches: Iterable[dict], runtime: Runtime, lr: float, warmup: int,
          clip: float | None, weight_decay: float = 0.0,
          on_step: Callable[[dict], None] | None = None) -> tuple[ModuleMonitor, list[dict]]:
    """Train `model` on `batches` with the shared train step and a monitor on every module; stop after the first
    step in which something became non-finite. Returns the monitor (hooks already removed) and one record per
    step (loss, global gradient norm, loss scale, skipped, fusion statistics), each also passed to `on_step`."""
    optimizer = make_optimizer(model, lr, weight_decay)
    scaler = runtime.make_scaler()
    steps: list[dict] = []
    fusion_stats, fusion_hooks = watch_fusion(model)
    with ModuleMonitor(model) as monitor:
        for step, batch in enumerate(batches):
            fusion_stats.clear()
            set_lr(optimizer, lr * min(1.0, (step + 1) / warmup) if warmup else lr)
            monitor.begin_step(step, scaler.get_scale() if scaler.is_enabled() else 1.0)
            batch = move_batch(batch, runtime.device)
            try:
                result = train_step(model, batch, optimizer, scaler, runtime, clip_norm=clip or None,
                                    after_unscale=monitor.read_gradients)
                steps.append({"step": step, "loss": result.loss, "grad_norm": result.grad_norm,
                              "scale": result.scale, "skipped": result.skipped})
            except NonFiniteLossError as err:
                steps.append({"step": step, "loss": err.loss, "grad_norm": math.nan, "scale": monitor.loss_scale,
                              "skipped": True})
            steps[-1].update({k: v for k, v in fusion_stats.items() if not k.endswith(".calls")})
            if on_step is not None:
                on_step(steps[-1])
            if monitor.first_non_finite() is not None or not math.isfinite(steps[-1]["loss"]):
                break
    for handle in fusion_hooks:
        handle.remove()
    return monitor, steps


def watch_training(run: RunFolder, runtime: Runtime) -> str:
    """Train the configured model for STEPS steps with a monitor on every module; write the outputs."""
    dataset = make_dataset()
    config = model_config(dataset)
    model = models.build_model(MODEL, config)
    model.init_weights(recipe_value("init", INIT))
    model.to(runtime.device).train()
    lr, warmup = recipe_value("lr", LR), recipe_value("warmup_steps", WARMUP_STEPS)
    clip = recipe_value("clip_norm", CLIP_NORM)
    batches = make_batches(dataset, STEPS)
    if LEGACY_CAUSE:
        batches = cause_batches(batches, legacy_cause(LEGACY_CAUSE)["inputs"], RECIPE == "legacy",
                                run.dir / "inputs")
    monitor, steps = watch(model, batches, runtime, lr, warmup, clip, WEIGHT_DECAY, on_step=print_step)
    params = sum(p.numel() for p in model.parameters())
    header = [f"{MODEL} model ({MODEL_SIZE}, {params / 1e6:.2f}M parameters), {RECIPE} recipe: init "
              f"{recipe_value('init', INIT)}, LR {lr:g}, warmup {warmup} steps, clip "
              f"{clip or 'off'}" + (f", QK-norm {config['qk_norm']}" if "qk_norm" in config else ""),
              f"{runtime.describe()}; data {DATA}, batch {BATCH_SIZE}; {len(steps)} of {STEPS} steps run"]
    if LEGACY_CAUSE:
        cause = legacy_cause(LEGACY_CAUSE)
        switches = cause_model_config(LEGACY_CAUSE, RECIPE == "legacy")
        header.append(f"legacy cause {LEGACY_CAUSE}: model switches {switches}, inputs {list(cause['inputs'])} "
                      f"made the {RECIPE} way")
    return write_outputs(run, monitor, steps, header)


def training_precision(path: Path) -> str:
    """AMP_DTYPE of the training run that wrote the crash dump (its config.json sits one or two folders above
    crash/, two for a cross-validation fold); 'auto' when it cannot be found."""
    for folder in (path.parent.parent, path.parent.parent.parent):
        config = folder / "config.json"
        if config.is_file():
            return json.loads(config.read_text()).get("config", {}).get("AMP_DTYPE", "auto")
    return "auto"


def replay_crash(run: RunFolder, path: Path) -> str:
    """Re-run a crash dump's batch on its saved model state with hooks on every module."""
    state = load_checkpoint(path)
    if "batch" not in state:
        raise ConfigError(f"{path} is a checkpoint, not a crash dump (no batch); crash dumps are crash/crash.pt")
    runtime = setup_runtime(DEVICE, AMP_DTYPE or training_precision(path), SEED)
    model = rebuild_model(state, path)
    # Train mode as in training (batch statistics); dropout draws differ from the failing step's.
    model.to(runtime.device).train()
    scale = float(state["scaler"]["scale"]) if runtime.use_scaler and "scaler" in state else 1.0
    step = int(state.get("progress", {}).get("step", 0))
    batch = move_batch(state["batch"], runtime.device)
    with ModuleMonitor(model) as monitor:
        monitor.begin_step(step, scale)
        with runtime.autocast():
            logits = model(batch)
        loss = cross_entropy(logits, batch)
        if torch.isfinite(loss):
            (loss * scale).backward()
            for param in model.parameters():
                if param.grad is not None:
                    param.grad.div_(scale)
            monitor.read_gradients()
    steps = [{"step": step, "loss": loss.item(), "grad_norm": math.nan, "scale": scale}]
    header = [f"replay of {path} ({state['model_name']} model; training stopped with: "
              f"{state.get('reason', 'unknown')})",
              f"{runtime.describe()}, loss scale {scale:g}; replayed loss {loss.item():.4g}"]
    if monitor.first_non_finite() is None:
        header.append("the replay stayed finite: the failure depends on something not in the dump (another "
                      "dropout draw, precision or device); set --amp_dtype/--device as in the training run")
    return write_outputs(run, monitor, steps, header)


def free_run_name(folder: Path, name: str) -> str:
    """`name`, or `name_2`, `name_3`, ... when `folder/name` already holds a report: a second run never overwrites
    the first one's outputs (the name used is printed with the outputs)."""
    candidate, number = name, 1
    while (folder / candidate / "report.txt").exists():
        number += 1
        candidate = f"{name}_{number}"
    if candidate != name:
        print(f"{folder / name} holds an earlier report: this run writes to {folder / candidate}")
    return candidate


def main() -> None:
    if LEGACY_CAUSE:
        legacy_cause(LEGACY_CAUSE)  # a misspelt cause is reported before any folder or data is made
    run = RunFolder("debug_gradients", free_run_name(Path(OUTPUT_DIR) / "debug_gradients", RUN_NAME),
                    root=OUTPUT_DIR)
    run.write_config({k: globals()[k] for k in config_keys(globals())})
    if REPLAY:
        report = replay_crash(run, Path(REPLAY))
    else:
        runtime = setup_runtime(DEVICE, recipe_value("amp_dtype", AMP_DTYPE), SEED)
        report = watch_training(run, runtime)
    print(report, end="")
    print(f"outputs in {run.dir}")


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:], user_errors=(DataError, models.ModelConfigError))
