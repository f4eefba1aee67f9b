"""The training recipe and model selection (issue 11) and the figures a run logs (issue 10, items 1, 2, 4, 5, 7):
time shift, SpecAugment widths, EMA selection, test-time averaging, train accuracy, runs without validation
actors, presets under explicit settings, finished and mismatched runs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from data.dataset import AudioAugment, spec_augment
from models.simple_cnn import SimpleCNN
from tests.test_train_scripts import REPO, run_main, script, tiny_overrides  # noqa: F401 (fixture)
from common.config import ConfigError
from training.ema import WeightEMA
from training.evaluation import check_selection
from training.runtime import setup_runtime
from training.step import evaluate

NO_MASKS = dict(freq_masks=0, time_masks=0)


def test_time_shift_is_a_circular_roll_within_the_limit():
    logmel = torch.arange(3 * 50, dtype=torch.float32).view(1, 3, 50)
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        shifted = spec_augment(logmel, AudioAugment(time_shift_seconds=0.05, **NO_MASKS), steps_per_second=100)
        matches = [s for s in range(-5, 6) if torch.equal(shifted, torch.roll(logmel, s, dims=2))]
        assert len(matches) == 1, "not a circular shift of at most 5 frames"
        seen.add(matches[0])
    assert len(seen) > 5  # the shift is random, in both directions
    assert torch.equal(spec_augment(logmel, AudioAugment(time_shift_seconds=0.0, **NO_MASKS)), logmel)


def test_spec_augment_masks_respect_count_and_width():
    logmel = torch.randn(1, 64, 100)
    for seed in range(20):
        torch.manual_seed(seed)
        out = spec_augment(logmel, AudioAugment(freq_masks=1, freq_mask_bins=10, time_masks=0,
                                                time_shift_seconds=0.0))
        changed_rows = (out != logmel).any(dim=2)[0]
        assert changed_rows.sum() <= 10
        if changed_rows.any():  # one contiguous band
            rows = changed_rows.nonzero().flatten()
            assert rows.max() - rows.min() + 1 == len(rows)


def test_a_dataset_sample_keeps_its_label_under_augmentation(synthetic_cache):
    from data.dataset import RavdessDataset

    plain = RavdessDataset(synthetic_cache, visual=None)
    augmented = RavdessDataset(synthetic_cache, visual=None, spec_augment=AudioAugment(time_shift_seconds=0.3))
    a, b = plain[3], augmented[3]
    assert a["label"] == b["label"] and a["clip_id"] == b["clip_id"]
    assert a["audio"].shape == b["audio"].shape and not torch.equal(a["audio"], b["audio"])


def test_ema_average_lags_the_model_and_is_what_selection_tests():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    ema = WeightEMA(model, decay=0.5)
    ema.update(model)  # the first update copies the weights
    with torch.no_grad():
        model[0].weight.add_(2.0)
    model(torch.randn(8, 4) + 3)  # moves the BatchNorm statistics
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, model[0].weight - 1.0)  # halfway: decay 0.5
    assert not torch.allclose(ema.module[1].running_mean, model[1].running_mean)  # statistics averaged too


def test_test_time_shifts_average_probabilities():
    torch.manual_seed(0)
    batches = [{"audio": torch.randn(4, 1, 64, 100), "label": torch.zeros(4, dtype=torch.int64)} for _ in range(2)]

    class FirstFrames(torch.nn.Module):  # logits = the first 8 frames of one mel bin: shifts change them
        def forward(self, batch):
            return batch["audio"][:, 0, 20, :8]

    runtime = setup_runtime("cpu", "float32", 0)
    averaged = torch.tensor(evaluate(FirstFrames(), batches, runtime, audio_shifts=2, shift_steps=10)["probabilities"])
    audio = torch.cat([b["audio"] for b in batches])
    expected = sum(torch.roll(audio, offset, dims=-1)[:, 0, 20, :8].softmax(-1) for offset in (-20, -10, 0, 10, 20)) / 5
    assert torch.allclose(averaged, expected, atol=1e-4)
    plain = torch.tensor(evaluate(FirstFrames(), batches, runtime)["probabilities"])
    assert torch.allclose(plain, audio[:, 0, 20, :8].softmax(-1), atol=1e-4)


def test_selection_needs_validation_actors_only_for_best_val():
    with pytest.raises(ConfigError, match="needs validation actors"):
        check_selection("best_val", has_val_actors=False, epochs=5)
    assert "fixed budget of 5 epochs" in check_selection("ema", has_val_actors=False, epochs=5)
    with pytest.raises(ConfigError, match="last, ema, best_val"):
        check_selection("newest", has_val_actors=True, epochs=5)


def test_simple_cnn_batchnorm_never_sees_a_missing_modality():
    model = SimpleCNN(visual_input="features", feature_dim=6).train()
    batch = {"audio": torch.randn(6, 1, 64, 40), "features": torch.randn(6, 6) + 5.0,
             "has_audio": torch.ones(6, dtype=torch.bool), "has_visual": torch.tensor([1, 1, 1, 0, 0, 0]).bool()}
    batch["features"][3:] = 0.0  # the zero placeholders of missing features
    model(batch)
    mean = model.visual_encoder.input_norm.running_mean
    assert torch.allclose(mean, 0.1 * batch["features"][:3].mean(0), atol=1e-5)  # momentum 0.1 from zero


@pytest.mark.parametrize("script", ["train_simple_working"], indirect=True)
def test_a_run_logs_true_train_accuracy_and_tests_the_ema_weights(script, synthetic_root, synthetic_cache,
                                                                   tmp_path):
    run_main(script, {**tiny_overrides(synthetic_root, synthetic_cache, tmp_path), "EPOCHS": 3,
                      "SELECT_CHECKPOINT": "ema", "EMA_DECAY": 0.9, "RUN_NAME": "ema"})
    fold = tmp_path / "train_simple_working" / "ema" / "fold0"
    log = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines()]
    assert any(r["train_accuracy"] > 0 for r in log) and all(0 <= r["train_accuracy"] <= 1 for r in log)
    last, best = (torch.load(fold / name, weights_only=True) for name in ("ckpt_last.pt", "ckpt_best.pt"))
    averaged = {k[len("module."):]: v for k, v in last["ema"].items() if k.startswith("module.")}
    for key, value in best["model"].items():  # ckpt_best.pt holds the EMA weights, not the last ones
        assert torch.equal(value, averaged[key]), key
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in best["model"] if "weight" in k)
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["selection"] == "ema"
    assert set(metrics["alternatives"]) == {"last", "last_shifts2", "ema", "ema_shifts2"}
    assert metrics["alternatives"]["ema"] == metrics["accuracy"]


@pytest.mark.parametrize("script", ["train_simple_working"], indirect=True)
def test_no_validation_actors_trains_a_fixed_budget(script, synthetic_root, synthetic_cache, tmp_path, capsys):
    run_main(script, {**tiny_overrides(synthetic_root, synthetic_cache, tmp_path), "EPOCHS": 3, "N_VAL_ACTORS": 0,
                      "PATIENCE": 1, "RUN_NAME": "noval"})
    assert "no validation actors: a fixed budget of 3 epochs" in capsys.readouterr().out
    fold = tmp_path / "train_simple_working" / "noval" / "fold0"
    log = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and "val_accuracy" not in log[0]  # no early stop, no fake validation figure
    assert json.loads((fold / "metrics.json").read_text())["best_epoch"] == 3


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_best_val_without_validation_actors_is_refused(synthetic_root, synthetic_cache, tmp_path):
    args = [f"--{k.lower()}={v}" for k, v in tiny_overrides(synthetic_root, synthetic_cache, tmp_path).items()]
    done = run_cli(["train_simple_working.py", *args, "--n_val_actors=0", "--select_checkpoint=best_val"])
    assert done.returncode == 2 and done.stderr.startswith("error: SELECT_CHECKPOINT='best_val' needs validation")


def test_finished_run_reports_itself_and_refuses_other_constants(synthetic_root, synthetic_cache, tmp_path):
    args = ["train_simple_working.py", *[f"--{k.lower()}={v}" for k, v in
                                         tiny_overrides(synthetic_root, synthetic_cache, tmp_path).items()],
            "--epochs=1", "--modalities=audio"]
    assert run_cli(args).returncode == 0
    again = run_cli(args)
    assert again.returncode == 0 and "fold 0 finished earlier: test accuracy" in again.stdout
    changed = run_cli(args + ["--lr=0.01"])
    assert changed.returncode == 2 and "was made with other constants (LR 0.002 -> 0.01)" in changed.stderr
    restarted = run_cli(args + ["--lr=0.01", "--restart=True"])
    assert restarted.returncode == 0 and "finished earlier" not in restarted.stdout


@pytest.mark.parametrize("script", ["train_simple_working"], indirect=True)
def test_a_finished_run_is_tested_again_under_another_selection(script, synthetic_root, synthetic_cache, tmp_path,
                                                                 capsys):
    base = {**tiny_overrides(synthetic_root, synthetic_cache, tmp_path), "EPOCHS": 2, "N_VAL_ACTORS": 0,
            "EMA_DECAY": 0.9, "RUN_NAME": "retest"}
    run_main(script, {**base, "SELECT_CHECKPOINT": "last", "TEST_TIME_SHIFTS": 0})
    fold = tmp_path / "train_simple_working" / "retest" / "fold0"
    first = json.loads((fold / "metrics.json").read_text())
    capsys.readouterr()
    run_main(script, {**base, "SELECT_CHECKPOINT": "ema", "TEST_TIME_SHIFTS": 0})
    out = capsys.readouterr().out
    assert "fold 0 finished earlier, tested with selection 'last', test_time_shifts 0: testing its saved weights " \
           "with selection 'ema', test_time_shifts 0" in out
    assert "epoch 1" not in out and len((fold / "log.jsonl").read_text().splitlines()) == 2  # no training
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["selection"] == "ema" and metrics["accuracy"] == first["alternatives"]["ema"]
    last, best = (torch.load(fold / name, weights_only=True) for name in ("ckpt_last.pt", "ckpt_best.pt"))
    assert best["selection"] == "ema" and best["run_config"]["SELECT_CHECKPOINT"] == "ema"
    averaged = {k[len("module."):]: v for k, v in last["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(value, averaged[key]) for key, value in best["model"].items())
    run_main(script, {**base, "SELECT_CHECKPOINT": "last", "TEST_TIME_SHIFTS": 1})
    metrics = json.loads((fold / "metrics.json").read_text())
    assert (metrics["selection"], metrics["test_time_shifts"]) == ("last", 1)
    assert all(torch.equal(v, last["model"][k]) for k, v in
               torch.load(fold / "ckpt_best.pt", weights_only=True)["model"].items())
    with pytest.raises(ConfigError, match="SELECT_CHECKPOINT 'last' -> 'best_val'"):  # best_val changes training
        run_main(script, {**base, "SELECT_CHECKPOINT": "best_val", "N_VAL_ACTORS": 1})


def test_preset_first_then_explicit_constants():
    done = run_cli(["-c", "import sys, train_lite_model as s; from common.config import apply_overrides; "
                          "apply_overrides(vars(s), sys.argv[1:]); "
                          "print(s.WIDTH, s.DROPOUT, s.FUSION_LAYERS, s.STAGE1_EPOCHS, s.SELECT_CHECKPOINT)",
                    "--preset=cpu", "--dropout=0.4"])
    assert done.stdout.split() == ["128", "0.4", "1", "40", "ema"], done.stderr


def test_early_stop_is_announced(capsys):
    from training.progress import Progress, next_stage

    progress = Progress(epoch=7, best_epoch=4, epochs_since_best=3)
    next_stage(progress, patience=3, stage_name="fold 0 train")
    assert "fold 0 train: stopped early after 7 epochs, no validation improvement in the last 3 (best epoch 4)" \
        in capsys.readouterr().out
    assert (progress.stage, progress.epoch, progress.epochs_since_best) == (1, 0, 0)
    next_stage(Progress(epoch=20), patience=3, stage_name="fold 0 train")
    assert "stopped early" not in capsys.readouterr().out


def test_mixup_blends_inputs_with_one_weight_and_keeps_labels():
    from training.step import mixup

    batch = {"audio": torch.randn(6, 1, 4, 10), "features": torch.randn(6, 5), "label": torch.arange(6),
             "has_audio": torch.tensor([True] * 5 + [False]), "has_visual": torch.ones(6, dtype=torch.bool),
             "clip_id": [f"c{i}" for i in range(6)]}
    torch.manual_seed(3)
    mixed, partners, weight = mixup(batch, alpha=0.4)
    partner = partners["label"]  # labels are 0..5, so the partner labels are the partner indices
    assert 0.0 <= weight <= 1.0 and sorted(partner.tolist()) == list(range(6))
    for key in ("audio", "features"):
        assert torch.allclose(mixed[key], weight * batch[key] + (1 - weight) * batch[key][partner])
    assert torch.equal(mixed["label"], batch["label"]) and mixed["clip_id"] == batch["clip_id"]
    assert torch.equal(mixed["has_audio"], batch["has_audio"] & batch["has_audio"][partner])
    assert not mixed["has_audio"][5]  # a sample without audio stays without audio, whatever its partner


def test_train_step_with_mixup_weights_both_labels_losses():
    from tests.test_training_plumbing import TinyModel, tiny_batch
    from training.stages import make_optimizer
    from training.step import cross_entropy, mixup, train_step

    runtime = setup_runtime("cpu", "float32", seed=0)
    model, batch = TinyModel(width=16), tiny_batch()
    optimizer = make_optimizer(model, 0.05, 0.0)
    for _ in range(100):  # fit the batch first, so that its own labels' loss differs from the mixed loss
        train_step(model, batch, optimizer, runtime.make_scaler(), runtime)
    model.eval()  # BatchNorm's statistics do not move in the check below
    torch.manual_seed(7)
    mixed, partners, weight = mixup(batch, alpha=0.4)
    with torch.no_grad():
        logits = model(mixed)
        expected = weight * cross_entropy(logits, batch) + (1 - weight) * cross_entropy(logits, partners)
        plain = cross_entropy(model(batch), batch)
    torch.manual_seed(7)
    result = train_step(model, batch, make_optimizer(model, 0.0, 0.0), runtime.make_scaler(), runtime,
                        mixup_alpha=0.4)
    assert result.loss == pytest.approx(float(expected), rel=1e-5)
    assert abs(result.loss - float(plain)) > 1e-3  # the step did not train on the unmixed batch
    assert result.count == len(batch["label"])


def test_a_run_made_before_a_constant_existed_continues_with_its_old_value(tmp_path):
    from training.runs import open_run

    made = open_run("script", "old", str(tmp_path), {"LR": 0.002}, "cpu")
    (made.dir / "log.jsonl").write_text("{}\n")  # it trained (a run that never trained blocks nothing)
    assert open_run("script", "old", str(tmp_path), {"LR": 0.002, "MIXUP_ALPHA": 0.0}, "cpu",
                    added_constants={"MIXUP_ALPHA": 0.0}).dir.exists()
    with pytest.raises(ConfigError, match="MIXUP_ALPHA 0.0 -> 0.4"):
        open_run("script", "old", str(tmp_path), {"LR": 0.002, "MIXUP_ALPHA": 0.4}, "cpu",
                 added_constants={"MIXUP_ALPHA": 0.0})


@pytest.mark.parametrize("script", ["train_lite_model"], indirect=True)
def test_lite_trains_with_one_audio_token_and_mixup(script, synthetic_root, synthetic_cache, tmp_path):
    run_main(script, {**tiny_overrides(synthetic_root, synthetic_cache, tmp_path),
                      "MODALITIES": ("audio",), "WIDTH": 32, "FUSION": "concat", "AUDIO_TOKENS": 1,
                      "MIXUP_ALPHA": 0.4, "STAGE1_EPOCHS": 2, "RUN_NAME": "mix"})
    fold = tmp_path / "train_lite_model" / "mix" / "fold0"
    checkpoint = torch.load(fold / "ckpt_last.pt", weights_only=True)
    assert checkpoint["model"]["audio_missing"].shape == (1, 32)  # one audio token, rebuilt from the config
    log = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(0.0 <= r["train_accuracy"] <= 1.0 for r in log)
