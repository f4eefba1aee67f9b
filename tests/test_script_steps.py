"""Every training script writes its step out in its loop (DESIGN.md); each must do what the tested reference step,
training.step.train_step, does: the same batch from the same state gives bit-identical weights, loss and norm."""
from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from tests.conftest import imported_script
from tests.test_train_scripts import run_main, tiny_overrides
from training.step import cross_entropy, train_step


class StopAfterFirstStep(Exception):
    pass


@pytest.fixture
def script(request):
    yield from imported_script(request.param)


TINY_LITE = {"WIDTH": 32, "FUSION_LAYERS": 1, "FRAME_BACKBONE": "small", "AUDIO_CHANNELS": (4, 8, 8, 8),
             "MIXUP_ALPHA": 0.4, "FUSION": "gated"}
TINY_FULL = {"WIDTH": 32, "MLP_HIDDEN": 64, "N_HEADS": 2, "N_KV_HEADS": 1, "LAYOUT": "conv,attn",
             "AUDIO_CHANNELS": (4, 8, 8, 8), "FRAME_BACKBONE": "small"}


@pytest.mark.parametrize("script, extra", [
    ("train_simple_working", {}),
    ("train_lite_model", TINY_LITE),  # mixup on: the two labels' losses and the mixed inputs
    ("train_full_model", TINY_FULL),
], indirect=["script"])
def test_each_scripts_loop_steps_as_the_reference_step(script, extra, synthetic_root, synthetic_cache, tmp_path,
                                                       monkeypatch):
    seen: dict = {}
    module = vars(script)

    def recording(name, keep):
        original = module[name]

        def wrapper(*args, **kwargs):
            value = original(*args, **kwargs)
            seen[keep] = value[0] if isinstance(value, tuple) else value
            return value
        monkeypatch.setattr(script, name, wrapper)

    recording("setup_runtime", "runtime")
    recording("build", "model")
    recording("make_optimizer", "optimizer")
    original_move = module["move_batch"]

    def move_and_snapshot(batch, device):
        batch = original_move(batch, device)
        if "before" not in seen:  # the state the first step starts from, and the batch it takes
            seen["before"] = copy.deepcopy((seen["model"], seen["optimizer"]))
            seen["rng"] = torch.get_rng_state()
            seen["batch"] = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        return batch
    monkeypatch.setattr(script, "move_batch", move_and_snapshot)

    class Stats(script.EpochStats):
        def update(self, result):
            seen["result"] = result
            raise StopAfterFirstStep

    class EMA(script.WeightEMA):
        def update(self, model):  # right after the step: its weights
            seen["after"] = {k: v.clone() for k, v in model.state_dict().items()}
            super().update(model)
    monkeypatch.setattr(script, "EpochStats", Stats)
    monkeypatch.setattr(script, "WeightEMA", EMA)

    overrides = {**tiny_overrides(synthetic_root, synthetic_cache, tmp_path), "CLIP_NORM": 0.05, "RUN_NAME": "step",
                 **extra}
    with pytest.raises(StopAfterFirstStep):
        run_main(script, overrides)

    model, optimizer = seen["before"]
    lr = seen["optimizer"].param_groups[0]["lr"]
    for group in optimizer.param_groups:
        group["lr"] = lr
    torch.set_rng_state(seen["rng"])
    runtime = seen["runtime"]
    reference = train_step(model, seen["batch"], optimizer, runtime.make_scaler(), runtime,
                           loss_fn=partial(cross_entropy, label_smoothing=script.LABEL_SMOOTHING), clip_norm=0.05,
                           mixup_alpha=extra.get("MIXUP_ALPHA", 0.0))
    assert seen["result"] == reference
    assert reference.grad_norm > 0.05  # the clipping acted
    after = model.state_dict()
    assert set(after) == set(seen["after"])
    for key, value in after.items():
        assert torch.equal(value, seen["after"][key]), key
