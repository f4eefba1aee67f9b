"""Tests of the training plumbing: overrides, precision choice, the train step, metrics, checkpoints, stages."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from training import config as cfg
from training.checkpoint import load_checkpoint, load_model_weights, make_state, save_checkpoint
from training.config import ConfigError, apply_overrides
from training.metrics import classification_metrics, summarize_folds
from training.runtime import Runtime, resolve_amp_dtype, setup_runtime
from training.stages import make_optimizer, set_trainable, train_mode
from training.step import NonFiniteLossError, cosine_lr, train_step


class TinyModel(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.config = {"width": width}
        self.encoder = nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width))
        self.classifier = nn.Linear(width, 8)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.classifier(torch.relu(self.encoder(batch["x"])))


def tiny_batch(n: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(n, 3, generator=g), "label": torch.randint(0, 8, (n,), generator=g)}


def test_overrides_parse_literals_and_both_spellings():
    ns = {"BATCH_SIZE": 16, "LR": 1e-3, "MODALITIES": ("audio", "visual"), "DATA_ROOT": "x", "AMP": True}
    resolved = apply_overrides(ns, ["--batch-size=32", "--lr=0", "--modalities=['audio']",
                                    "--data_root=/content/drive/RAVDESS", "--amp=False"])
    assert ns["BATCH_SIZE"] == 32 and ns["LR"] == 0.0 and isinstance(ns["LR"], float)
    assert ns["MODALITIES"] == ("audio",) and ns["DATA_ROOT"] == "/content/drive/RAVDESS" and ns["AMP"] is False
    assert resolved["BATCH_SIZE"] == 32
    apply_overrides(ns, ["--modalities=audio"])
    assert ns["MODALITIES"] == ("audio",)
    apply_overrides(ns, ["--modalities=audio,visual"])
    assert ns["MODALITIES"] == ("audio", "visual")


def test_overrides_reject_unknown_key_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown option --batchsize \(did you mean --batch_size\?\)"):
        apply_overrides({"BATCH_SIZE": 16}, ["--batchsize=3"])


@pytest.mark.parametrize("arg", ["--batch_size=abc", "batch_size=3", "--batch_size"])
def test_overrides_reject_malformed_values(arg):
    with pytest.raises(ConfigError):
        apply_overrides({"BATCH_SIZE": 16}, [arg])


def test_auto_precision_rules(monkeypatch):
    assert resolve_amp_dtype("auto", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert resolve_amp_dtype("auto", torch.device("cuda")) == torch.float16  # T4: fp16 + scaler
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_amp_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert Runtime(torch.device("cpu"), torch.float16).use_scaler
    assert not Runtime(torch.device("cpu"), torch.bfloat16).use_scaler
    with pytest.raises(ConfigError):
        resolve_amp_dtype("half-ish", torch.device("cpu"))


def test_train_step_learns_and_clips_and_reports_norm():
    runtime = setup_runtime("cpu", "float32", seed=0)
    model = TinyModel()
    optimizer = make_optimizer(model, lr=0.05, weight_decay=0.0)
    scaler = runtime.make_scaler()
    batch = tiny_batch()
    model.train()
    first = train_step(model, batch, optimizer, scaler, runtime, clip_norm=1e-3)
    assert first.grad_norm > 1e-3 and not first.skipped  # the norm is the pre-clip norm
    for _ in range(200):
        last = train_step(model, batch, optimizer, scaler, runtime, clip_norm=1.0)
    assert last.loss < 0.2 * first.loss


def test_train_step_stops_on_non_finite_loss():
    runtime = setup_runtime("cpu", "float32")
    model = TinyModel()
    optimizer = make_optimizer(model, lr=0.01, weight_decay=0.0)
    batch = tiny_batch()
    batch["x"][0, 0] = float("nan")
    model.train()
    with pytest.raises(NonFiniteLossError):
        train_step(model, batch, optimizer, runtime.make_scaler(), runtime)


def test_without_scaler_a_non_finite_gradient_stops_before_the_step():
    runtime = setup_runtime("cpu", "float32")
    model = TinyModel()
    optimizer = make_optimizer(model, lr=0.01, weight_decay=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    next(model.parameters()).register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm"):
        train_step(model, tiny_batch(), optimizer, runtime.make_scaler(), runtime)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert not optimizer.state  # AdamW never stepped: no moments were written from the bad gradient


def test_crash_dump_holds_the_pre_step_state_scaler_and_progress(tmp_path):
    from training.progress import Progress, crash_exit
    from training.runs import RunFolder

    runtime = Runtime(torch.device("cpu"), torch.float16)
    model = TinyModel()
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0 ** 10)
    batch = tiny_batch()
    batch["x"][0, 0] = float("nan")
    progress = Progress(epoch=2, step=37)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(NonFiniteLossError) as caught:
        train_step(model.train(), batch, make_optimizer(model, 0.01, 0.0), scaler, runtime)
    with pytest.raises(SystemExit, match="debug_gradients.py --replay="):
        crash_exit(RunFolder("t", "r", root=tmp_path), batch, model, "tiny", caught.value, "epoch 3", scaler, progress)
    dump = torch.load(tmp_path / "t" / "r" / "crash" / "crash.pt", weights_only=True)
    assert dump["model_name"] == "tiny" and dump["scaler"]["scale"] == 2.0 ** 10
    assert dump["progress"]["step"] == 37 and "non-finite loss" in dump["reason"]
    assert all(torch.equal(dump["model"][name], weights) for name, weights in before.items())
    assert torch.isnan(dump["batch"]["x"][0, 0])


def test_float16_scaler_skips_overflowing_step_and_keeps_weights():
    runtime = Runtime(torch.device("cpu"), torch.float16)
    model = TinyModel()
    optimizer = make_optimizer(model, lr=0.01, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0 ** 16)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()

    # An overflowed gradient during backward, as float16 produces it.
    next(model.parameters()).register_hook(lambda grad: grad * float("inf"))
    result = train_step(model, tiny_batch(), optimizer, scaler, runtime)
    assert result.skipped and math.isinf(result.grad_norm)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert scaler.get_scale() < 2.0 ** 16


def test_metrics_on_known_confusion():
    y_true = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 2, 0, 0])
    m = classification_metrics(y_true, y_pred, num_classes=4)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["uar"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)  # class 3 absent: not averaged in
    assert m["per_class_accuracy"][3] is None
    assert m["confusion"][2] == [2, 0, 2, 0]
    f1 = [2 * 0.5 * (1 / 3) / (0.5 + 1 / 3), 2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * 1 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    s = summarize_folds([{"accuracy": 0.5, "uar": 0.5, "macro_f1": 0.4}, {"accuracy": 0.7, "uar": 0.6, "macro_f1": 0.5}])
    assert s["accuracy"]["mean"] == pytest.approx(0.6) and s["accuracy"]["std"] == pytest.approx(0.1)


def test_cosine_lr_warms_up_then_decays():
    lrs = [cosine_lr(s, total_steps=100, warmup_steps=10, base_lr=1.0) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[100] == pytest.approx(0.05)


def test_checkpoint_is_atomic_weights_only_and_rejects_other_models(tmp_path):
    runtime = setup_runtime("cpu", "float32")
    model = TinyModel()
    optimizer = make_optimizer(model, lr=0.01, weight_decay=0.0)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, make_state(model, "tiny", optimizer, runtime.make_scaler(), progress={"epoch": 3}))
    assert not list(tmp_path.glob("*.tmp"))
    state = torch.load(path, weights_only=True)
    assert state["model_config"] == {"width": 4} and state["progress"]["epoch"] == 3
    clone = TinyModel()
    load_model_weights(clone, load_checkpoint(path), "tiny", path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), clone.state_dict().values()))
    with pytest.raises(ConfigError, match="holds a 'tiny' model"):
        load_model_weights(TinyModel(), state, "lite", path)
    with pytest.raises(ConfigError, match="differs in: width"):
        load_model_weights(TinyModel(width=5), state, "tiny", path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(ConfigError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_frozen_modules_do_not_change_and_keep_batchnorm_stats():
    runtime = setup_runtime("cpu", "float32")
    model = TinyModel()
    frozen = set_trainable(model, ("classifier",))
    assert frozen == ["encoder"]
    optimizer = make_optimizer(model, lr=0.1, weight_decay=0.1)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    classifier_before = model.classifier.weight.detach().clone()
    for _ in range(5):
        train_mode(model, frozen)
        train_step(model, tiny_batch(), optimizer, runtime.make_scaler(), runtime)
    assert all(torch.equal(encoder_before[k], v) for k, v in model.encoder.state_dict().items())
    assert not torch.equal(classifier_before, model.classifier.weight)
    with pytest.raises(ValueError, match="unknown modules"):
        set_trainable(model, ("clasifier",))
    set_trainable(model, "all")
    assert all(p.requires_grad for p in model.parameters())


def test_config_keys_only_plain_upper_constants():
    ns = {"LR": 1.0, "lower": 1, "Path": object(), "_PRIVATE": 1, "TORCH": torch}
    assert cfg.config_keys(ns) == ["LR"]


def test_learned_tokens_and_norms_get_no_weight_decay():
    model = TinyModel()
    model.placeholder = nn.Parameter(torch.zeros(2, 4))  # a top-level learned token, 2-D like a weight
    groups = make_optimizer(model, lr=0.1, weight_decay=0.5).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.placeholder) not in decayed and id(model.encoder[1].weight) not in decayed
    assert id(model.encoder[0].weight) in decayed and id(model.classifier.weight) in decayed


def test_xavier_keeps_depthwise_convolutions_at_fan_in_scale():
    from models.init import apply_init

    model = nn.Sequential(nn.Conv1d(768, 768, 3, groups=768), nn.Linear(768, 768))
    apply_init(model, "xavier", gain=0.5)
    bound = 1 / math.sqrt(3)  # PyTorch's default for a depthwise kernel of size 3
    assert model[0].weight.abs().max() > 0.5 * bound
    assert model[1].weight.abs().max() <= 0.5 * math.sqrt(6 / (768 + 768)) + 1e-6
