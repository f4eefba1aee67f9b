"""Study of the original failure: the full MultimodalFER trained with the legacy recipe vs the stable recipe.

Legacy (what the research plan's 149M model used): PyTorch's default init, no QK-norm, LR 1e-4 with no warmup,
no gradient clipping, float16 autocast. Stable: `scaled_residual` init, QK-norm, warmup, clipping at 1.0, same LR
and precision. Both train the same architecture (the full model's 16-block LFM2 layout and head size, at a width
a CPU can run in float16) on the same synthetic batches, through the project's `training.step.train_step`.

Per step it prints the loss, the true-scale gradient norm (before clipping), the loss scale and whether the
GradScaler skipped the step, the largest |activation| of any fusion module (float16 outputs under autocast, read
by `training.monitor.ModuleMonitor`), the largest |attention logit| (`LFM2Stack.activation_stats`), the L2 norm
of the fusion weights after the step, and whether anything went non-finite (and where first). A float32 probe of
the full-size model at init then shows how far its activations and logits are from float16's limit (65504), and
a probe of the original fusion's size (width 1536, six LFM2 layers) measures how the float16 residual stream grows
when each layer is called one, two or three times in a row (issue 12), with and without emulated massive
activations.

The recipes differ only in what a recipe controls: the architecture's own safeguards (float32 norms, softmax and
residual stream, boolean masks, learned missing-modality tokens) are in place in both.

    python benchmarks/legacy_instability.py
    python benchmarks/legacy_instability.py --steps=40 --amp_dtype=float32 --full_size_probe=False
    python benchmarks/legacy_instability.py --legacy="{'init': 'default', 'qk_norm': False, 'lr': 1e-3, \
        'warmup_steps': 0, 'clip_norm': None}"
    !python benchmarks/legacy_instability.py --visual_input=frames --width=256   # Colab (GPU: set --device=cuda)
"""
from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/...` from anywhere

from models.full import MASSIVE_BLOCK, MultimodalFER  # noqa: E402
from models.lfm2 import LFM2Stack, plant_massive_activations  # noqa: E402
from common.config import ConfigError, run_script  # noqa: E402
from training.monitor import ModuleMonitor  # noqa: E402
from training.runtime import setup_runtime  # noqa: E402
from training.stages import make_optimizer  # noqa: E402
from training.step import NonFiniteLossError, move_batch, set_lr, train_step  # noqa: E402

# --- model: the full model's layout and head size (64), at a smaller width so float16 runs on a CPU
WIDTH = 128  # 768 is the full model
N_HEADS = 2  # width / 64
N_KV_HEADS = 1
MLP_HIDDEN = 480  # the full model's ratio 2816 / 768, rounded
VISUAL_INPUT = "features"  # features (35-d per clip, fast) | frames (ResNet-18 per frame; slow in fp16 on a CPU)
_VISUAL_INPUT_CHOICES = ("features", "frames")
# --- synthetic data
BATCH_SIZE = 8
N_BATCHES = 4  # distinct batches, cycled, so that the loss can go down
AUDIO_FRAMES = 96  # log-mel frames (361 in the real cache; fewer keeps the fp16 CPU convolutions tolerable)
N_FRAMES = 2  # face frames per clip, when VISUAL_INPUT is frames
FRAME_SIZE = 32  # pixels
SIGNAL = 1.0  # strength of the class-dependent pattern added to unit noise
# --- recipes: each a dict with exactly the keys of RECIPE_KEYS (an override gives the whole dict)
LEGACY = {"init": "default", "qk_norm": False, "lr": 1e-4, "warmup_steps": 0, "clip_norm": None}
STABLE = {"init": "scaled_residual", "qk_norm": True, "lr": 1e-4, "warmup_steps": 5, "clip_norm": 1.0}
STEPS = 20  # optimizer steps per recipe
WEIGHT_DECAY = 0.01
# --- precision and runtime
DEVICE = "cpu"  # cpu | cuda | auto
_DEVICE_CHOICES = ("cpu", "cuda", "auto")
AMP_DTYPE = "float16"  # the legacy precision; float32 shows the same recipes without half-precision effects
SEED = 0
FULL_SIZE_PROBE = True  # also one float32 forward of the 150M model at init, legacy vs stable
# --- repeated layer calls at the original fusion's size: LFM2-700M's width and heads, the first six of its layers
REPEAT_PROBE = True
ORIGINAL_WIDTH = 1536
ORIGINAL_HEADS, ORIGINAL_KV_HEADS = 24, 8  # head size 64
ORIGINAL_MLP_HIDDEN = 4608  # assumed (LFM2's auto-adjusted feed-forward size); the growth hardly depends on it
ORIGINAL_LAYOUT = ("conv", "conv", "attn", "conv", "conv", "attn")
MAX_REPEAT = 3  # the original called each layer two or three times
MASSIVE_LEVELS = (0.0, 1000.0, 10000.0)  # emulation knob (models.lfm2.plant_massive_activations); debug: 10000

FP16_MAX = torch.finfo(torch.float16).max
RECIPE_KEYS = {"init", "qk_norm", "lr", "warmup_steps", "clip_norm"}


def synthetic_batches(seed: int) -> list[dict]:
    """Noise plus a fixed random pattern per class, for the audio and the visual input."""
    g = torch.Generator().manual_seed(seed)
    audio_patterns = torch.randn(8, 1, 64, AUDIO_FRAMES, generator=g)
    visual_shape = (35,) if VISUAL_INPUT == "features" else (N_FRAMES, 3, FRAME_SIZE, FRAME_SIZE)
    visual_patterns = torch.randn(8, *visual_shape, generator=g)
    batches = []
    for _ in range(N_BATCHES):
        label = torch.randint(0, 8, (BATCH_SIZE,), generator=g)
        batches.append({
            "audio": torch.randn(BATCH_SIZE, 1, 64, AUDIO_FRAMES, generator=g) + SIGNAL * audio_patterns[label],
            VISUAL_INPUT: torch.randn(BATCH_SIZE, *visual_shape, generator=g) + SIGNAL * visual_patterns[label],
            "has_audio": torch.ones(BATCH_SIZE, dtype=torch.bool),
            "has_visual": torch.ones(BATCH_SIZE, dtype=torch.bool),
            "label": label,
        })
    return batches


def build(recipe: dict, **config) -> MultimodalFER:
    torch.manual_seed(SEED)
    model = MultimodalFER(qk_norm=recipe["qk_norm"], **config)
    model.init_weights(recipe["init"])
    return model


@torch.no_grad()
def probe(model: MultimodalFER, batch: dict, autocast) -> dict[str, float]:
    """Largest residual-stream value and attention logit, in eval mode (BatchNorm statistics untouched)."""
    model.eval()
    with autocast():
        x, positions, _ = model.tokens(batch)
        stats = model.fusion.activation_stats(x, positions)
    logits = [v for k, v in stats.items() if k.endswith("attn_logit_max")]
    return {"logit_max": max(logits), "stream_max": max(v for k, v in stats.items() if k.endswith("act_max"))}


def largest_activation(monitor: ModuleMonitor, step: int) -> float:
    return max((r.get("act_max_abs", 0.0) for r in monitor.records.get(step, {}).values()), default=0.0)


def params_finite(model: MultimodalFER) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@torch.no_grad()
def fusion_weight_norm(model: MultimodalFER) -> float:
    return torch.linalg.vector_norm(torch.stack([p.float().norm() for p in model.fusion.parameters()])).item()


# Per-step table: column, width, number format.
COLUMNS = (("step", 4, "d"), ("loss", 8, ".4f"), ("grad_norm", 10, ".4g"), ("scale", 8, ".0f"), ("skipped", 7, ""),
           ("act_max", 9, ".4g"), ("logit_max", 9, ".4g"), ("stream_max", 10, ".4g"), ("w_norm", 8, ".2f"))


def print_row(row: dict | None = None) -> None:
    """One line of the per-step table (the header when `row` is None)."""
    if row is None:
        print(" ".join(f"{name:>{width}}" for name, width, _ in COLUMNS) + "  non-finite")
        return
    cells = [f"{row[name]!s:>{width}}" if not spec else f"{row[name]:>{width}{spec}}" for name, width, spec in COLUMNS]
    print(" ".join(cells) + f"  {row['failure'] or '-'}", flush=True)


def train_and_measure(model: MultimodalFER, batch: dict, optimizer, scaler, runtime, monitor: ModuleMonitor,
                      recipe: dict, step: int) -> dict:
    """One step of `recipe` on `batch` through the shared train step, with everything the table shows."""
    stats = probe(model, batch, runtime.autocast)
    warmup = recipe["warmup_steps"]
    set_lr(optimizer, recipe["lr"] * min(1.0, (step + 1) / warmup) if warmup else recipe["lr"])
    monitor.begin_step(step, scaler.get_scale() if scaler.is_enabled() else 1.0)
    row = {"step": step, "failure": None}
    try:
        result = train_step(model, batch, optimizer, scaler, runtime, clip_norm=recipe["clip_norm"],
                            after_unscale=monitor.read_gradients)
        row.update(loss=result.loss, grad_norm=result.grad_norm, scale=result.scale, skipped=result.skipped)
    except NonFiniteLossError as err:
        row.update(loss=err.loss, grad_norm=math.nan, scale=scaler.get_scale(), skipped=True, failure=str(err))
    event = monitor.first_non_finite()
    if row["failure"] is None and event is not None:
        row["failure"] = f"{event.phase} in {event.module}"
    if row["failure"] is None and not params_finite(model):
        row["failure"] = "parameters"
    row.update(act_max=largest_activation(monitor, step), w_norm=fusion_weight_norm(model), **stats)
    return row


def run_recipe(name: str, recipe: dict, batches: list[dict], runtime) -> dict:
    if set(recipe) != RECIPE_KEYS:
        raise ConfigError(f"--{name} needs exactly the keys {sorted(RECIPE_KEYS)}, got {sorted(recipe)}")
    config = dict(width=WIDTH, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, mlp_hidden=MLP_HIDDEN,
                  visual_input=VISUAL_INPUT, dropout=0.0, encoder_dropout=0.0)
    model = build(recipe, **config).to(runtime.device)
    optimizer = make_optimizer(model, recipe["lr"], WEIGHT_DECAY)
    scaler = runtime.make_scaler()
    print(f"\n== {name}: {recipe}; {model.parameter_breakdown()['total'] / 1e6:.2f}M parameters, "
          f"{runtime.describe()}")
    print_row()
    history = []
    with ModuleMonitor(model, modules=("fusion",)) as monitor:
        for step in range(STEPS):
            batch = move_batch(batches[step % len(batches)], runtime.device)
            history.append(train_and_measure(model, batch, optimizer, scaler, runtime, monitor, recipe, step))
            print_row(history[-1])
            if history[-1]["failure"] is not None:
                break
    return summarise(name, history)


def summarise(name: str, history: list[dict]) -> dict:
    first, last = history[0], history[-1]
    failed = next((r for r in history if r["failure"]), None)
    skipped = sum(r["skipped"] for r in history)
    verdict = (f"NON-FINITE at step {failed['step']} ({failed['failure']})" if failed
               else f"finite for all {len(history)} steps")
    print(f"-- {name}: {verdict}; scaler skipped {skipped} step(s); loss {first['loss']:.4f} -> {last['loss']:.4f};"
          f" act_max {first['act_max']:.4g} -> {last['act_max']:.4g} ({last['act_max'] / FP16_MAX:.2%} of fp16 max);"
          f" logit_max {first['logit_max']:.4g} -> {last['logit_max']:.4g};"
          f" fusion weight norm {first['w_norm']:.2f} -> {last['w_norm']:.2f}")
    return {"name": name, "failed": failed is not None, "history": history}


def full_size_probe() -> None:
    """One float32 forward of the default 150M model at init: how close to float16's range does it start?"""
    g = torch.Generator().manual_seed(SEED)
    batch = {"audio": torch.randn(2, 1, 64, AUDIO_FRAMES, generator=g),
             "frames": torch.randn(2, 2, 3, 64, 64, generator=g)}
    print("\n== full-size model (frames, 150M) at init, float32 forward, batch of 2")
    for name, recipe in (("legacy", LEGACY), ("stable", STABLE)):
        model = build(recipe)
        stats = probe(model, batch, contextlib.nullcontext)
        print(f"{name}: residual stream max {stats['stream_max']:.4g}, attention logit max {stats['logit_max']:.4g}"
              f" (fp16 max {FP16_MAX:.0f})")


@torch.no_grad()
def repeat_probe() -> None:
    """Largest |value| and RMS of the float16 residual stream after the last of six LFM2 layers at width 1536, each
    layer called 1..MAX_REPEAT times (causal convolution and attention, QK-norm, as Hugging Face's LFM2), under
    float16 autocast; PyTorch's default init (no LFM2 weights here), without and with emulated massive
    activations. With them the MLP product runs in float32 here, so that only the residual stream can overflow
    (in float16 the product itself overflows first: debug_gradients.py --legacy_cause=massive_activations)."""
    device = torch.device("cpu" if DEVICE == "auto" else DEVICE)
    tokens = torch.randn(2, 16, ORIGINAL_WIDTH, generator=torch.Generator().manual_seed(SEED)).to(device)
    print(f"\n== repeated layer calls: width {ORIGINAL_WIDTH}, {len(ORIGINAL_LAYOUT)} layers, float16 residual "
          f"stream under float16 autocast, 2 x 16 unit-RMS tokens")
    print(f"{'massive':>8} {'calls':>5} {'max |x|':>10} {'RMS':>8} {'RMS/input':>9}  non-finite (share)")
    for massive in MASSIVE_LEVELS:
        for calls in range(1, MAX_REPEAT + 1):
            torch.manual_seed(SEED)
            stack = LFM2Stack(ORIGINAL_WIDTH, ORIGINAL_LAYOUT, ORIGINAL_HEADS, ORIGINAL_KV_HEADS, ORIGINAL_MLP_HIDDEN,
                              conv_padding="causal", causal_attention=True, float32_mlp_product=bool(massive),
                              repeat_calls=calls).to(device)
            if massive:
                plant_massive_activations(stack.blocks[MASSIVE_BLOCK].mlp, massive)
            with torch.autocast(device.type, dtype=torch.float16):
                x, rope = tokens.half(), stack._rope(tokens, None)
                for block in stack.blocks:
                    for _ in range(calls):
                        x = block(x, rope)[0]
            finite = torch.isfinite(x)
            values = x.float()[finite]
            largest = values.abs().max().item() if values.numel() else math.nan
            rms = values.pow(2).mean().sqrt().item() if values.numel() else math.nan
            share = 1 - finite.float().mean().item()
            print(f"{massive:>8g} {calls:>5d} {largest:>10.4g} {rms:>8.4g} "
                  f"{rms / tokens.pow(2).mean().sqrt().item():>9.3g}  {share:.1%}", flush=True)


def main() -> None:
    if REPEAT_PROBE:
        repeat_probe()
    runtime = setup_runtime(DEVICE, AMP_DTYPE, SEED)
    batches = synthetic_batches(SEED)
    results = [run_recipe("legacy", LEGACY, batches, runtime), run_recipe("stable", STABLE, batches, runtime)]
    print("\n== summary: " + "; ".join(f"{r['name']} {'went non-finite' if r['failed'] else 'stayed finite'}"
                                       for r in results))
    if FULL_SIZE_PROBE:
        full_size_probe()


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:])
