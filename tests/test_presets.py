"""train_full_model.py's legacy recipe as a preset, and the run-compatibility bookkeeping of training/runs.py."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from common.config import apply_overrides
from tests.conftest import imported_script
from tests.shared_paths import REPO
from tests.test_train_scripts import run_main, tiny_overrides
from training.runs import ADDED_CONSTANTS, open_run


@pytest.fixture
def script(request):
    yield from imported_script(request.param)


def fresh_full_script():
    spec = importlib.util.spec_from_file_location("full_for_presets", REPO / "train_full_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_legacy_preset_sets_the_original_recipe_and_architecture():
    module = fresh_full_script()
    assert not module.LEGACY and module.recipe()["lr"] is None
    apply_overrides(vars(module), ["--preset=legacy", "--stage1_epochs=3"])  # an explicit constant still applies
    assert module.LEGACY and module.STAGE1_EPOCHS == 3
    assert module.recipe() == {"init": "default", "encoder_init": "default", "qk_norm": False, "lr": 1e-4,
                               "warmup_fraction": 0, "clip_norm": None, "amp_dtype": "float16"}
    config = module.model_config(35)
    assert config["causal_attention"] and config["attention_mask_fill"] == -1e9 and not config["qk_norm"]
    # The legacy tables are not constants a user edits or overrides
    assert "LEGACY_MODEL" not in module.config_keys(vars(module))
    assert "LEGACY_RECIPE" not in module.config_keys(vars(module))


def test_a_full_model_run_made_when_the_legacy_tables_were_constants_resumes(tmp_path):
    old_config = {"LR": 1e-3, "LEGACY": False, "LEGACY_MODEL": {"causal_attention": True},
                  "LEGACY_RECIPE": {"lr": 1e-4}, **ADDED_CONSTANTS["train_full_model"]}
    made = open_run("train_full_model", "old", str(tmp_path), old_config, "cpu")
    (made.dir / "log.jsonl").write_text("{}\n")  # it trained
    now = {k: v for k, v in old_config.items() if not k.startswith("LEGACY_")}
    assert open_run("train_full_model", "old", str(tmp_path), now, "cpu").dir.exists()
    assert json.loads((made.dir / "config.json").read_text())["config"] == now
    with pytest.raises(Exception, match=r"LEGACY False -> True"):
        open_run("train_full_model", "old", str(tmp_path), {**now, "LEGACY": True}, "cpu")


def test_a_run_without_a_constant_its_script_gained_since_resumes_with_the_old_value(tmp_path):
    made = open_run("train_lite_model", "old", str(tmp_path), {"LR": 2e-3}, "cpu")
    (made.dir / "log.jsonl").write_text("{}\n")
    assert open_run("train_lite_model", "old", str(tmp_path), {"LR": 2e-3, "AUDIO_TOKENS": 8}, "cpu").dir.exists()
    with pytest.raises(Exception, match=r"AUDIO_TOKENS 8 -> 1"):
        open_run("train_lite_model", "old", str(tmp_path), {"LR": 2e-3, "AUDIO_TOKENS": 1}, "cpu")


@pytest.mark.parametrize("script", ["train_full_model"], indirect=True)
def test_full_model_reads_its_recipe_once_per_fold_not_per_batch(script, synthetic_root, synthetic_cache, tmp_path,
                                                                  monkeypatch):
    calls = []
    recipe = script.recipe
    monkeypatch.setattr(script, "recipe", lambda: calls.append(1) or recipe())
    run_main(script, {**tiny_overrides(synthetic_root, synthetic_cache, tmp_path), "WIDTH": 32, "MLP_HIDDEN": 64,
                      "N_HEADS": 2, "N_KV_HEADS": 1, "LAYOUT": "conv,attn", "MODALITIES": ("audio",),
                      "AUDIO_CHANNELS": (4, 8, 8, 8), "BATCH_SIZE": 4, "STAGE1_EPOCHS": 1, "RUN_NAME": "once"})
    log = (tmp_path / "train_full_model" / "once" / "fold0" / "log.jsonl").read_text().splitlines()
    steps = json.loads(log[-1])["step"]
    assert steps == 8 and len(calls) < steps  # 32 training clips in batches of 4
