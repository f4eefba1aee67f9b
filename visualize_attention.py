"""Draw the attention maps of a trained model's fusion for one clip.

Loads a checkpoint or a run folder (the model is rebuilt from the name and config stored in it), runs one clip -
from the cache its run trained on (or CACHE_DIR; action units standardised with the training statistics stored in
the checkpoint), or a video and/or sound file through the preprocessing of training - and collects the attention weights of every
attention layer through the model's `attention_maps(batch)` (the LFM2 attention blocks of the full model, the
cross-attention or transformer layers of the Lite model, plus their attention pooling). Writes, to
checkpoints/visualize_attention/<RUN_NAME>/figures/:
- attention_<i>_<layer>.png: token-by-token weights (mean over heads), audio and visual segments labelled;
- frames_attention.png: the clip's face crops with the attention each frame receives in each layer.

    python visualize_attention.py --checkpoint=checkpoints/train_full_model/full --clip_id=01-05-02-01-02-12
    python visualize_attention.py --checkpoint=checkpoints/train_lite_model/lite/fold0 --video_file=clip.mp4
Colab: `!python visualize_attention.py --checkpoint=/content/drive/MyDrive/ckpt_best.pt --video_file=/content/clip.mp4`
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

import models
from data.calibration import CalibrationSettings, PersonProfile, person_profiles
from data.dataset import IMAGENET_MEAN, IMAGENET_STD, RavdessDataset, load_manifest
from data.preprocess import ClipError, Settings
from data.ravdess import DataError
from data.setup import cache_plan, run_data_settings
from data.windows import read_windows, to_batch
from models.layers import AttentionMap
from training.checkpoint import (load_checkpoint, rebuild_model, resolve_checkpoint, stored_calibration,
                                 stored_feature_stats)
from common.config import ConfigError, config_keys, run_script
from training.runs import RunFolder
from training.runtime import resolve_device

# --- model ---
CHECKPOINT = ""  # a training run folder (its best checkpoint) or a ckpt_*.pt file (required)
DEVICE = "auto"  # "auto", "cpu", "cuda" or "cuda:1"
# --- clip: from a cache, or from files ---
CACHE_DIR = ""  # a cache of data/prepare_ravdess.py; "" = the one the checkpoint's run trained on (its run config)
CLIP_ID = ""  # take key in the cache, e.g. 01-05-02-01-02-12; "" = the cache's first clip
FEATURE_FILE = ""  # per-clip feature .npz for a model whose visual input is features; "" = its run's
VIDEO_FILE = ""  # a video file (face frames, and its sound unless AUDIO_FILE is given); overrides the cache
AUDIO_FILE = ""  # a sound file (wav, flac, mp3); overrides the cache
PROFILE = ""  # a person profile (.npz from predict.py --save_profile) calibrating VIDEO_FILE / AUDIO_FILE; "" = none
# --- output ---
RUN_NAME = "default"  # checkpoints/visualize_attention/<RUN_NAME>/
OUTPUT_DIR = "checkpoints"
DPI = 110

POOL_QUERY = "pool_query"  # the query label the models give the single query of an attention-pooling map


def load_model(path: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's model in eval mode on `device`, and the checkpoint (a run folder gives its best one)."""
    if not path:
        raise ConfigError("say which checkpoint to visualise: --checkpoint=path/to/run_folder or .../ckpt_best.pt")
    resolved = resolve_checkpoint(path)
    state = load_checkpoint(resolved)
    model = rebuild_model(state, resolved)
    return model.to(device).eval(), state


def training_inputs(state: dict) -> tuple[Path | None, str]:
    """The cache and feature file to read: CACHE_DIR / FEATURE_FILE when given, else those the checkpoint's run
    trained on (from the run config stored in it; None / "" when it stores none)."""
    data = run_data_settings(state.get("run_config") or {})
    cache = Path(CACHE_DIR).expanduser() if CACHE_DIR else cache_plan(data)[1] if data else None
    return cache, FEATURE_FILE or (data.feature_file if data else "")


def check_has_attention(model: torch.nn.Module, name: str) -> None:
    if not hasattr(model, "attention_maps"):
        raise ConfigError(f"the '{name}' model has no attention layers (late fusion by concatenation): nothing to "
                          "visualise; a model that has them: python train_lite_model.py --width=64 "
                          "--frame_backbone=small --fusion_layers=1 --fusion=cross_attention, then python "
                          "visualize_attention.py --checkpoint=checkpoints/train_lite_model/lite")


def attention_layers(model: torch.nn.Module, name: str, batch: dict) -> list[AttentionMap]:
    """The model's attention maps; a one-line error when they are pooling maps only (a Lite model whose fusion
    pools each modality by itself has no attention between tokens)."""
    maps = model.attention_maps(batch)
    if all(m.query_labels == [POOL_QUERY] for m in maps):
        fusion = model.config.get("fusion", "?")
        raise ConfigError(f"this '{name}' model fuses by '{fusion}', attention pooling only (no attention layers "
                          "between tokens): nothing to visualise; cross_attention and transformer fusions have them")
    return maps


def clip_from_cache(model: torch.nn.Module, state: dict, cache: Path | None, feature_file: str) -> tuple[dict, str]:
    """CLIP_ID of the cache as the model saw it in training; per-clip features are standardised with the
    training statistics stored in the checkpoint."""
    if cache is None:
        raise ConfigError("the checkpoint names no training cache: give --cache_dir=..., or --video_file / "
                          "--audio_file")
    config = model.config
    modalities = tuple(config.get("modalities", ("audio", "visual")))
    visual = config.get("visual_input", "frames") if "visual" in modalities else None
    stats = stored_feature_stats(state)
    if visual == "features" and stats is None:
        print("warning: the checkpoint stores no feature statistics (written before they were stored): the "
              "features go in unstandardised, unlike in training", file=sys.stderr)
    dataset = RavdessDataset(cache, visual=visual, modalities=modalities, features_file=feature_file or None,
                             feature_stats=stats)
    calibration = stored_calibration(state)
    if calibration and calibration[0]["mode"] == "person":  # each actor by that actor's clips, as in training
        dataset.population = calibration[1]
        dataset.profiles = person_profiles(dataset, CalibrationSettings(**calibration[0]))[0]
        print(f"inputs calibrated as in training: {CalibrationSettings(**calibration[0]).describe()}")
    ids = [record.clip_id for record in dataset.records]
    if not ids:
        raise DataError(f"cache {cache} holds no clips")
    clip_id = CLIP_ID or ids[0]
    if clip_id not in ids:
        raise DataError(f"clip {clip_id} is not in cache {cache} (e.g. {', '.join(ids[:3])})")
    return default_collate([dataset[ids.index(clip_id)]]), clip_id


def clip_from_files(model: torch.nn.Module, state: dict, cache: Path | None) -> tuple[dict, str]:
    """One centred window of the files, preprocessed as in training (the cache's settings when there is one)."""
    settings = Settings(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in load_manifest(cache)["settings"].items()}) \
        if cache is not None and (cache / "manifest.json").exists() else Settings()
    visual_input = model.config.get("visual_input", "frames")
    try:
        video = read_windows(Path(VIDEO_FILE), settings, audio=not AUDIO_FILE, frames=True, hop=settings.seconds,
                             max_windows=1) if VIDEO_FILE else None
        sound = read_windows(Path(AUDIO_FILE), settings, audio=True, frames=False, hop=settings.seconds,
                             max_windows=1) if AUDIO_FILE else None
    except (ClipError, OSError) as err:
        raise DataError(str(err)) from None
    windows = replace(video, logmel=sound.logmel) if video and sound else video or sound
    batch = to_batch(windows, settings, visual_input, model.config.get("feature_dim", 35), file_calibration(state))
    return batch, " + ".join(Path(f).name for f in (VIDEO_FILE, AUDIO_FILE) if f)


def file_calibration(state: dict):
    """PROFILE's calibration of file inputs onto the checkpoint's training population (None without PROFILE)."""
    calibration = stored_calibration(state)
    if not PROFILE:
        if calibration and calibration[0]["mode"] == "person":
            print("the model was trained with person calibration: without --profile the clip is taken as the "
                  "average training actor's")
        return None
    if calibration is None:
        raise ConfigError("this checkpoint was written before person calibration existed: --profile cannot apply")
    profile = PersonProfile.load(PROFILE).for_model(*calibration)
    print(f"calibration: person profile '{profile.person}' ({profile.describe()})")
    return lambda kind, x: profile.calibrate(kind, x, calibration[1])


# ------------------------------------------------------------------------------------------------- figures
def _label_color(label: str) -> str:
    return {"audio": "tab:blue", "visual": "tab:orange"}.get(label.split("_")[0], "black")


def _segment_lines(ax, labels: list[str], axis: str) -> None:
    """A line where the audio segment ends and the visual one begins."""
    kinds = [label.split("_")[0] for label in labels]
    for i in range(1, len(kinds)):
        if kinds[i] != kinds[i - 1]:
            (ax.axvline if axis == "x" else ax.axhline)(i - 0.5, color="white", linewidth=1.5)


def plot_attention_map(attention: AttentionMap, path: Path, title: str) -> Path:
    """Token-by-token weights of one layer, averaged over heads; tick labels coloured by modality."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = attention.weights[0].float().mean(dim=0).cpu().numpy()  # (Lq, Lk)
    lq, lk = weights.shape
    fig, ax = plt.subplots(figsize=(2.5 + 0.32 * lk, 1.8 + 0.32 * lq))
    image = ax.imshow(weights, cmap="magma", vmin=0, aspect="auto")
    ax.set_xticks(range(lk), attention.key_labels, rotation=90, fontsize=7)
    ax.set_yticks(range(lq), attention.query_labels, fontsize=7)
    for tick, label in zip(ax.get_xticklabels(), attention.key_labels):
        tick.set_color(_label_color(label))
    for tick, label in zip(ax.get_yticklabels(), attention.query_labels):
        tick.set_color(_label_color(label))
    _segment_lines(ax, attention.key_labels, "x")
    _segment_lines(ax, attention.query_labels, "y")
    ax.set(xlabel="key (attended to)", ylabel="query")
    ax.set_title(f"{title}\n{attention.layer} (mean of {attention.weights.shape[1]} heads)", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.04, label="attention weight")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def frame_attention(attention: AttentionMap, n_frames: int) -> np.ndarray | None:
    """Attention each frame receives in one layer: the mean over heads and queries of the weight on each visual
    key token, spread back over the frames that token pooled (the encoders pool N frames to their token count by
    adaptive average pooling). None when the layer attends to no visual token."""
    columns = [i for i, label in enumerate(attention.key_labels) if label.startswith("visual_")]
    if not columns:
        return None
    per_token = attention.weights[0].float().mean(dim=(0, 1))[columns].cpu().numpy()
    n_tokens = len(columns)
    per_frame = np.zeros(n_frames)
    counts = np.zeros(n_frames)
    for j, value in enumerate(per_token):  # adaptive pooling bins: [floor(jN/T), ceil((j+1)N/T))
        start, end = (j * n_frames) // n_tokens, -((-(j + 1) * n_frames) // n_tokens)
        per_frame[start:end] += value
        counts[start:end] += 1
    return per_frame / np.maximum(counts, 1)


def plot_frames(frames: torch.Tensor, maps: list[AttentionMap], path: Path, title: str) -> Path | None:
    """The face crops, and below them one row per layer with the attention each frame receives."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = (frames[0].float().cpu() * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    rows = [(m.layer, a) for m in maps if (a := frame_attention(m, len(images))) is not None]
    if not rows:
        return None
    n = len(images)
    fig = plt.figure(figsize=(1.2 * n + 2.5, 1.6 + 0.3 * len(rows)))
    grid = fig.add_gridspec(2, n, height_ratios=[1.4, 0.25 * len(rows) + 0.2], hspace=0.15)
    share = np.mean([a / a.sum() for _, a in rows], axis=0)  # each layer's share of the visual attention
    for i, image in enumerate(images):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(image)
        ax.set_xticks([])
        ax.set_yticks([])
        level = (share[i] - share.min()) / (np.ptp(share) + 1e-12)  # 0: least attended frame, 1: most
        for spine in ax.spines.values():
            spine.set(color=plt.cm.viridis(level), linewidth=1 + 4 * level)
        ax.set_title(f"frame {i}\n{share[i]:.0%}", fontsize=7)
    ax = fig.add_subplot(grid[1, :])
    matrix = np.stack([a for _, a in rows])
    image = ax.imshow(matrix, cmap="viridis", aspect="auto", vmin=0)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=6)
    ax.set_xticks(range(n), range(n), fontsize=6)
    ax.set_xlabel("frame (attention received, mean over heads and queries)", fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.02)
    fig.suptitle(f"{title}: each frame's share of the attention on visual tokens (mean over layers), and the "
                 "attention it receives per layer", fontsize=8, y=1.04)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def main() -> list[Path]:
    device = resolve_device(DEVICE)
    model, state = load_model(CHECKPOINT, device)
    name = state["model_name"]
    check_has_attention(model, name)
    cache, feature_file = training_inputs(state)
    if PROFILE and not (VIDEO_FILE or AUDIO_FILE):
        raise ConfigError("--profile calibrates --video_file / --audio_file; a cache clip is calibrated by its "
                          "actor's own clips, as in training")
    batch, clip = clip_from_files(model, state, cache) if (VIDEO_FILE or AUDIO_FILE) else \
        clip_from_cache(model, state, cache, feature_file)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    maps = attention_layers(model, name, batch)
    run = RunFolder("visualize_attention", RUN_NAME, root=OUTPUT_DIR)
    run.write_config({k: globals()[k] for k in config_keys(globals())})
    title = f"{name} model, clip {clip}"
    written = []
    for index, attention in enumerate(maps):
        slug = re.sub(r"[^A-Za-z0-9]+", "_", attention.layer).strip("_")
        written.append(plot_attention_map(attention, run.figure_path(f"attention_{index:02d}_{slug}.png"), title))
    if batch.get("frames") is not None and bool(batch["has_visual"][0]):
        frames_png = plot_frames(batch["frames"], maps, run.figure_path("frames_attention.png"), title)
        written += [frames_png] if frames_png else []
    summary = {m.layer: {"query_labels": m.query_labels, "key_labels": m.key_labels,
                         "received": m.weights[0].float().mean(dim=(0, 1)).cpu().tolist()} for m in maps}
    (run.dir / "attention.json").write_text(json.dumps({"clip": clip, "layers": summary}, indent=1))
    kinds = sum(1 for m in maps if m.query_labels != [POOL_QUERY])
    print(f"{title}: {kinds} attention layer(s) and {len(maps) - kinds} pooling map(s)")
    for path in written:
        print(f"  {path}")
    return written


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:], user_errors=(DataError, models.ModelConfigError))
