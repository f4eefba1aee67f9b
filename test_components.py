"""Each component of the Lite and the full model checked alone: audio branch, visual branch, fusion, classifier.

Per component, at small widths on tiny tensors: output shape; finite forward and backward in float32 and under
float16 autocast; every trainable parameter receives a finite, non-zero gradient; and the component alone overfits
one tiny batch (its loss falls by at least 90% within 200 steps). A component that fails here is broken by
itself, whatever the rest of the model does.

Both a script that prints a table and a pytest file (pytest.ini lists it in `testpaths`):
    python test_components.py
    python test_components.py --models="('full',)" --overfit_steps=400
    pytest test_components.py -q
Colab: `!python test_components.py`
"""
from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# --- which components ---
MODELS = ("lite", "full")  # lite | full
_MODELS_CHOICES = ("lite", "full")
LITE_FUSIONS = ("concat", "product", "gated", "cross_attention", "transformer")  # Lite fusion strategies checked
# --- sizes (tiny tensors, the same code paths as the real configuration) ---
BATCH = 4  # samples in the one batch
AUDIO_FRAMES = 128  # log-mel time steps (the real clip has 361); 128 leaves 4 distinct steps after the CNN
N_FRAMES = 4  # face frames per clip (the real clip has 16)
FRAME_SIZE = 32  # px (the real crops are 112)
WIDTH = 32  # token width of both models
TOKENS = 4  # tokens per modality
# --- checks ---
OVERFIT_STEPS = 200  # the loss must fall by OVERFIT_DROP within this many steps
OVERFIT_DROP = 0.9  # fraction of the initial loss that must be gone
OVERFIT_LR = 3e-3  # Adam learning rate of the overfitting check
AUTOCAST_DTYPE = "float16"  # float16 | bfloat16 (bfloat16 is ~70x slower on a CPU)
_AUTOCAST_DTYPE_CHOICES = ("float16", "bfloat16")
SEED = 0



def lite_config() -> dict:
    # Dropout off: the overfitting check needs a deterministic loss.
    return {"width": WIDTH, "audio_channels": [4, 8, 8, 16], "audio_tokens": TOKENS, "frame_backbone": "tiny",
            "visual_tokens": TOKENS, "fusion_layers": 1, "n_heads": 4, "mlp_ratio": 2, "dropout": 0.0,
            "encoder_dropout": 0.0}


def full_config() -> dict:
    # Both block kinds of the LFM2 layout, at a quarter of its depth.
    return {"width": WIDTH, "n_segments": TOKENS, "audio_channels": [4, 8, 8, 16], "frame_backbone": "tiny",
            "layout": ["conv", "attn", "conv", "attn"], "n_heads": 4, "n_kv_heads": 2, "mlp_hidden": 64,
            "dropout": 0.0, "encoder_dropout": 0.0}


@dataclass
class Component:
    """One component, the inputs it receives inside the model, and how its output is scored."""

    name: str  # e.g. "full/fusion"
    module: nn.Module  # owns every parameter the component trains
    forward: Callable[..., torch.Tensor]  # (module, *inputs) -> output
    inputs: tuple[torch.Tensor, ...]
    shape: tuple[int, ...]  # expected output shape
    target: torch.Tensor  # labels (B,) for logits, else a teacher's output (see `component`)

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.forward(self.module, *inputs)

    def loss(self, output: torch.Tensor) -> torch.Tensor:
        if self.target.dtype == torch.long:
            return F.cross_entropy(output.float(), self.target)
        return F.mse_loss(output.float(), self.target)


def _generator(offset: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + offset)


def _tokens(n: int, offset: int) -> torch.Tensor:
    return torch.randn(BATCH, n, WIDTH, generator=_generator(offset))


def _build(name: str, config: dict, seed: int) -> nn.Module:
    import models

    torch.manual_seed(seed)
    return models.build_model(name, config).train()


def component(name: str, model_name: str, config: dict, pick: Callable[[nn.Module], nn.Module],
              forward: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], shape: tuple[int, ...],
              labels: torch.Tensor | None = None) -> Component:
    """The component `pick(model)` of a freshly built model. Without `labels` the target is the output of the same
    component of a model built with another seed: a target it can reach whatever its architecture (an attention
    pool only averages its input tokens, so it could never fit random noise)."""
    module = pick(_build(model_name, config, SEED))
    target = labels
    if target is None:
        with torch.no_grad():
            target = forward(pick(_build(model_name, config, SEED + 1)), *inputs).float()
    return Component(name, module, forward, inputs, shape, target)


def _call(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    return module(*inputs)


def lite_components() -> list[Component]:
    config, tokens = lite_config(), (BATCH, TOKENS, WIDTH)
    audio = torch.randn(BATCH, 1, 64, AUDIO_FRAMES, generator=_generator(1))
    frames = torch.randn(BATCH, N_FRAMES, 3, FRAME_SIZE, FRAME_SIZE, generator=_generator(2))
    out = [component("lite/audio", "lite", config, lambda m: m.audio_encoder, _call, (audio,), tokens),
           component("lite/visual", "lite", config, lambda m: m.visual_encoder, _call, (frames,), tokens)]
    for strategy in LITE_FUSIONS:
        fused = {**config, "fusion": strategy}
        out_dim = _build("lite", fused, SEED).fusion.out_dim
        out.append(component(f"lite/fusion[{strategy}]", "lite", fused, lambda m: m.fusion, _call,
                             (_tokens(TOKENS, 3), _tokens(TOKENS, 4)), (BATCH, out_dim)))
    out_dim = _build("lite", config, SEED).fusion.out_dim
    labels = torch.randint(0, 8, (BATCH,), generator=_generator(5))
    out.append(component("lite/classifier", "lite", config, lambda m: m.classifier, _call,
                         (torch.randn(BATCH, out_dim, generator=_generator(6)),), (BATCH, 8), labels))
    return out


def full_components() -> list[Component]:
    config, tokens = full_config(), (BATCH, TOKENS, WIDTH)
    audio = torch.randn(BATCH, 1, 64, AUDIO_FRAMES, generator=_generator(1))
    frames = torch.randn(BATCH, N_FRAMES, 3, FRAME_SIZE, FRAME_SIZE, generator=_generator(2))
    # Audio and visual tokens of the same segment share a rotary position, as in MultimodalFER.tokens.
    positions = torch.arange(TOKENS).repeat(2)
    labels = torch.randint(0, 8, (BATCH,), generator=_generator(5))
    return [
        component("full/audio", "full", config, lambda m: m.audio_encoder, _call, (audio,), tokens),
        component("full/visual", "full", config, lambda m: m.visual_encoder, _call, (frames,), tokens),
        component("full/fusion", "full", config, lambda m: m.fusion, lambda fusion, x: fusion(x, positions),
                  (_tokens(2 * TOKENS, 3),), (BATCH, 2 * TOKENS, WIDTH)),
        # The full model's head is the attention pooling over the fused tokens, then the linear classifier.
        component("full/classifier", "full", config,
                  lambda m: nn.ModuleDict({"pool": m.pool, "classifier": m.classifier}),
                  lambda head, x: head["classifier"](head["pool"](x)), (_tokens(2 * TOKENS, 6),), (BATCH, 8),
                  labels),
    ]


BUILDERS = {"lite": lite_components, "full": full_components}


def components(model_names: tuple[str, ...]) -> list[Component]:
    return [c for name in model_names for c in BUILDERS[name]()]


# ------------------------------------------------------------------------------------------------- checks
def forward_backward(component: Component, amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and loss of one forward (under autocast when `amp_dtype` is set) and backward."""
    component.module.zero_grad(set_to_none=True)
    inputs = [x.clone().requires_grad_(x.is_floating_point()) for x in component.inputs]
    if amp_dtype is None:
        output = component.run(*inputs)
    else:
        with torch.autocast("cpu", dtype=amp_dtype):
            output = component.run(*inputs)
    loss = component.loss(output)
    loss.backward()
    return output, loss


def check_finite(component: Component, amp_dtype: torch.dtype | None) -> str | None:
    """None when output, loss and every gradient are finite; else what was not."""
    output, loss = forward_backward(component, amp_dtype)
    if not torch.isfinite(output).all() or not torch.isfinite(loss):
        return f"non-finite output ({loss.item()})"
    bad = [n for n, p in component.module.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
    return f"non-finite gradient in {bad[:3]}" if bad else None


def missing_gradients(component: Component) -> list[str]:
    """Trainable parameters that get no gradient, or an all-zero one, from one float32 backward."""
    forward_backward(component, None)
    return [n for n, p in component.module.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]


def overfit(component: Component, steps: int = OVERFIT_STEPS, lr: float = OVERFIT_LR) -> tuple[float, float, int]:
    """Train the component alone on its one batch; (initial loss, best loss, steps to reach the target drop)."""
    state = {k: v.clone() for k, v in component.module.state_dict().items()}
    optimizer = torch.optim.Adam(component.module.parameters(), lr=lr)
    first = best = None
    try:
        for step in range(1, steps + 1):
            optimizer.zero_grad(set_to_none=True)
            loss = component.loss(component.run(*component.inputs))
            loss.backward()
            optimizer.step()
            value = loss.item()
            first = value if first is None else first
            best = value if best is None else min(best, value)
            if best <= (1 - OVERFIT_DROP) * first:
                return first, best, step
        return first, best, steps
    finally:
        component.module.load_state_dict(state)  # the other checks see the initial weights


def amp_dtype() -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[AUTOCAST_DTYPE]


# -------------------------------------------------------------------------------------------------- pytest
@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run fastest on one thread; on a busy CPU, OpenMP threads waiting for a core make a 20 ms
    step take seconds. (tests/conftest.py does this for the whole run; this file is also run alone.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Components are built when a test first needs them, not at collection (a plain `pytest` collects this file).
COMPONENT_NAMES = ["lite/audio", "lite/visual", *(f"lite/fusion[{s}]" for s in LITE_FUSIONS), "lite/classifier",
                   "full/audio", "full/visual", "full/fusion", "full/classifier"]


@functools.lru_cache(maxsize=None)
def _model_components(model_name: str) -> dict[str, Component]:
    return {c.name: c for c in BUILDERS[model_name]()}


@pytest.fixture(params=COMPONENT_NAMES)
def part(request) -> Component:
    return _model_components(request.param.split("/")[0])[request.param]


def test_output_shape(part):
    with torch.no_grad():
        assert tuple(part.run(*part.inputs).shape) == part.shape


def test_finite_float32(part):
    assert check_finite(part, None) is None


def test_finite_under_autocast(part):
    assert check_finite(part, amp_dtype()) is None


def test_every_parameter_gets_a_gradient(part):
    assert missing_gradients(part) == []


def test_overfits_one_batch(part):
    first, best, _ = overfit(part)
    assert best <= (1 - OVERFIT_DROP) * first, f"loss {first:.4g} -> {best:.4g} in {OVERFIT_STEPS} steps"


# -------------------------------------------------------------------------------------------------- script
def table_row(component: Component) -> tuple[list[str], bool]:
    """One row of the table and whether every check passed."""
    start = time.perf_counter()
    with torch.no_grad():
        shape = tuple(component.run(*component.inputs).shape)
    fp32, amp = check_finite(component, None), check_finite(component, amp_dtype())
    missing = missing_gradients(component)
    first, best, steps = overfit(component)
    checks = [shape == component.shape, fp32 is None, amp is None, not missing,
              best <= (1 - OVERFIT_DROP) * first]
    params = sum(p.numel() for p in component.module.parameters())
    cells = [component.name, f"{params:,}", "x".join(map(str, shape)), fp32 or "ok", amp or "ok",
             f"{len(missing)} missing" if missing else "ok",
             f"{first:.3g}->{best:.3g} ({steps} steps)" + ("" if checks[-1] else " FAIL"),
             f"{time.perf_counter() - start:.1f}s"]
    return cells, all(checks)


def main() -> int:
    torch.set_num_threads(1)  # see one_thread()
    header = ["component", "params", "output", "float32", AUTOCAST_DTYPE, "gradients",
              f"overfit (-{OVERFIT_DROP:.0%})", "time"]
    rows, failed = [header], []
    for part in components(tuple(MODELS)):
        cells, passed = table_row(part)
        rows.append(cells)
        if not passed:
            failed.append(part.name)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\n{len(rows) - 1 - len(failed)} of {len(rows) - 1} components pass"
          + (f"; failing: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    from common.config import run_script

    run_script(main, globals(), sys.argv[1:])
