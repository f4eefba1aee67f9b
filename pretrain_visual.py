"""Pretrain the per-frame face encoder (`models.encoders.FrameEncoder`) on face-expression images (FER2013).

The checkpoint's backbone is what `FrameEncoder.load_face_pretrained(path)` loads into the Lite and the full
model, so their visual encoder starts from expression features instead of random (or generic ImageNet) ones.

Data: an ImageFolder tree `<root>/{train,val}/<class>/*.png` (48x48 grayscale, the common FER2013 download) or
the original `fer2013.csv` (`emotion`, `pixels`, `Usage`; Training for training, PublicTest for validation).
Grayscale is replicated to 3 channels and ImageNet-normalised, exactly as the RAVDESS frames are.

    python pretrain_visual.py                                   # small CPU backbone, ../shared FER2013 folder
    python pretrain_visual.py --backbone=resnet18 --pretrained=True --image_size=112 --run_name=fer_resnet18
    !python pretrain_visual.py --data_root=/content/fer2013.csv --backbone=resnet18 --pretrained=True   # Colab

The same command with the same --run_name resumes from the last epoch. Output:
checkpoints/pretrain_visual/<run_name>/{config.json, log.jsonl, ckpt_best.pt, ckpt_last.pt, metrics.json}.
"""
from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.encoders import FACE_CHECKPOINT_KIND
from models.face_classifier import FaceClassifier
from common.config import ConfigError, config_keys, run_script
from common.distributed import from_main, shard, world_size, wrap_model
from training.progress import EpochStats, FoldCheckpoints, Progress, crash_exit, end_epoch, resume
from training.runs import RunFolder
from training.runtime import setup_runtime
from training.stages import make_optimizer
from training.step import NonFiniteLossError, cosine_lr, cross_entropy, evaluate, set_lr, train_step

# --- data
DATA_ROOT = "../shared/data/fer2013_48"  # ImageFolder root with train/ and val/, or a FER2013 .csv file
IMAGE_SIZE = 48  # pixels; images are resized to this (48 = native FER2013; 112 matches the RAVDESS crops)
MAX_TRAIN_IMAGES = 0  # 0 = all; a smaller number for a quick trial run
FER_CSV_CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]  # fer2013.csv label order
# --- augmentation (applied on the batch tensor, on the device)
MAX_ROTATION = 10.0  # degrees, uniform in [-x, x]
MAX_SHIFT = 0.1  # fraction of the image size, uniform in [-x, x] in each direction
SCALE_RANGE = (0.9, 1.1)  # zoom factor range
# --- model
BACKBONE = "small"  # small (CPU-trainable) | resnet18
_BACKBONE_CHOICES = ("small", "resnet18")
PRETRAINED = False  # True: start resnet18 from ImageNet weights (needs internet or the torch hub cache)
WIDTH = 256  # projection size of the encoder (not loaded downstream; only the backbone is)
DROPOUT = 0.3  # before the linear classifier
# --- optimisation
EPOCHS = 30
BATCH_SIZE = 128
LR = 2e-3  # AdamW peak learning rate
WEIGHT_DECAY = 0.05
WARMUP_EPOCHS = 1
LABEL_SMOOTHING = 0.1
CLIP_NORM = 1.0
# --- precision and runtime
DEVICE = "auto"  # "auto", "cpu", "cuda" or "cuda:1"
AMP_DTYPE = "auto"  # auto (fp16/bf16 on GPU, fp32 on CPU) | float32 | float16 | bfloat16 (2x faster on AVX512-BF16 CPU)
_AMP_DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
NUM_THREADS = 0  # CPU threads for PyTorch; 0 = PyTorch's default
SYNC_BATCHNORM = True  # under torchrun: BatchNorm statistics of the global batch (all processes), not of each share
SEED = 0
# --- output
OUTPUT_DIR = "checkpoints"
RUN_NAME = "fer_small"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_NAME = FACE_CHECKPOINT_KIND


# ----------------------------------------------------------------------------------------------------- data
def load_image_folder(split_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"no class folders in {split_dir}")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((split_dir / name).iterdir()):
            if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
                images.append(np.asarray(Image.open(path).convert("L").resize((48, 48)), dtype=np.uint8))
                labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


def load_fer_csv(path: Path, usage: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    images, labels = [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"emotion", "pixels", "Usage"} - set(reader.fieldnames or [])
        if missing:
            raise ConfigError(f"{path} lacks the FER2013 columns {sorted(missing)}")
        for row in reader:
            if row["Usage"] == usage:
                images.append(np.asarray(row["pixels"].split(), dtype=np.uint8).reshape(48, 48))
                labels.append(int(row["emotion"]))
    if not images:
        raise ConfigError(f"{path} has no rows with Usage={usage}")
    return np.stack(images), np.asarray(labels, dtype=np.int64), list(FER_CSV_CLASSES)


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(N, 48, 48) uint8 images, (N,) labels and the class names of the `train` or `val` split."""
    if root.suffix == ".csv" and root.is_file():
        images, labels, classes = load_fer_csv(root, "Training" if split == "train" else "PublicTest")
    elif (root / split).is_dir():
        images, labels, classes = load_image_folder(root / split)
    else:
        raise ConfigError(f"DATA_ROOT={root} is neither a FER2013 .csv nor a folder with {split}/<class>/ images")
    return torch.from_numpy(images), torch.from_numpy(labels), classes


class FaceBatches:
    """Iterable of batch dicts {"frames": (B, 1, 3, S, S), "label": (B,)} over in-memory uint8 images.

    Decoding 30k PNGs once and augmenting whole batches with one affine warp is far cheaper on a CPU than a
    per-image DataLoader pipeline.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device,
                 image_size: int, augment: bool, seed: int = 0):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.device, self.image_size, self.augment = device, image_size, augment
        self.generator = torch.Generator().manual_seed(seed)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __len__(self) -> int:
        images = math.ceil(len(self.labels) / world_size()) if self.augment else len(self.labels)
        return math.ceil(images / self.batch_size)

    def __iter__(self):
        # Training: this rank's share of one permutation (the same generator state on every rank) under torchrun.
        order = shard(torch.randperm(len(self.labels), generator=self.generator)) if self.augment else \
            torch.arange(len(self.labels))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.images[idx].to(self.device).float().div_(255.0)[:, None]  # (B, 1, 48, 48)
            x = self._random_affine(x) if self.augment else self._resize(x)
            x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
            yield {"frames": x[:, None], "label": self.labels[idx].to(self.device)}

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.image_size:
            return x
        return F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)

    def _random_affine(self, x: torch.Tensor) -> torch.Tensor:
        """Random rotation, zoom, shift and horizontal flip in one `grid_sample` (border pixels replicate)."""
        b = x.shape[0]
        rand = torch.rand(b, 5, generator=self.generator).to(x.device)
        angle = (rand[:, 0] * 2 - 1) * math.radians(MAX_ROTATION)
        scale = SCALE_RANGE[0] + rand[:, 1] * (SCALE_RANGE[1] - SCALE_RANGE[0])
        shift = (rand[:, 2:4] * 2 - 1) * MAX_SHIFT * 2  # grid coordinates span [-1, 1]
        flip = torch.where(rand[:, 4] < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], dim=1),
                             torch.stack([sin * flip, cos, shift[:, 1]], dim=1)], dim=1)
        grid = F.affine_grid(theta, [b, 1, self.image_size, self.image_size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------------------------------- main
def main() -> None:
    if NUM_THREADS > 0:
        torch.set_num_threads(NUM_THREADS)
    config = {k: globals()[k] for k in config_keys(globals())}
    runtime = setup_runtime(DEVICE, AMP_DTYPE, SEED)
    print(runtime.describe())

    start = time.time()
    root = Path(DATA_ROOT)
    train_images, train_labels, classes = load_split(root, "train")
    val_images, val_labels, val_classes = load_split(root, "val")
    if classes != val_classes:
        raise ConfigError(f"train classes {classes} differ from validation classes {val_classes}")
    if MAX_TRAIN_IMAGES:
        keep = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(SEED))[:MAX_TRAIN_IMAGES]
        train_images, train_labels = train_images[keep], train_labels[keep]
    print(f"{len(train_labels)} training / {len(val_labels)} validation images, classes {classes} "
          f"(loaded in {time.time() - start:.0f}s)")
    train_batches = FaceBatches(train_images, train_labels, BATCH_SIZE, runtime.device, IMAGE_SIZE, augment=True,
                                seed=SEED)
    val_batches = FaceBatches(val_images, val_labels, 256, runtime.device, IMAGE_SIZE, augment=False)

    model = FaceClassifier(BACKBONE, WIDTH, len(classes), DROPOUT, PRETRAINED, IMAGE_SIZE, classes)
    model.to(runtime.device)
    if runtime.amp_dtype is not None:  # channels_last is what makes bf16/fp16 convolutions fast (2x on a CPU)
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, LR, WEIGHT_DECAY)
    scaler = runtime.make_scaler()
    run = RunFolder("pretrain_visual", RUN_NAME, root=OUTPUT_DIR)
    run.write_config(config, runtime.describe())
    progress: Progress = resume(run, model, optimizer, scaler, MODEL_NAME)
    # Resuming restores the RNG streams of the last checkpoint, but the batch order has its own generator.
    train_batches.generator.manual_seed(SEED + progress.epoch)

    total_steps, warmup_steps = EPOCHS * len(train_batches), WARMUP_EPOCHS * len(train_batches)
    ddp_model = wrap_model(model, runtime.device, SYNC_BATCHNORM)  # under torchrun; else the model itself
    keep = FoldCheckpoints(MODEL_NAME, optimizer, scaler, config)  # ckpt_best.pt: the best validation epoch
    loss_fn = lambda logits, batch: cross_entropy(logits, batch, LABEL_SMOOTHING)  # noqa: E731
    while progress.epoch < EPOCHS:
        model.train()
        epoch_start, stats = time.time(), EpochStats()
        for batch in train_batches:
            lr = cosine_lr(progress.step, total_steps, warmup_steps, LR)
            set_lr(optimizer, lr)
            try:
                result = train_step(ddp_model, batch, optimizer, scaler, runtime, loss_fn=loss_fn, clip_norm=CLIP_NORM)
            except NonFiniteLossError as err:
                crash_exit(run, batch, model, MODEL_NAME, err, f"epoch {progress.epoch + 1}", scaler, progress)
            progress.step += 1
            stats.update(result)
        val = from_main(lambda: evaluate(model, val_batches, runtime, num_classes=len(classes)))  # once, on rank 0
        # train_step returns no logits, so training accuracy is not tracked (None leaves a gap in the figure).
        train_stats = {**stats.summary(), "train_accuracy": None, "epoch_seconds": time.time() - epoch_start}
        improved = end_epoch(run, progress, model, keep, val, train_stats, lr)
        print(f"epoch {progress.epoch}/{EPOCHS}  loss {train_stats['train_loss']:.3f}  val acc "
              f"{val['accuracy']:.1%}  UAR {val['uar']:.1%}  {train_stats['epoch_seconds']:.0f}s"
              f"{'  (best)' if improved else ''}", flush=True)

    metrics = {"best_val_accuracy": progress.best_metric, "best_epoch": progress.best_epoch,
               "epochs": progress.epoch, "checkpoint": str(run.best),
               # Summed over epochs, so it stays right across resumes.
               "train_seconds": sum(h.get("epoch_seconds", 0.0) for h in progress.history),
               "class_names": classes}
    run.write_metrics(metrics)
    print(f"best validation accuracy {progress.best_metric:.1%} (epoch {progress.best_epoch}); "
          f"load it with FrameEncoder.load_face_pretrained('{run.best}')")


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:])
