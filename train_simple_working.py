"""Train SimpleCNN, the audio-visual baseline that always trains (68,050 parameters with the default constants).

Evaluation is actor-disjoint: FOLD picks one fold of a k-fold split over consecutive actors (or "all" for the
whole cross-validation, reported as mean +- std), or TEST_ACTORS / VAL_ACTORS name the actors explicitly.

Quick start without RAVDESS (generates a small synthetic RAVDESS-format set, a few minutes on a CPU):
    python train_simple_working.py
Your RAVDESS copy (any layout of the Zenodo archives), all 6 folds of 4 actors:
    python train_simple_working.py --dataset=ravdess --data_root=/data/RAVDESS --fold=all
Real audio + facial action units as the visual input (the benchmark on these machines), 5 folds over actors 1-20:
    python train_simple_working.py --dataset=ravdess --data_root=../shared/data/ravdess_speech_16k \
        --visual_input=features --feature_file=../shared/data/ravdess_clip_features/au_mfcc.npz \
        --actors=1-20 --n_folds=5 --fold=all --run_name=simple_audio_au
Colab (the dataset on Drive):
    !python train_simple_working.py --dataset=ravdess --data_root=/content/drive/MyDrive/RAVDESS --fold=all
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
AUDIO_CHANNELS = (8, 16, 32, 48)  # log-mel CNN: channels of its VGG stages (two 3x3 convs + max-pool each)
CHANNELS = (16, 32, 32)  # face-frame conv stack channels; the last is also the width of the feature MLP
DROPOUT = 0.3  # before the classifier, and in the feature MLP
FEATURE_NOISE = 0.1  # Gaussian noise on standardised per-clip features in training (features input)
INIT = "kaiming"  # default | xavier | kaiming | scaled_residual | zero_residual
_INIT_CHOICES = ("default", "xavier", "kaiming", "scaled_residual", "zero_residual")

# ---- optimisation
EPOCHS = 20  # one stage that trains everything (the Lite and full scripts add a frozen-encoder stage)
LR = 2e-3  # peak AdamW learning rate
BATCH_SIZE = 32
WEIGHT_DECAY = 1e-2
WARMUP_FRACTION = 0.3  # of the steps: linear LR warmup to the peak, then cosine decay (one-cycle shape)
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
OUTPUT_DIR = "checkpoints"  # run folders go to OUTPUT_DIR/train_simple_working/RUN_NAME
RUN_NAME = "simple"  # the same RUN_NAME resumes an interrupted run (or reports a finished one)
RESTART = False  # True: delete RUN_NAME's folder and train again (a run refuses constants it was not made with)
MODEL_NAME = "simple"


def stage_table() -> list[dict]:
    return [{"name": "train", "train": "all", "epochs": EPOCHS, "lr": LR}]


def build(feature_dim: int, runtime) -> torch.nn.Module:
    model = build_model(MODEL_NAME, {"modalities": list(MODALITIES), "visual_input": VISUAL_INPUT,
                                     "feature_dim": feature_dim, "channels": list(CHANNELS),
                                     "audio_channels": list(AUDIO_CHANNELS), "dropout": DROPOUT,
                                     "feature_noise": FEATURE_NOISE})
    model.init_weights(INIT)
    return model.to(runtime.device)


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
    model = build(loaders.feature_dim, runtime)
    print("parameters:", ", ".join(f"{k} {v:,}" for k, v in model.parameter_breakdown().items()),
          f"| total {sum(p.numel() for p in model.parameters()):,}")
    stages = stage_table()
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
                               int(WARMUP_FRACTION * total_steps), stage["lr"])
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
                grad_norm = torch.nn.utils.clip_grad_norm_(params, CLIP_NORM or float("inf"))
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
    runtime = setup_runtime(DEVICE, AMP_DTYPE, SEED)
    print(runtime.describe())
    folds = [0] if TEST_ACTORS else fold_list(FOLD, N_FOLDS)  # checked before any slow data work
    settings = data_settings()
    cache = prepare_data(settings)
    run = open_run("train_simple_working", RUN_NAME, OUTPUT_DIR, config, runtime.describe(), RESTART)
    cross_validate(run, folds, lambda fold_run, fold: train_fold(fold_run, fold, settings, cache, runtime, config),
                   f"{len(folds)}-fold actor-disjoint CV over actors {ACTORS}, "
                   f"modalities {'+'.join(MODALITIES)} ({VISUAL_INPUT if 'visual' in MODALITIES else 'no visual'}), "
                   f"{settings.calibration_settings.describe()}",
                   explicit_split=bool(TEST_ACTORS),
                   select=SELECT_CHECKPOINT, test_time_shifts=TEST_TIME_SHIFTS)


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:], user_errors=(DataError, ModelConfigError))
