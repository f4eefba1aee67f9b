"""Estimate the peak GPU memory of training MultimodalFER under float16 autocast, with and without checkpointing.

Runs on the CPU. Parameters, gradients and AdamW states are counted from the parameter count (float32 master
weights, as `training.step` keeps them). Activations are measured: the tensors autograd saves for backward during
one forward under autocast (each storage once, parameters excluded, so autocast's half copies of the weights
count), at two small batch sizes, extrapolated linearly to BATCH_SIZE. With gradient checkpointing the estimate
adds what checkpointing keeps alive outside the saved tensors: autocast's cache of half weights during the forward
(it lives until the autocast block ends) or one block's recomputed activations during backward, whichever is
larger. CUDA context and library workspaces are an assumed constant.

    python benchmarks/memory_estimate.py
    python benchmarks/memory_estimate.py --batch_size=16 --gpu_gib=15
    !python benchmarks/memory_estimate.py --model_config="{'visual_input': 'features'}"   # Colab
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/...` from anywhere

from models.full import MultimodalFER  # noqa: E402
from common.config import ConfigError, run_script  # noqa: E402

# --- model
MODEL_CONFIG = {}  # MultimodalFER arguments that differ from its defaults, e.g. {"width": 512}
INIT = "scaled_residual"  # init strategy (does not change memory; keeps the forward realistic)
# --- input
BATCH_SIZE = 8  # the training batch size to estimate for
MEASURE_BATCHES = (1, 2)  # batch sizes actually run on the CPU; memory is linear in between
N_FRAMES = 16  # face frames per clip (the cache holds 16)
FRAME_SIZE = 112  # pixels
AUDIO_FRAMES = 361  # log-mel frames (3.6 s at hop 160)
FEATURE_DIM = 35  # per-clip visual features, when MODEL_CONFIG has visual_input="features"
# --- precision
AMP_DTYPE = "float16"  # float16 | float32 | bfloat16 (~70x slower on CPUs without native bf16)
_AMP_DTYPE_CHOICES = ("float16", "float32", "bfloat16")
# --- the GPU
GPU_GIB = 15.0  # usable memory of the target card (a 16 GB T4 shows 15.0 GiB)
CUDA_OVERHEAD_GIB = 0.8  # assumed: CUDA context + cuBLAS/cuDNN workspaces, outside PyTorch's allocator
ALLOCATOR_SLACK = 1.15  # assumed: caching-allocator fragmentation on top of live tensors

GIB = 2 ** 30
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": None}


def make_batch(batch_size: int, visual_input: str) -> dict:
    batch = {"audio": torch.randn(batch_size, 1, 64, AUDIO_FRAMES),
             "has_audio": torch.ones(batch_size, dtype=torch.bool),
             "has_visual": torch.ones(batch_size, dtype=torch.bool)}
    if visual_input == "features":
        batch["features"] = torch.randn(batch_size, FEATURE_DIM)
    else:
        batch["frames"] = torch.randn(batch_size, N_FRAMES, 3, FRAME_SIZE, FRAME_SIZE)
    return batch


def saved_bytes(module: nn.Module, inputs: tuple, amp_dtype: torch.dtype | None) -> int:
    """Bytes autograd keeps for backward after `module(*inputs)` under autocast, each storage counted once."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            module(*inputs)
    return sum(storages.values())


def affine_in_batch(measure) -> tuple[float, float]:
    """`measure(b)` (bytes) as fixed + per_sample * b, fitted on the two MEASURE_BATCHES."""
    small, large = MEASURE_BATCHES
    low, high = measure(small), measure(large)
    per_sample = (high - low) / (large - small)
    return low - per_sample * small, per_sample


def model_activations(model: MultimodalFER, amp_dtype: torch.dtype | None) -> tuple[float, float]:
    visual_input = model.config["visual_input"]
    return affine_in_batch(lambda b: saved_bytes(model, (make_batch(b, visual_input),), amp_dtype))


def checkpointing_extra(model: MultimodalFER, amp_dtype: torch.dtype | None, batch_size: int) -> float:
    """Memory that checkpointing keeps alive besides the saved tensors, at its worst moment.

    Forward: autocast caches a half copy of every weight until the autocast block ends, and inside checkpointed
    blocks those copies are not among the saved tensors. Backward: one block's activations are recomputed at a time;
    the widest block (the one with most parameters) bounds it. Block inputs (B x L x width float32 each) are small
    and added too.
    """
    width, length = model.config["width"], 2 * model.config["n_segments"]
    half_bytes = 0 if amp_dtype is None else 2
    weight_cache = half_bytes * sum(p.numel() for p in model.fusion.blocks.parameters())
    block = max(model.fusion.blocks, key=lambda b: sum(p.numel() for p in b.parameters()))
    rope = model.fusion.rotary(torch.arange(length))
    fixed, per_sample = affine_in_batch(
        lambda b: saved_bytes(block, (torch.randn(b, length, width, requires_grad=True), rope), amp_dtype))
    block_inputs = len(model.fusion.blocks) * batch_size * length * width * 4
    return max(weight_cache, fixed + per_sample * batch_size) + block_inputs


def peak_bytes(static: float, activations: float) -> float:
    return (static + activations) * ALLOCATOR_SLACK + CUDA_OVERHEAD_GIB * GIB


def report(name: str, static: float, fixed: float, per_sample: float, extra: float) -> None:
    activations = fixed + per_sample * BATCH_SIZE + extra
    peak = peak_bytes(static, activations)
    fits = "fits" if peak <= GPU_GIB * GIB else "DOES NOT FIT"
    # Largest batch under the budget, treating the checkpointing extra as batch-independent (it nearly is).
    room = (GPU_GIB * GIB - CUDA_OVERHEAD_GIB * GIB) / ALLOCATOR_SLACK - static - fixed - extra
    print(f"{name:<31} activations {activations / GIB:5.2f} GiB ({fixed / GIB:.2f} fixed + "
          f"{per_sample / 2 ** 20:.0f} MiB/sample)  peak ~{peak / GIB:5.2f} GiB  {fits} in {GPU_GIB:g} GiB; "
          f"largest batch ~{int(room // per_sample)}")


def main() -> None:
    if AMP_DTYPE not in AMP_DTYPES:
        raise ConfigError(f"AMP_DTYPE='{AMP_DTYPE}': choose float16, bfloat16 or float32")
    amp_dtype = AMP_DTYPES[AMP_DTYPE]
    torch.manual_seed(0)
    model = MultimodalFER(**MODEL_CONFIG)
    model.init_weights(INIT)
    model.train()
    breakdown = model.parameter_breakdown()
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in breakdown.items()))
    n_params = breakdown["total"]
    static = 16 * n_params  # float32 weights (4) + gradients (4) + AdamW exp_avg and exp_avg_sq (8) bytes
    print(f"weights + gradients + AdamW states: {static / GIB:.2f} GiB (16 bytes x {n_params / 1e6:.1f}M)")
    print(f"batch {BATCH_SIZE}, {N_FRAMES} frames of {FRAME_SIZE}px, {AUDIO_FRAMES} log-mel frames, {AMP_DTYPE} "
          f"autocast; measured at batches {MEASURE_BATCHES} on the CPU")
    report("without gradient checkpointing", static, *model_activations(model, amp_dtype), extra=0.0)
    model.fusion.gradient_checkpointing = True
    report("with gradient checkpointing", static, *model_activations(model, amp_dtype),
           extra=checkpointing_extra(model, amp_dtype, BATCH_SIZE))
    print(f"assumed: CUDA context/workspaces {CUDA_OVERHEAD_GIB} GiB, allocator slack x{ALLOCATOR_SLACK}; "
          "gradients and AdamW states counted as if all alive at the peak (an upper bound)")


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:])
