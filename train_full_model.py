"""Train the full MultimodalFER (~150M parameters) with LFM2 fusion, without NaN.

The stable recipe: depth-scaled residual init, QK-norm, float32 norms/softmax, LR warmup, global-norm clipping,
AMP (float16 + GradScaler on a T4, bfloat16 on A100+), progressive stages. `--preset=legacy` rebuilds the recipe
that produced NaN from the first batch (default init, LR 1e-4, no QK-norm, no warmup, no clipping, float16), so
that `debug_gradients.py` can be shown on it.

Quick start without RAVDESS (synthetic data, a narrow copy of the architecture with the same block layout):
    python train_full_model.py --preset=cpu
Your RAVDESS copy on a GPU (T4: float16, batch 8 fits 16 GB with gradient checkpointing), all 6 folds:
    python train_full_model.py --dataset=ravdess --data_root=/data/RAVDESS --fold=all --gradient_checkpointing=True
Real audio + facial action units (the benchmark on these machines), 5 folds over actors 1-20, CPU-sized:
    python train_full_model.py --dataset=ravdess --data_root=../shared/data/ravdess_speech_16k \
        --visual_input=features --feature_file=../shared/data/ravdess_clip_features/au_mfcc.npz \
        --actors=1-20 --n_folds=5 --fold=all --preset=cpu --run_name=full_cpu_audio_au
The original failure, for the debugging tools:
    python train_full_model.py --preset=legacy --run_name=legacy
Colab:
    !python train_full_model.py --dataset=ravdess --data_root=/content/drive/MyDrive/RAVDESS --pretrained=True
"""
from __future__ import annotations

import sys
from functools import partial

import torch
from tqdm import tqdm

from common.config import config_keys, run_script
from common.distributed import all_ranks_true, is_main, wrap_model
from data.calibration import CALIBRATION_SOURCES, CALIBRATIONS
from data.setup import DataSettings, build_loaders, make_split, prepare_data
from data.ravdess import DataError
from models import ModelConfigError, build_model
from training.ema import WeightEMA
from training.evaluation import TestPlan, check_selection, final_test, selected_model, validate
from training.progress import EpochStats, FoldCheckpoints, crash_exit, end_epoch, epoch_line, next_stage, resume
from training.runs import RunFolder, cross_validate, fold_list, open_run
from training.runtime import setup_runtime
from training.stages import make_optimizer, set_trainable, train_mode
from training.step import NonFiniteLossError, StepResult, cosine_lr, cross_entropy, move_batch, set_lr

# ---- data
DATASET = "synthetic"  # "synthetic" (generated quick-start set) or "ravdess" (a RAVDESS folder at DATA_ROOT)
DATA_ROOT = "data/RAVDESS"  # any folder holding RAVDESS files (mp4/wav/flac), searched recursively
CACHE_DIR = ""  # preprocessed clips; "" = OUTPUT_DIR/cache/<name of DATA_ROOT>_<frames>x<size>
CHANNEL = "speech"  # "speech", "song" or "all"
MODALITIES = ("audio", "visual")  # any non-empty subset
VISUAL_INPUT = "frames"  # "frames" (face crops from the video) or "features" (per-clip vectors in FEATURE_FILE)
FEATURE_FILE = ""  # .npz of per-clip visual features keyed by RAVDESS stem (needs VISUAL_INPUT="features")
N_FRAMES = 0  # face frames sampled per clip; 0 = 16 for RAVDESS, 8 for the synthetic quick start
FRAME_SIZE = 0  # face crop side in pixels; 0 = 112 for RAVDESS, 64 for the synthetic quick start
SPEC_AUGMENT = True  # training log-mels: a random circular time shift, then SpecAugment masks (below)
FREQ_MASKS = 1  # frequency masks per clip
FREQ_MASK_BINS = 10  # widest frequency mask, mel bins (of 64)
TIME_MASKS = 1  # time masks per clip
TIME_MASK_SECONDS = 0.6  # widest time mask
TIME_SHIFT_SECONDS = 0.3  # circular time shift drawn uniformly in +- this (0 = off)
FRAME_AUGMENT = True  # random crop, flip and colour jitter on training face crops

# ---- person calibration (data/calibration.py): each clip's inputs compared with its own person's range
CALIBRATION = "none"  # none | person: standardise each person's inputs by statistics of that person's own clips
_CALIBRATION_CHOICES = CALIBRATIONS  # data/calibration.py declares them
CALIBRATION_CLIPS = 0  # clips per person for those statistics: 0 = all in the split (unlabeled), K = K drawn with SEED
CALIBRATION_SOURCE = "any"  # any | neutral: only the person's neutral clips (a test person's are then not scored)
_CALIBRATION_SOURCE_CHOICES = CALIBRATION_SOURCES

# ---- actor-disjoint split
ACTORS = "auto"  # actors in the experiment, e.g. "1-20"; "auto" = every actor in the data
N_FOLDS = 6  # folds of consecutive actors (6 folds x 4 actors over RAVDESS's 24 actors)
FOLD = 0  # 0..N_FOLDS-1, or "all" for the whole cross-validation
N_VAL_ACTORS = 0  # validation actors, taken from the training actors (never the test fold); 0 = none (with
# SELECT_CHECKPOINT "last" or "ema" they would only draw a validation curve; as training actors they add data)
TEST_ACTORS = ""  # explicit test actors, e.g. "21-24" (overrides FOLD)
VAL_ACTORS = ""  # explicit validation actors, with TEST_ACTORS

# ---- model
PRESET = "default"  # default | cpu | legacy: "default" is the ~150M model (width 768, 16 LFM2 blocks); "cpu" first
# sets the constants in _PRESETS["cpu"] (width 256, same block layout), then every constant given on the command
# line; "legacy": the original recipe and architecture that produced NaN (LEGACY=True)
WIDTH = 768
MLP_HIDDEN = 2816  # SwiGLU hidden size
N_HEADS = 12  # query heads of the attention blocks
N_KV_HEADS = 4  # grouped-query attention: key/value heads
N_SEGMENTS = 8  # tokens per modality (time segments of the clip)
READOUT = "joint"  # joint (one attention pool over all fused tokens, linear head) | modality_pools (Lite's concat head)
_READOUT_CHOICES = ("joint", "modality_pools")
LAYOUT = "lfm2"  # fusion blocks: "lfm2" (LFM2-350M's 16: the short convolution in 10, attention in 6) or a list
# such as "conv,attn" (a shallower stack for the depth ablation); "none": no blocks (the encoders read out directly)
AUDIO_CHANNELS = (32, 64, 128, 256)  # audio CNN channels per VGG stage
FRAME_BACKBONE = "resnet18"  # resnet18 or small
PRETRAINED = False  # True: torchvision ImageNet weights for resnet18 (downloads on first use; Colab)
VISUAL_CHECKPOINT = ""  # face-pretrained frame backbone from pretrain_visual.py
QK_NORM = True  # per-head RMSNorm on queries and keys (off in the legacy recipe)
DROPOUT = 0.1
DROP_PATH = 0.0  # stochastic depth: fusion block i of n skipped per training sample with probability DROP_PATH*(i+1)/n
ENCODER_DROPOUT = 0.1
FEATURE_NOISE = 0.1  # Gaussian noise on standardised per-clip features in training (features input)
MODALITY_DROPOUT = 0.2
GRADIENT_CHECKPOINTING = False  # recompute each fusion block in backward (less memory, ~30% slower)
INIT = "scaled_residual"  # default | xavier | kaiming | scaled_residual | zero_residual
_INIT_CHOICES = ("default", "xavier", "kaiming", "scaled_residual", "zero_residual")
INIT_GAIN = 0.5
# Init of the audio CNN and the visual encoder (ReLU + BatchNorm networks). Kaiming, Lite's choice, measured no
# better here: 64.2% against 66.2% on the real-data CV (docs/results.md, "What separates the full model from Lite").
ENCODER_INIT = "scaled_residual"
LEGACY = False  # True (--preset=legacy): the original recipe and architecture that produced NaN

# ---- optimisation
# Stage 1 freezes the encoders named in STAGE1_FROZEN ("pretrained": those loaded from pretrained weights; () none)
# and trains the rest; stage 2 trains everything at a lower LR. When stage 1 froze nothing (no pretrained weights)
# it already trained everything and stage 2 is skipped. Set STAGE1_EPOCHS=0 to skip stage 1.
STAGE1_EPOCHS = 20
STAGE1_LR = 1e-3  # peak AdamW learning rate of stage 1
STAGE1_FROZEN = "pretrained"  # "pretrained", or a tuple such as ("visual_encoder",)
STAGE2_EPOCHS = 10
STAGE2_LR = 1e-4
BATCH_SIZE = 32
WEIGHT_DECAY = 1e-2
WARMUP_FRACTION = 0.3  # of each stage's steps: linear LR warmup to the peak, then cosine decay (one-cycle shape)
CLIP_NORM = 1.0  # global gradient-norm clipping (the norm is logged either way)
LABEL_SMOOTHING = 0.1

# ---- model selection and testing
SELECT_CHECKPOINT = "last"  # last | ema | best_val: the weights tested and kept as ckpt_best.pt
_SELECT_CHECKPOINT_CHOICES = ("last", "ema", "best_val")
EMA_DECAY = 0.99  # per step: the exponential moving average of the weights (tested with SELECT_CHECKPOINT="ema")
SELECT_METRIC = "accuracy"  # validation metric of SELECT_CHECKPOINT="best_val": accuracy | uar | macro_f1
_SELECT_METRIC_CHOICES = ("accuracy", "uar", "macro_f1")
PATIENCE = 10  # early stopping (best_val only): epochs without validation improvement
TEST_TIME_SHIFTS = 0  # k > 0: test probabilities averaged over the clip and 2k circular time shifts of its audio

# ---- runtime and precision
DEVICE = "auto"  # "auto", "cuda", "cuda:1", "cpu"
AMP_DTYPE = "auto"  # auto: float16 + GradScaler on T4/V100, bfloat16 on A100+, float32 on CPU
SEED = 0
NUM_WORKERS = 2  # DataLoader worker processes (0 = load in the main process)
PREPARE_WORKERS = 0  # processes that preprocess the data into the cache on first use; 0 = one per CPU
SYNC_BATCHNORM = True  # under torchrun: BatchNorm statistics of the global batch (all processes), not of each share

# ---- output
OUTPUT_DIR = "checkpoints"  # run folders go to OUTPUT_DIR/train_full_model/RUN_NAME
RUN_NAME = "full"  # the same RUN_NAME resumes an interrupted run (or reports a finished one)
RESTART = False  # True: delete RUN_NAME's folder and train again (a run refuses constants it was not made with)
MODEL_NAME = "full"

# ---- presets (applied by --preset=NAME, before the constants given on the command line; not edited here)
_PRESETS = {"default": {},
            "cpu": {"WIDTH": 256, "MLP_HIDDEN": 768, "N_HEADS": 4, "N_KV_HEADS": 2,
                    "AUDIO_CHANNELS": (16, 32, 64, 128), "FRAME_BACKBONE": "small"},
            "legacy": {"LEGACY": True}}
# What LEGACY=True changes (docs/first_batch_nan.md). The architecture switches of the original model: float16
# residual stream and SwiGLU product, causal attention with a -1e9 mask fill.
_LEGACY_MODEL = {"causal_attention": True, "attention_mask_fill": -1e9, "float32_mlp_product": False,
                 "float32_residual": False}
# The recipe of the original run that diverged: it overrides INIT, ENCODER_INIT, QK_NORM, both LRs, warmup,
# clipping and AMP_DTYPE.
_LEGACY_RECIPE = {"init": "default", "encoder_init": "default", "qk_norm": False, "lr": 1e-4, "warmup_fraction": 0,
                  "clip_norm": None, "amp_dtype": "float16"}


def recipe() -> dict:
    """The optimisation recipe in force: the stable constants, or the legacy recipe when LEGACY is set."""
    stable = {"init": INIT, "encoder_init": ENCODER_INIT, "qk_norm": QK_NORM, "lr": None,
              "warmup_fraction": WARMUP_FRACTION, "clip_norm": CLIP_NORM, "amp_dtype": AMP_DTYPE}
    return dict(_LEGACY_RECIPE) if LEGACY else stable


def model_config(feature_dim: int) -> dict:
    config = {"modalities": list(MODALITIES), "visual_input": VISUAL_INPUT, "feature_dim": feature_dim,
              "width": WIDTH, "mlp_hidden": MLP_HIDDEN, "n_heads": N_HEADS, "n_kv_heads": N_KV_HEADS,
              "n_segments": N_SEGMENTS, "layout": LAYOUT, "readout": READOUT,
              "audio_channels": list(AUDIO_CHANNELS), "frame_backbone": FRAME_BACKBONE,
              "pretrained": PRETRAINED, "feature_noise": FEATURE_NOISE,
              "qk_norm": recipe()["qk_norm"], "dropout": DROPOUT, "drop_path": DROP_PATH,
              "encoder_dropout": ENCODER_DROPOUT, "modality_dropout": MODALITY_DROPOUT,
              "gradient_checkpointing": GRADIENT_CHECKPOINTING}
    return {**config, **(_LEGACY_MODEL if LEGACY else {})}


def build(feature_dim: int, runtime) -> tuple[torch.nn.Module, list[str]]:
    """The model, initialised, with pretrained weights loaded; returns it with the names of pretrained encoders."""
    model = build_model(MODEL_NAME, model_config(feature_dim))
    model.init_weights(recipe()["init"], INIT_GAIN, recipe()["encoder_init"])
    pretrained = ["visual_encoder"] if PRETRAINED and "visual" in MODALITIES and VISUAL_INPUT == "frames" else []
    if VISUAL_CHECKPOINT:
        model.visual_encoder.load_face_pretrained(VISUAL_CHECKPOINT)
        pretrained = ["visual_encoder"]
    return model.to(runtime.device), pretrained


def stage_table(pretrained: list[str]) -> list[dict]:
    frozen = pretrained if STAGE1_FROZEN == "pretrained" else list(STAGE1_FROZEN)
    stage1_train = tuple(name for name in ("audio_encoder", "visual_encoder", "fusion", "pool", "classifier")
                         if name not in frozen and name.split("_")[0] in MODALITIES + ("fusion", "pool", "classifier"))
    legacy_lr = recipe()["lr"]
    stages = [{"name": "stage1_frozen_" + ("+".join(frozen) or "none"), "train": stage1_train,
               "epochs": STAGE1_EPOCHS, "lr": legacy_lr or STAGE1_LR}]
    if frozen or STAGE1_EPOCHS == 0:
        stages.append({"name": "stage2_all", "train": "all", "epochs": STAGE2_EPOCHS, "lr": legacy_lr or STAGE2_LR})
    return [s for s in stages if s["epochs"] > 0]


def data_settings() -> DataSettings:
    return DataSettings(
        dataset=DATASET, data_root=DATA_ROOT, cache_dir=CACHE_DIR, channel=CHANNEL, modalities=MODALITIES,
        visual_input=VISUAL_INPUT, feature_file=FEATURE_FILE, n_frames=N_FRAMES, frame_size=FRAME_SIZE,
        spec_augment=SPEC_AUGMENT, freq_masks=FREQ_MASKS, freq_mask_bins=FREQ_MASK_BINS, time_masks=TIME_MASKS,
        time_mask_seconds=TIME_MASK_SECONDS, time_shift_seconds=TIME_SHIFT_SECONDS, frame_augment=FRAME_AUGMENT,
        batch_size=BATCH_SIZE, num_workers=NUM_WORKERS, seed=SEED, output_dir=OUTPUT_DIR,
        prepare_workers=PREPARE_WORKERS, calibration=CALIBRATION, calibration_clips=CALIBRATION_CLIPS,
        calibration_source=CALIBRATION_SOURCE)


def train_fold(run: RunFolder, fold: int, settings: DataSettings, cache, runtime, config: dict) -> dict:
    split = make_split(cache, ACTORS, N_FOLDS, fold, N_VAL_ACTORS, TEST_ACTORS, VAL_ACTORS)
    loaders = build_loaders(cache, split, settings)
    print(f"fold {fold}: {split} | clips train {len(loaders.train.dataset)}, val {len(loaders.val.dataset)}, "
          f"test {len(loaders.test.dataset)}")
    model, pretrained = build(loaders.feature_dim, runtime)
    print("parameters:", ", ".join(f"{k} {v:,}" for k, v in model.parameter_breakdown().items()))
    stages = stage_table(pretrained)
    print(check_selection(SELECT_CHECKPOINT, len(loaders.val.dataset) > 0, sum(s["epochs"] for s in stages)))
    optimizer = make_optimizer(model, stages[0]["lr"], WEIGHT_DECAY)
    scaler = runtime.make_scaler()
    ema = WeightEMA(model, EMA_DECAY)  # kept whatever SELECT_CHECKPOINT is: metrics.json compares both
    progress = resume(run, model, optimizer, scaler, MODEL_NAME, ema)
    keep = FoldCheckpoints(MODEL_NAME, optimizer, scaler, config, ema, SELECT_CHECKPOINT, SELECT_METRIC,
                           loaders.feature_stats, loaders.calibration)
    loss_fn = partial(cross_entropy, label_smoothing=LABEL_SMOOTHING)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # clipped (those with a gradient)
    steps_per_epoch = len(loaders.train)
    max_norm, warmup_fraction = recipe()["clip_norm"] or float("inf"), recipe()["warmup_fraction"]

    for stage_index, stage in enumerate(stages):
        if stage_index < progress.stage:
            continue
        frozen = set_trainable(model, stage["train"])
        ddp_model = wrap_model(model, runtime.device, SYNC_BATCHNORM)  # under torchrun; else the model itself
        total_steps = stage["epochs"] * steps_per_epoch
        while progress.epoch < stage["epochs"] and progress.epochs_since_best < PATIENCE:
            train_mode(model, frozen)
            loaders.set_epoch(len(progress.history))
            stats = EpochStats()
            bar = tqdm(loaders.train, desc=f"fold {fold} {stage['name']} epoch {progress.epoch + 1}/{stage['epochs']}",
                       leave=False, dynamic_ncols=True, disable=not is_main())
            for batch_index, batch in enumerate(bar):
                batch = move_batch(batch, runtime.device)
                lr = cosine_lr(progress.epoch * steps_per_epoch + batch_index, total_steps,
                               int(warmup_fraction * total_steps), stage["lr"])
                set_lr(optimizer, lr)
                where = f"fold {fold}, epoch {progress.epoch + 1}"
                # The step: forward under autocast, scaled backward, true-scale gradient norm and clipping, scaler step.
                optimizer.zero_grad(set_to_none=True)
                with runtime.autocast():
                    logits = ddp_model(batch)
                loss = loss_fn(logits, batch)
                if not all_ranks_true(bool(torch.isfinite(loss))):  # under torchrun every process stops
                    crash_exit(run, batch, model, MODEL_NAME, NonFiniteLossError(loss.item()), where, scaler, progress)
                scale = scaler.get_scale() if scaler.is_enabled() else 1.0
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                if not scaler.is_enabled() and not torch.isfinite(grad_norm):  # nothing else would skip this step
                    err = NonFiniteLossError(float(grad_norm), what="gradient norm")
                    crash_exit(run, batch, model, MODEL_NAME, err, where, scaler, progress)
                scaler.step(optimizer)
                scaler.update()
                skipped = scaler.is_enabled() and scaler.get_scale() < scale  # an overflow: the scaler skipped it
                ema.update(model)
                progress.step += 1
                result = StepResult(loss.item(), float(grad_norm), skipped, scale,
                                    int((logits.argmax(dim=-1) == batch["label"]).sum()), len(batch["label"]))
                stats.update(result)
                bar.set_postfix(loss=f"{result.loss:.3f}", gnorm=f"{result.grad_norm:.2f}")
            val = validate(selected_model(model, ema, SELECT_CHECKPOINT), loaders.val, runtime)
            train_stats = stats.summary()
            improved = end_epoch(run, progress, model, keep, val, train_stats, lr)  # log, checkpoints, figure
            print(epoch_line(f"fold {fold} {stage['name']}", progress, train_stats, val, improved))
        next_stage(progress, PATIENCE, f"fold {fold} {stage['name']}")

    plan = TestPlan(MODEL_NAME, loaders.class_names, SELECT_CHECKPOINT, TEST_TIME_SHIFTS,
                    loaders.time_shift_steps(TEST_TIME_SHIFTS), loaders.time_shift_steps(2),
                    {"fold": fold, "test_actors": list(split.test), "val_actors": list(split.val)})
    test = final_test(run, model, loaders.test, runtime, plan)  # the selected weights on the test actors
    print(f"fold {fold} test (actors {split.test}): accuracy {test['accuracy']:.1%}, UAR {test['uar']:.1%}")
    return test


def main() -> None:
    config = {k: globals()[k] for k in config_keys(globals())}
    runtime = setup_runtime(DEVICE, recipe()["amp_dtype"], SEED)
    print(runtime.describe())
    folds = [0] if TEST_ACTORS else fold_list(FOLD, N_FOLDS)  # checked before any slow data work
    settings = data_settings()
    cache = prepare_data(settings)
    run = open_run("train_full_model", RUN_NAME, OUTPUT_DIR, config, runtime.describe(), RESTART)
    cross_validate(run, folds, lambda fold_run, fold: train_fold(fold_run, fold, settings, cache, runtime, config),
                   f"{len(folds)}-fold actor-disjoint CV over actors {ACTORS}, "
                   f"modalities {'+'.join(MODALITIES)} ({VISUAL_INPUT if 'visual' in MODALITIES else 'no visual'}), "
                   f"LFM2 fusion, preset {PRESET}{', LEGACY recipe' if LEGACY else ''}, "
                   f"{settings.calibration_settings.describe()}",
                   explicit_split=bool(TEST_ACTORS),
                   select=SELECT_CHECKPOINT, test_time_shifts=TEST_TIME_SHIFTS)


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:], user_errors=(DataError, ModelConfigError))
