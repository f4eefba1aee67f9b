"""Issue 10 item 8: the LFM2 short convolution over each modality's tokens (neighbours in time) vs over the joint
sequence [audio_0..S-1, visual_0..S-1] (the old behaviour, where audio_{S-1} and visual_0 are mixed as neighbours).

The same small MultimodalFER (the full model's 16-block LFM2 layout at width 64) is trained from the same seeds
with `conv_per_modality=True` and `False` on a synthetic RAVDESS-format cache (audio + face frames; training
actors and unseen test actors), float32, a fixed budget of steps, and evaluated on the test actors. It prints
accuracy, UAR and loss per seed and their mean +- std, per variant.

    python benchmarks/conv_neighbours.py
    python benchmarks/conv_neighbours.py --steps=300 --seeds="(0, 1, 2, 3, 4)"
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/...` from anywhere

from data.dataset import RavdessDataset  # noqa: E402
from data.synthetic import make_synthetic_cache  # noqa: E402
from models.full import MultimodalFER  # noqa: E402
from common.config import run_script  # noqa: E402
from training.runtime import setup_runtime  # noqa: E402
from training.stages import make_optimizer  # noqa: E402
from training.step import cosine_lr, evaluate, set_lr, train_step  # noqa: E402

# --- data: a synthetic cache (rendered once into CACHE_DIR)
CACHE_DIR = "checkpoints/benchmarks/conv_neighbours_cache"
TRAIN_ACTORS = tuple(range(1, 9))
TEST_ACTORS = tuple(range(9, 13))
TAKES = 2  # takes per actor and emotion
N_FRAMES = 8  # face frames per clip: 8 time segments of the clip, like the audio tokens
FRAME_SIZE = 32  # px
# --- model: the full model's layout at a CPU width
MODEL = {"width": 64, "n_heads": 1, "n_kv_heads": 1, "mlp_hidden": 240, "audio_channels": [8, 16, 32, 64],
         "frame_backbone": "tiny", "frame_input_size": FRAME_SIZE, "dropout": 0.1, "encoder_dropout": 0.1}
# --- optimisation
STEPS = 200
BATCH_SIZE = 16
LR = 1e-3
WARMUP_STEPS = 20
WEIGHT_DECAY = 0.05
SEEDS = (0, 1, 2)
DEVICE = "cpu"


def train_and_test(conv_per_modality: bool, seed: int, train: RavdessDataset, test: RavdessDataset) -> dict:
    runtime = setup_runtime(DEVICE, "float32", seed)
    model = MultimodalFER(**MODEL, conv_per_modality=conv_per_modality)
    model.init_weights("scaled_residual")
    model.to(runtime.device).train()
    optimizer = make_optimizer(model, LR, WEIGHT_DECAY)
    scaler = runtime.make_scaler()
    loader = DataLoader(train, BATCH_SIZE, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    step = 0
    while step < STEPS:
        for batch in loader:
            if step == STEPS:
                break
            set_lr(optimizer, cosine_lr(step, STEPS, WARMUP_STEPS, LR))
            model.train()
            train_step(model, batch, optimizer, scaler, runtime)
            step += 1
    return evaluate(model, DataLoader(test, BATCH_SIZE), runtime)


def main() -> None:
    torch.set_num_threads(1)
    cache = Path(CACHE_DIR)
    if not (cache / "manifest.json").exists():
        make_synthetic_cache(cache, actors=TRAIN_ACTORS + TEST_ACTORS, takes=TAKES, n_frames=N_FRAMES,
                             size=FRAME_SIZE)
    train, test = RavdessDataset(cache, TRAIN_ACTORS), RavdessDataset(cache, TEST_ACTORS)
    print(f"synthetic cache: {len(train)} training clips (actors {TRAIN_ACTORS[0]}-{TRAIN_ACTORS[-1]}), "
          f"{len(test)} test clips (actors {TEST_ACTORS[0]}-{TEST_ACTORS[-1]}); {STEPS} steps of batch {BATCH_SIZE}")
    for conv_per_modality in (False, True):
        name = "each modality's tokens" if conv_per_modality else "the joint sequence"
        results = [train_and_test(conv_per_modality, seed, train, test) for seed in SEEDS]
        for seed, result in zip(SEEDS, results):
            print(f"{name}, seed {seed}: accuracy {result['accuracy']:.1%}, UAR {result['uar']:.1%}, "
                  f"loss {result['loss']:.3f}", flush=True)
        summary = ", ".join(f"{key} {statistics.mean(r[key] for r in results):.3f} +- "
                            f"{statistics.pstdev(r[key] for r in results):.3f}" for key in ("accuracy", "uar", "loss"))
        print(f"== convolution over {name}: {summary}")


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:])
