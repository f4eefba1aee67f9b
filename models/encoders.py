"""Modality encoders shared by MultimodalFERLite and the full MultimodalFER: each maps one input to tokens.

- `AudioEncoder`: VGG-style (or residual) 2D CNN over the log-mel `(B, 1, 64, T)` -> `(B, n_tokens, width)`
  segment tokens.
- `FrameEncoder`: per-frame 2D CNN (torchvision ResNet-18 or a small built-in ResNet) over `(B, N, 3, S, S)`
  face crops -> `(B, N, width)` per-frame tokens (or `n_tokens` after temporal resampling).
- `FeatureEncoder`: MLP over a per-clip feature vector `(B, D)` (e.g. 35 OpenFace action units) -> tokens.
- `AttentionPool`: learned-query attention pooling `(B, L, width) -> (B, width)`, optionally with its weights.
- `encode_present`: runs an encoder on the samples that have the modality only, so that BatchNorm statistics
  never see the zero placeholders of missing inputs, and fills in the learned placeholder tokens;
  `drop_one_modality` is the modality dropout of training.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models import ModelConfigError
from models.init import mark_residual_output
from models.layers import RMSNorm, attend, substitute_missing

# Channels of the built-in per-frame ResNets. "small" is the CPU-trainable face encoder pretrained on FER2013
# (pretrain_visual.py); "tiny" only exists so that tests run the same code path in a fraction of a second.
# No stage narrower than 16 channels: PyTorch 2.9's CPU float32 backward of a channels_last 1x1 stride-2 conv with
# fewer than 16 input channels corrupts the heap (segfault), and callers may well convert to channels_last.
SMALL_BACKBONES = {"small": (32, 64, 128, 256), "tiny": (16, 16, 32, 32)}
FRAME_BACKBONES = ("resnet18", *SMALL_BACKBONES)
FACE_CHECKPOINT_KIND = "face_encoder"  # the `model_name` of checkpoints written by pretrain_visual.py
FACE_BACKBONE_PREFIX = "encoder.backbone."  # where the backbone sits in that script's classifier state dict


class ResidualBlock(nn.Module):
    """ResNet basic block (two 3x3 conv-BN, identity or 1x1 projection shortcut)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = mark_residual_output(nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False))
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)), inplace=True)))
        return F.relu(self.shortcut(x) + branch, inplace=True)


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class BatchNorm1dAnyBatch(nn.BatchNorm1d):
    """BatchNorm1d that falls back to its running statistics for a training batch of one sample.

    `encode_present` can hand an encoder a single present sample; plain BatchNorm1d raises on that.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training and x.shape[0] > 1
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            use_batch_stats, self.momentum, self.eps)


# ----------------------------------------------------------------------------------------------------- audio
AUDIO_BLOCKS = ("vgg", "residual")


def vgg_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU at full resolution, then a 2x2 max-pool: the stage of the plain log-mel CNNs that
    generalise across actors on RAVDESS (the max-pool keeps the strongest time-frequency response of each cell)."""
    return nn.Sequential(conv_bn_relu(in_channels, out_channels, stride=1),
                         conv_bn_relu(out_channels, out_channels, stride=1), nn.MaxPool2d(2))


class AudioEncoder(nn.Module):
    """2D CNN over a log-mel spectrogram -> `n_tokens` segment tokens of size `width`.

    block="vgg" (default): VGG stages (two 3x3 convs + max-pool each). On 5-fold actor-disjoint CV of real RAVDESS
    speech it generalises far better than block="residual" (a stride-2 stem and one stride-2 residual block per
    stage), which fits its training actors but not new ones (docs/results.md, "What changed and what it bought").
    `time_pool` averages pairs of 10 ms frames first (a 20 ms hop), which halves the cost without losing accuracy.
    The input is standardised by BatchNorm over the batch (one mean/std for all bins), never by a per-clip std,
    which would divide by zero on a silent clip. Frequency is averaged at the end, time is pooled to n_tokens.
    (SpecAugment and the time shift are the dataset's job: `RavdessDataset(audio_augment=...)`.)
    """

    def __init__(self, width: int, n_mels: int = 64, channels: tuple = (32, 64, 128, 256), n_tokens: int = 8,
                 dropout: float = 0.1, block: str = "vgg", time_pool: int = 2):
        super().__init__()
        if block not in AUDIO_BLOCKS:
            raise ValueError(f"audio block must be one of {AUDIO_BLOCKS}, got '{block}'")
        channels = tuple(channels)
        self.n_tokens, self.n_mels, self.time_pool = n_tokens, n_mels, time_pool
        self.input_norm = nn.BatchNorm2d(1)
        if block == "vgg":
            stages, previous = [], 1
            for out_channels in channels:
                stages.append(vgg_stage(previous, out_channels))
                previous = out_channels
            self.blocks = nn.Sequential(*stages)
        else:
            previous = channels[0]
            stages = [conv_bn_relu(1, channels[0], stride=2)]
            for out_channels in channels:
                stages.append(ResidualBlock(previous, out_channels, stride=2))
                previous = out_channels
            self.blocks = nn.Sequential(*stages)
        self.out_channels = previous
        self.proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(previous, width))

    def feature_map(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, 1, n_mels, T) log-mel -> (B, C, T') frequency-averaged feature sequence."""
        if audio.dim() != 4 or audio.shape[1] != 1 or audio.shape[2] != self.n_mels:
            raise ValueError(f"AudioEncoder expects (B, 1, {self.n_mels}, T) log-mels, got {tuple(audio.shape)}")
        x = self.input_norm(audio)
        if self.time_pool > 1:
            x = F.avg_pool2d(x, (1, self.time_pool))
        return self.blocks(x).mean(dim=2)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool1d(self.feature_map(audio), self.n_tokens)  # (B, C, n_tokens)
        return self.proj(x.transpose(1, 2))


# ---------------------------------------------------------------------------------------------------- frames
class SmallResNet(nn.Module):
    """A small ResNet for 48-64 px face crops: a stride-1 stem conv and one basic block per stage, the first at
    full resolution (small faces need it), each later one halving it. `out_dim` = channels[-1]."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        self.stem = conv_bn_relu(3, channels[0], stride=1)
        blocks, previous = [], channels[0]
        for i, out_channels in enumerate(channels):
            blocks.append(ResidualBlock(previous, out_channels, stride=1 if i == 0 else 2))
            previous = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean(dim=(2, 3))


def resnet18_backbone(pretrained: bool, pretrained_path: str | None) -> nn.Module:
    """torchvision ResNet-18 without its classifier (`fc` = Identity), optionally with ImageNet weights.

    `pretrained_path` loads a saved torchvision state dict from disk (offline machines); otherwise torchvision
    downloads `ResNet18_Weights.DEFAULT` into the torch hub cache, or reads it from there if already cached.
    """
    from torchvision.models import ResNet18_Weights, resnet18

    if pretrained_path is not None:
        model = resnet18()
        try:
            model.load_state_dict(torch.load(pretrained_path, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError) as err:
            raise RuntimeError(f"cannot load ResNet-18 weights from {pretrained_path}: "
                               f"{str(err).splitlines()[0]}") from None
    elif pretrained:
        try:
            model = resnet18(weights=ResNet18_Weights.DEFAULT)
        except Exception as err:  # noqa: BLE001 - urllib/socket/SSL errors all mean "could not download"
            raise RuntimeError(
                f"could not download ImageNet ResNet-18 weights ({type(err).__name__}: {str(err).splitlines()[0]});"
                f" offline? put {ResNet18_Weights.DEFAULT.url.rsplit('/', 1)[-1]} in "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'} or pass pretrained_path=") from None
    else:
        model = resnet18()
    model.out_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


class FrameEncoder(nn.Module):
    """Per-frame CNN: `(B, N, 3, S, S)` ImageNet-normalised face crops -> `(B, N or n_tokens, width)` tokens.

    `backbone`: "resnet18" (torchvision; `pretrained=True` uses ImageNet weights), "small" (the FER-pretrainable
    CPU backbone) or "tiny" (tests). `input_size` resizes frames before the CNN (e.g. 48 for a backbone pretrained
    on 48 px FER2013 faces, which also makes it 5x cheaper on 112 px crops). `n_tokens` resamples the N frame
    tokens over time by average pooling so downstream token counts do not depend on the number of frames.
    """

    def __init__(self, width: int, backbone: str = "resnet18", pretrained: bool = False, n_tokens: int | None = None,
                 input_size: int | None = None, pretrained_path: str | None = None, dropout: float = 0.0):
        super().__init__()
        if backbone not in FRAME_BACKBONES:
            raise ValueError(f"unknown frame backbone '{backbone}' (choose from {', '.join(FRAME_BACKBONES)})")
        if backbone != "resnet18" and (pretrained or pretrained_path):
            raise ValueError(f"ImageNet weights exist only for resnet18, not '{backbone}' "
                             "(load FER weights with load_face_pretrained)")
        self.backbone_name, self.n_tokens, self.input_size = backbone, n_tokens, input_size
        self.pretrained = pretrained or pretrained_path is not None
        if backbone == "resnet18":
            self.backbone = resnet18_backbone(pretrained, pretrained_path)
        else:
            self.backbone = SmallResNet(SMALL_BACKBONES[backbone])
        self.proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.backbone.out_dim, width))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"FrameEncoder expects (B, N, 3, S, S) frames, got {tuple(frames.shape)}")
        b, n = frames.shape[:2]
        x = frames.flatten(0, 1)
        if self.input_size is not None and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                              align_corners=False)
        tokens = self.proj(self.backbone(x)).view(b, n, -1)
        if self.n_tokens is not None and self.n_tokens != n:
            tokens = F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.n_tokens).transpose(1, 2)
        return tokens

    def load_face_pretrained(self, path: str | Path) -> dict:
        """Load the backbone weights of a face-expression checkpoint written by `pretrain_visual.py`.

        Only the backbone is loaded (the projection to `width` belongs to the model being trained). Returns what
        the checkpoint says about its pretraining: image size, class names, best validation accuracy.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelConfigError(f"face-pretrained checkpoint not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("model_name") != FACE_CHECKPOINT_KIND:
            raise ModelConfigError(f"{path} is not a face-encoder checkpoint of pretrain_visual.py")
        trained = state["model_config"]["backbone"]
        if trained != self.backbone_name:
            raise ModelConfigError(f"{path} holds a '{trained}' backbone, this encoder uses '{self.backbone_name}'")
        prefix = FACE_BACKBONE_PREFIX
        weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
        try:
            self.backbone.load_state_dict(weights)
        except RuntimeError as err:
            raise ModelConfigError(f"{path} does not fit this backbone: {str(err).splitlines()[1].strip()}") from None
        self.pretrained = True
        config = state["model_config"]
        return {"image_size": config.get("image_size"), "class_names": config.get("class_names"),
                "val_accuracy": state.get("progress", {}).get("best_metric")}


# -------------------------------------------------------------------------------------------------- features
class FeatureEncoder(nn.Module):
    """MLP over a per-clip feature vector `(B, D)` -> `(B, n_tokens, width)`.

    BatchNorm standardises the raw features (action-unit intensities and presences live on different scales) and
    the hidden layer; Gaussian noise on the standardised input (training only) and dropout keep the MLP from
    memorising the few training actors' feature vectors (+7 points over the unregularised MLP on unseen actors).
    """

    def __init__(self, in_dim: int, width: int, n_tokens: int = 1, dropout: float = 0.3, input_noise: float = 0.1):
        super().__init__()
        self.n_tokens, self.width, self.input_noise = n_tokens, width, input_noise
        self.input_norm = BatchNorm1dAnyBatch(in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, width), BatchNorm1dAnyBatch(width), nn.ReLU(inplace=True),
                                 nn.Dropout(dropout), nn.Linear(width, n_tokens * width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2:
            raise ValueError(f"FeatureEncoder expects (B, D) features, got {tuple(features.shape)}")
        x = self.input_norm(features)
        if self.training and self.input_noise > 0:
            x = x + self.input_noise * torch.randn_like(x)
        return self.mlp(x).view(features.shape[0], self.n_tokens, self.width)


# ------------------------------------------------------------------------------------------------- pooling
class AttentionPool(nn.Module):
    """Learned-query attention pooling `(B, L, width) -> (B, width)`.

    Each head has one learned query; keys are RMS-normalised projections, values the normalised tokens
    themselves, so the output is a per-head weighted average of the tokens and the weights say how much each
    token (frame, audio segment) contributed.
    """

    def __init__(self, width: int, n_heads: int = 1):
        super().__init__()
        if width % n_heads:
            raise ValueError(f"width {width} is not divisible by n_heads {n_heads}")
        self.n_heads, self.head_dim = n_heads, width // n_heads
        self.norm = RMSNorm(width)
        self.key = nn.Linear(width, width, bias=False)
        self.key_norm = RMSNorm(self.head_dim)
        # Small random queries, not zeros: a zero query would give the key projection no gradient at all.
        self.query = nn.Parameter(torch.randn(n_heads, self.head_dim) * 0.02)

    def forward(self, tokens: torch.Tensor, return_weights: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        b, length, width = tokens.shape
        x = self.norm(tokens)
        k = self.key_norm(self.key(x).view(b, length, self.n_heads, self.head_dim)).transpose(1, 2)
        v = x.view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
        q = self.query.to(k.dtype)[None, :, None, :].expand(b, -1, -1, -1)  # (B, H, 1, Dh)
        pooled, weights = attend(q, k, v, need_weights=return_weights)
        pooled = pooled.reshape(b, width)
        return (pooled, weights) if return_weights else pooled


def encode_present(encoder: nn.Module, inputs: torch.Tensor, present: torch.Tensor,
                   placeholder: torch.Tensor) -> torch.Tensor:
    """`encoder(inputs)` for the samples whose modality is present, `placeholder` (L, width) for the others.

    Missing inputs are zeros by contract; feeding them to the encoder would shift its BatchNorm statistics, so
    they are left out of the forward pass altogether.
    """
    if bool(present.all()):
        return encoder(inputs)
    if not bool(present.any()):
        return placeholder[None].expand(inputs.shape[0], -1, -1)
    tokens = encoder(inputs[present])
    scattered = tokens.new_zeros((inputs.shape[0],) + tokens.shape[1:])
    scattered[present] = tokens
    return substitute_missing(scattered, present, placeholder)


def drop_one_modality(audio: torch.Tensor, visual: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Modality dropout: with probability `p`, hide the audio or the visual input (one of the two, at random)
    of a sample. Only samples that have both are eligible, so no sample ever loses its last modality."""
    drop = (torch.rand(audio.shape, device=audio.device) < p) & audio & visual
    drop_audio = drop & (torch.rand(audio.shape, device=audio.device) < 0.5)
    return audio & ~drop_audio, visual & ~(drop & ~drop_audio)
