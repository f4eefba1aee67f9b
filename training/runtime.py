"""Device, precision and seeding.

Precision `auto`: float16 with a GradScaler on GPUs below compute capability 8.0 (T4, V100), bfloat16 at 8.0 and
above, float32 on the CPU. `torch.cuda.is_bf16_supported()` is not consulted: on a T4 it answers yes because
bf16 is emulated, which is slow and gains nothing.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from common import distributed
from common.config import ConfigError

AMP_DTYPES = {"float32": None, "fp32": None, "float16": torch.float16, "fp16": torch.float16,
              "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: plain float32

    @property
    def use_scaler(self) -> bool:
        # bf16 has float32's exponent range, so only float16 needs loss scaling.
        return self.amp_dtype == torch.float16

    @property
    def precision(self) -> str:
        return "float32" if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", "")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def make_scaler(self) -> torch.amp.GradScaler:
        # Created even when disabled so that fp16, bf16 and fp32 share one code path and one checkpoint format.
        return torch.amp.GradScaler(self.device.type, enabled=self.use_scaler)

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        scaler = " + GradScaler" if self.use_scaler else ""
        processes = (f", {distributed.world_size()} processes ({torch.distributed.get_backend()})"
                     if distributed.world_size() > 1 else "")
        return f"device {self.device} ({name}), precision {self.precision}{scaler}{processes}"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"DEVICE='{device}' but no CUDA GPU is available (use 'auto' or 'cpu')")
    return torch.device(device)


def resolve_amp_dtype(amp_dtype: str, device: torch.device) -> torch.dtype | None:
    if amp_dtype != "auto":
        if amp_dtype not in AMP_DTYPES:
            raise ConfigError(f"AMP_DTYPE='{amp_dtype}': choose auto, float32, float16 or bfloat16")
        return AMP_DTYPES[amp_dtype]
    if device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_runtime(device: str = "auto", amp_dtype: str = "auto", seed: int = 0) -> Runtime:
    """Pick the device and precision, seed every generator; returns the `Runtime` the train step uses.

    Under torchrun it first joins the process group (`common.distributed`): process i of a node takes
    cuda:LOCAL_RANK, and each rank seeds `seed + rank` so dropout and augmentation differ between processes (DDP
    copies rank 0's initial weights to every rank)."""
    resolved = resolve_device(device)
    if distributed.launched_by_torchrun() and resolved.type == "cuda" and resolved.index is not None:
        raise ConfigError(f"DEVICE='{device}' would put every torchrun process on one GPU: use 'auto' or 'cuda' "
                          "(process i takes cuda:LOCAL_RANK) and CUDA_VISIBLE_DEVICES to pick the GPUs")
    resolved = distributed.init_distributed(resolved)
    seed_everything(seed + distributed.rank())
    return Runtime(device=resolved, amp_dtype=resolve_amp_dtype(amp_dtype, resolved))


def rng_state() -> dict:
    """Every random generator's state as plain tensors/lists, so a resumed run continues the same streams."""
    state = {"python": list(random.getstate()), "numpy": list(np.random.get_state()), "torch": torch.get_rng_state()}
    state["numpy"][1] = torch.from_numpy(state["numpy"][1].astype(np.int64))
    state["python"][1] = torch.tensor(state["python"][1], dtype=torch.int64)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1].tolist()), python[2]))
    numpy_state = list(state["numpy"])
    numpy_state[1] = numpy_state[1].numpy().astype(np.uint32)
    np.random.set_state(tuple(numpy_state))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
