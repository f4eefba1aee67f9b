"""Tests of the training plumbing: overrides, precision choice, the train step, metrics, checkpoints, stages."""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common import config as cfg
from training.checkpoint import load_checkpoint, load_model_weights, make_state, save_checkpoint
from common.config import ConfigError, apply_overrides
from training.metrics import classification_metrics, summarize_folds
from training.runtime import Runtime, resolve_amp_dtype, setup_runtime
from training.stages import make_optimizer, set_trainable, train_mode
from training.step import NonFiniteLossError, cosine_lr, train_step
from tests.shared_paths import REPO


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
    resolved = apply_overrides(ns, ["--batch-size=32", "--lr=1", "--modalities=['audio']",
                                    "--data_root=/content/drive/RAVDESS", "--amp=False"])
    assert ns["BATCH_SIZE"] == 32 and ns["LR"] == 1.0 and isinstance(ns["LR"], float)
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


def test_parallel_folds_writing_the_run_config_do_not_collide(tmp_path, monkeypatch):
    """Two fold processes start one cross-validation run at once, both writing its config.json: process B writes
    and renames while A sits between its write and its rename. A's rename must still find its own file."""
    from common import files

    path = tmp_path / "config.json"
    real_replace, real_getpid = files.os.replace, files.os.getpid
    interleaved = []

    def replace_after_another_writer(src, dst):
        if not interleaved:
            interleaved.append(True)
            monkeypatch.setattr(files.os, "getpid", lambda: real_getpid() + 1)  # process B
            files.atomic_write_text(path, "from B")
            monkeypatch.setattr(files.os, "getpid", real_getpid)
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace_after_another_writer)
    files.atomic_write_text(path, "from A")
    assert path.read_text() == "from A" and not list(tmp_path.glob("*.tmp"))


def test_a_run_folder_removes_the_checkpoint_a_killed_run_was_writing(tmp_path):
    """kill -9 during a checkpoint write leaves `ckpt_best.pt.<host>.<pid>.tmp`; opening the run folder again (the
    resume) removes it, and keeps the temp file of a writer that is still alive."""
    from common import files
    from training.runs import RunFolder

    fold = tmp_path / "train_x" / "run" / "fold0"
    fold.mkdir(parents=True)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    killed, live = fold / f"ckpt_best.pt.{files.HOST}.{dead}.tmp", fold / f"ckpt_last.pt.{files.HOST}.{os.getpid()}.tmp"
    for tmp in (killed, live):
        tmp.write_bytes(b"half")
    RunFolder("train_x", "run", tmp_path).sub("fold0")
    assert not killed.exists() and live.exists()


def test_a_run_lists_every_machine_it_trained_on(tmp_path, monkeypatch):
    """A run resumed on another CPU keeps the first machine in config.json and adds the second; reopening on the
    same machine adds nothing (also when a script writes its config without open_run), and a restart forgets the
    deleted run's machines."""
    import json

    from training import runs

    def config_machines() -> list:
        return json.loads((tmp_path / "train_x" / "run" / "config.json").read_text())["machines"]

    first = runs.this_machine()
    assert first["cpu"] and first["torch_threads"] == torch.get_num_threads()
    assert first["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    runs.open_run("train_x", "run", str(tmp_path), {"LR": 1.0}, "cpu").log({"epoch": 1})
    runs.open_run("train_x", "run", str(tmp_path), {"LR": 1.0}, "cpu")
    assert config_machines() == [first]
    other = {"cpu": "Another CPU", "torch_threads": 64}
    monkeypatch.setattr(runs, "this_machine", lambda: other)
    runs.open_run("train_x", "run", str(tmp_path), {"LR": 1.0}, "cpu")
    assert config_machines() == [first, other]
    runs.RunFolder("train_x", "run", tmp_path).write_config({"LR": 1.0})  # pretrain_visual.py's resume
    assert config_machines() == [first, other]
    runs.open_run("train_x", "run", str(tmp_path), {"LR": 1.0}, "cpu", restart=True)
    assert config_machines() == [other]


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
    with pytest.raises(ConfigError, match=r"junk.pt is not a readable checkpoint \(not a file written by torch"):
        load_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match="cut.pt is not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"model_name": "tiny", "model": TinyModel()}, tmp_path / "pickled.pt")  # a whole module: code
    with pytest.raises(ConfigError, match="holds Python objects besides tensors") as refused:
        load_checkpoint(tmp_path / "pickled.pt")
    assert "weights_only" not in str(refused.value)
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


# ------------------------------------------------------------------------- choice constants and --help
SCRIPTS = ["train_simple_working.py", "train_lite_model.py", "train_full_model.py", "pretrain_visual.py",
           "predict.py", "debug_gradients.py", "visualize_attention.py", "ablate.py", "test_components.py",
           "benchmarks/bench_predict.py", "benchmarks/bench_prepare.py", "benchmarks/legacy_instability.py",
           "benchmarks/memory_estimate.py", "benchmarks/results_table.py", "data/prepare_ravdess.py",
           "data/download.py"]

EXAMPLE_SCRIPT = '''"""An example script."""
# ---- model
FUSION = "gated"  # concat | product | gated | cross_attention | transformer
_FUSION_CHOICES = ("concat", "product", "gated", "cross_attention", "transformer")
AMP_DTYPE = "auto"  # auto (fp16 on a T4, bf16 on an A100) | float32 | float16 | bfloat16 (slow on a CPU)
_AMP_DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
SIZE = "small"  # small: CPU-sized widths | real: the constructors' defaults
_SIZE_CHOICES = ("small", "real")
INIT = None  # None: the recipe's; else default | xavier | kaiming
_INIT_CHOICES = (None, "default", "xavier", "kaiming")
MODELS = ("lite", "full")  # lite | full
_MODELS_CHOICES = ("lite", "full")
# ---- optimisation
# Counts are whole numbers.
EPOCHS = 3  # passes over the training set
METRIC = "accuracy"  # validation metric that picks the best checkpoint: accuracy | uar | macro_f1
_METRIC_CHOICES = ("accuracy", "uar", "macro_f1")
DEVICE = "auto"  # "auto", "cpu", "cuda" or "cuda:1"
WEBCAM = False  # True: use the camera
'''


def example_namespace(tmp_path) -> dict:
    path = tmp_path / "example.py"
    path.write_text(EXAMPLE_SCRIPT)
    namespace = {"__file__": str(path), "__doc__": "An example script."}
    exec(compile(EXAMPLE_SCRIPT, str(path), "exec"), namespace)
    return namespace


def test_choices_are_declared_beside_their_constants(tmp_path):
    choices = cfg.declared_choices(example_namespace(tmp_path))
    assert choices["FUSION"] == ("concat", "product", "gated", "cross_attention", "transformer")
    assert choices["AMP_DTYPE"] == ("auto", "float32", "float16", "bfloat16")
    assert choices["INIT"] == (None, "default", "xavier", "kaiming")
    assert "DEVICE" not in choices and "EPOCHS" not in choices  # free values
    assert cfg.source_choices(EXAMPLE_SCRIPT, "METRIC") == ("accuracy", "uar", "macro_f1")
    docs = cfg.constant_docs(EXAMPLE_SCRIPT)
    assert "_FUSION_CHOICES" not in cfg.config_keys(example_namespace(tmp_path))  # not an option of its own
    assert docs["EPOCHS"].heading == "optimisation" and docs["EPOCHS"].notes == ["Counts are whole numbers."]


@pytest.mark.parametrize("arg, message", [
    ("--fusion=crossattention", r"--fusion=crossattention is not one of concat \| product \| gated \| "
                                r"cross_attention \| transformer \(did you mean cross_attention\?\)"),
    ("--init=he", r"--init=he is not one of None \| default \| xavier \| kaiming$"),
    ("--metric=f1", r"not one of accuracy \| uar \| macro_f1"),
    ("--models=lite,fulll", r"--models=fulll is not one of lite \| full \(did you mean full\?\)"),
    ("--epochs=2.5", r"--epochs expects a whole number, got 2.5"),
])
def test_bad_choices_and_fractional_counts_are_one_line_errors(tmp_path, arg, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(example_namespace(tmp_path), [arg])


def test_good_choices_counts_and_bare_flags_are_accepted(tmp_path):
    ns = example_namespace(tmp_path)
    apply_overrides(ns, ["--fusion=transformer", "--init=xavier", "--epochs=4.0", "--device=cuda:1", "--webcam",
                         "--amp_dtype=bfloat16", "--size=real"])
    assert (ns["FUSION"], ns["INIT"], ns["EPOCHS"], ns["DEVICE"], ns["WEBCAM"]) == (
        "transformer", "xavier", 4, "cuda:1", True)
    assert isinstance(ns["EPOCHS"], int)


def test_help_lists_docstring_headings_constants_comments_and_values(tmp_path):
    ns = example_namespace(tmp_path)
    apply_overrides(ns, ["--epochs=7"])
    text = cfg.help_text(ns)
    assert text.startswith("An example script.")
    assert "  optimisation\n    # Counts are whole numbers.\n    --epochs=7" in text
    assert "passes over the training set" in text
    assert "--fusion='gated'" in text and "concat | product | gated" in text


def load_script(relative: str):
    spec = importlib.util.spec_from_file_location(f"script_{Path(relative).stem}", REPO / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # importing a script does nothing but define it
    return module


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help_and_consistent_choice_comments(script):
    namespace = vars(load_script(script))
    docs = cfg.script_docs(namespace)
    text = cfg.help_text(namespace)
    for key in cfg.config_keys(namespace):
        assert f"--{key.lower()}=" in text
    for key, choices in cfg.declared_choices(namespace).items():
        # --help shows the comment: it names every allowed value, and the default is one of them
        assert all(str(value) in docs[key].comment for value in choices), (key, choices, docs[key].comment)
        default = namespace[key]
        assert all(v in choices for v in (default if isinstance(default, (list, tuple)) else [default])), key
    cfg.check_choices(namespace)


def test_command_line_help_and_choice_error_come_before_any_work(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "train_simple_working.py", *args, f"--output_dir={tmp_path}"],
                              cwd=REPO, capture_output=True, text=True, timeout=120)

    shown = run("--help")
    assert shown.returncode == 0 and "Train SimpleCNN" in shown.stdout
    assert "--select_metric='accuracy'" in shown.stdout and "accuracy | uar | macro_f1" in shown.stdout
    wrong = run("--select_metric=f1")
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == "error: --select_metric=f1 is not one of accuracy | uar | macro_f1"
    assert not any(tmp_path.iterdir())  # refused before any data work


def test_help_piped_into_a_reader_that_stops_early_ends_quietly():
    # `python train_lite_model.py --help | head -3`: the reader is gone before the help text is written.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        shown = subprocess.run([sys.executable, "train_lite_model.py", "--help"], cwd=REPO, stdout=write_end,
                               stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert shown.returncode == 0 and shown.stderr == ""


def test_tests_and_the_scripts_they_start_use_one_passive_thread():
    # tests/conftest.py: spinning OpenMP threads made the suite 10x slower on a busy machine.
    assert torch.get_num_threads() == 1
    child = subprocess.run([sys.executable, "-c", "import os, torch; print(os.environ.get('OMP_WAIT_POLICY'), "
                            "torch.get_num_threads())"], capture_output=True, text=True, timeout=60)
    assert child.stdout.split() == ["PASSIVE", "1"]
