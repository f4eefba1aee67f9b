"""The training scripts end to end on the synthetic RAVDESS fixture: runs, resume after kill -9, user errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import imported_script
import torch
from tests.shared_paths import REPO


def tiny_overrides(root: Path, cache: Path, out: Path) -> dict:
    """4 actors: test actor 1, validation actor 2, training actors 3-4 (32 clips), two epochs."""
    return {"DATASET": "ravdess", "DATA_ROOT": str(root), "CACHE_DIR": str(cache), "OUTPUT_DIR": str(out),
            "N_FOLDS": 4, "FOLD": 0, "N_VAL_ACTORS": 1, "BATCH_SIZE": 16, "NUM_WORKERS": 0, "DEVICE": "cpu"}


@pytest.fixture
def script(request):
    """A training script imported as a module; its constants are restored afterwards."""
    yield from imported_script(request.param)


def run_main(module, overrides: dict) -> None:
    vars(module).update(overrides)
    torch.manual_seed(0)
    module.main()


def final_weights(out: Path, script: str, run_name: str) -> dict:
    return torch.load(out / script / run_name / "fold0" / "ckpt_last.pt", weights_only=True)["model"]


def die_after_first_epoch(module, overrides: dict, monkeypatch) -> None:
    """Run a training script until the checkpoint of epoch 1 is written, then "die" there (KeyboardInterrupt);
    its end_epoch is restored afterwards, for the resuming run."""
    original_end_epoch = module.end_epoch
    calls = {"n": 0}

    def end_epoch_then_die(*args, **kwargs):
        improved = original_end_epoch(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return improved

    monkeypatch.setattr(module, "end_epoch", end_epoch_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_main(module, overrides)
    monkeypatch.setattr(module, "end_epoch", original_end_epoch)


@pytest.mark.parametrize("script", ["train_simple_working"], indirect=True)
def test_resumed_run_matches_uninterrupted_run(script, synthetic_root, synthetic_cache, tmp_path, monkeypatch):
    base = {**tiny_overrides(synthetic_root, synthetic_cache, tmp_path), "EPOCHS": 3, "PATIENCE": 99,
            "MODALITIES": ("audio",)}
    run_main(script, {**base, "RUN_NAME": "straight"})

    die_after_first_epoch(script, {**base, "RUN_NAME": "interrupted"}, monkeypatch)
    state = torch.load(tmp_path / "train_simple_working" / "interrupted" / "fold0" / "ckpt_last.pt", weights_only=True)
    assert state["progress"]["epoch"] == 1 and state["progress"]["step"] == 2
    assert {"optimizer", "scaler", "rng", "model_config"} <= set(state)
    torch.manual_seed(123)  # a different RNG state now: resume must restore the saved one
    vars(script).update({**base, "RUN_NAME": "interrupted"})
    script.main()

    straight = final_weights(tmp_path, "train_simple_working", "straight")
    resumed = final_weights(tmp_path, "train_simple_working", "interrupted")
    for key in straight:
        assert torch.allclose(straight[key].float(), resumed[key].float(), atol=1e-6), key
    log = [json.loads(line) for line in
           (tmp_path / "train_simple_working" / "interrupted" / "fold0" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    metrics = json.loads((tmp_path / "train_simple_working" / "interrupted" / "fold0" / "metrics.json").read_text())
    assert metrics["test_actors"] == [1] and metrics["val_actors"] == [2] and metrics["n"] == 16
    assert (tmp_path / "train_simple_working" / "interrupted" / "fold0" / "figures" / "confusion_matrix.png").stat().st_size > 0


def test_kill_9_mid_epoch_then_same_command_resumes(synthetic_root, synthetic_cache, tmp_path):
    args = [sys.executable, "train_simple_working.py"] + [
        f"--{k.lower()}={v}" for k, v in tiny_overrides(synthetic_root, synthetic_cache, tmp_path).items()] + [
        "--epochs=3", "--run_name=killed", "--modalities=('audio',)"]
    run_dir = tmp_path / "train_simple_working" / "killed" / "fold0"
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "ckpt_last.pt").exists():
        time.sleep(0.2)
    assert (run_dir / "ckpt_last.pt").exists(), "no checkpoint within 120 s"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists()
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed" in done.stdout
    assert (run_dir / "metrics.json").exists()
    assert not list(run_dir.glob("*.tmp"))


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, message", [
    (["train_simple_working.py", "--batchsize=3"], "error: unknown option --batchsize (did you mean --batch_size?)"),
    (["train_lite_model.py", "--dataset=ravdess", "--data_root=/no/such/folder"],
     "error: DATA_ROOT /no/such/folder does not exist"),
    (["train_full_model.py", "--fold=9"], "error: FOLD must be 'all' or 0..5, got 9"),
    (["train_simple_working.py", "--epochs=many"], "error: --epochs expects a number, got 'many'"),
])
def test_user_mistakes_are_one_line_errors(argv, message, tmp_path):
    done = run_cli(argv + [f"--output_dir={tmp_path}"])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line, no traceback
    assert done.stderr.startswith(message)


@pytest.mark.parametrize("script", ["train_simple_working"], indirect=True)
def test_checkpoint_of_another_model_is_a_clear_error(script, synthetic_root, synthetic_cache, tmp_path, capsys):
    from data.ravdess import DataError
    from models import ModelConfigError, build_model
    from training.checkpoint import make_state, save_checkpoint
    from common.config import run_script

    lite = build_model("lite", {"width": 32, "frame_backbone": "small", "fusion": "concat"})
    save_checkpoint(tmp_path / "train_simple_working" / "mixed" / "fold0" / "ckpt_last.pt", make_state(lite, "lite"))
    argv = [f"--{k.lower()}={v}" for k, v in tiny_overrides(synthetic_root, synthetic_cache, tmp_path).items()]
    with pytest.raises(SystemExit) as exit_info:
        run_script(script.main, vars(script), argv + ["--run_name=mixed"], user_errors=(DataError, ModelConfigError))
    assert exit_info.value.code == 2
    assert "holds a 'lite' model, this script trains 'simple'" in capsys.readouterr().err


def _recording_build(build, snapshots: list):
    def recording_build(*args, **kwargs):
        model, pretrained = build(*args, **kwargs)
        snapshots.append({k: v.clone() for k, v in model.audio_encoder.state_dict().items()})
        return model, pretrained
    return recording_build


@pytest.mark.parametrize("script, extra", [
    ("train_lite_model", {"WIDTH": 32, "FUSION_LAYERS": 1, "FUSION": "transformer", "MODALITIES": ("audio",),
                          "STAGE1_EPOCHS": 1, "STAGE2_EPOCHS": 1, "STAGE1_FROZEN": ("audio_encoder",)}),
    ("train_full_model", {"WIDTH": 32, "MLP_HIDDEN": 64, "N_HEADS": 2, "N_KV_HEADS": 1, "MODALITIES": ("audio",),
                          "STAGE1_EPOCHS": 1, "STAGE2_EPOCHS": 1, "STAGE1_FROZEN": ("audio_encoder",)}),
], indirect=["script"])
def test_progressive_scripts_run_both_stages(script, extra, synthetic_root, synthetic_cache, tmp_path, monkeypatch):
    """Stage 1 keeps the frozen encoder bit-identical (BatchNorm statistics included); stage 2 trains it."""
    snapshots = []
    original_end_epoch = script.end_epoch

    def end_epoch_with_snapshot(run, progress, model, *args, **kwargs):
        snapshots.append({k: v.clone() for k, v in model.audio_encoder.state_dict().items()})
        return original_end_epoch(run, progress, model, *args, **kwargs)

    monkeypatch.setattr(script, "end_epoch", end_epoch_with_snapshot)
    monkeypatch.setattr(script, "build", _recording_build(script.build, snapshots))
    run_main(script, {**tiny_overrides(synthetic_root, synthetic_cache, tmp_path), **extra, "RUN_NAME": "tiny"})
    initial, after_stage1, after_stage2 = snapshots
    assert all(torch.equal(initial[k], after_stage1[k]) for k in initial)
    assert not all(torch.equal(after_stage1[k], after_stage2[k]) for k in initial)
    run_dir = tmp_path / script.__name__ / "tiny" / "fold0"
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [0, 1]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    confusion = np.array(metrics["confusion"])  # the test actor's 16 clips, each counted once
    assert confusion.sum() == 16 and metrics["accuracy"] == pytest.approx(np.trace(confusion) / 16)
    assert metrics["skipped_steps"] == 0


@pytest.mark.parametrize("script", ["train_full_model"], indirect=True)
def test_full_model_layout_readout_and_encoder_init_constants(script):
    from models import ModelConfigError, build_model
    from models.fusion import Fusion

    vars(script).update({"WIDTH": 32, "MLP_HIDDEN": 64, "N_HEADS": 2, "N_KV_HEADS": 1, "AUDIO_CHANNELS": (4, 8),
                         "FRAME_BACKBONE": "tiny", "VISUAL_INPUT": "features"})
    assert len(build_model("full", script.model_config(35)).fusion.blocks) == 16  # "lfm2"
    script.LAYOUT = "conv,attn"
    assert [b.kind for b in build_model("full", script.model_config(35)).fusion.blocks] == ["conv", "attn"]
    script.LAYOUT = "conv,bogus"
    with pytest.raises(ModelConfigError, match="layout must be"):
        build_model("full", script.model_config(35))
    script.LAYOUT = "none"
    assert len(build_model("full", script.model_config(35)).fusion.blocks) == 0
    script.LAYOUT, script.READOUT = "conv,attn", "modality_pools"
    head = build_model("full", script.model_config(35)).pool
    assert isinstance(head, Fusion) and head.strategy == "concat"
    assert script.recipe()["encoder_init"] == script.ENCODER_INIT
    script.LEGACY = True
    assert script.recipe()["encoder_init"] == "default"  # the original run's PyTorch init, encoders included
