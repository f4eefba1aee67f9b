"""What a new user hit (issue 26): bad values are one-line errors before any work, a run that failed before training
leaves nothing and blocks nothing, ablate.py checks every row first, and resume is exact with data-loader workers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.ravdess import DataError
from data.setup import make_split
from models import ModelConfigError, build_model
from tests.conftest import imported_script
from tests.shared_paths import REPO
from tests.test_train_scripts import die_after_first_epoch, run_main, tiny_overrides
from training.checkpoint import make_state, save_checkpoint
from common.config import ConfigError, run_script
from training.runs import open_run


@pytest.fixture
def script(request):
    """A script imported as a module; its constants are restored afterwards."""
    yield from imported_script(request.param)


def never_runs() -> None:
    raise AssertionError("the work started: the value was not checked before it")


def user_error(capsys, module, argv: list[str], main=never_runs) -> str:
    """The one line `run_script` prints for `argv`, checking exit status 2 (by default, that `main` never ran)."""
    saved = {k: v for k, v in vars(module).items() if k.isupper()}
    with pytest.raises(SystemExit) as exit_info:
        run_script(main, vars(module), argv)
    vars(module).update(saved)  # as a new process would start: the next call sees the defaults
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------- items 1 and 2: ranges
@pytest.mark.parametrize("script", ["train_simple_working"], indirect=True)
@pytest.mark.parametrize("argv, message", [
    (["--lr=-1"], "error: --lr=-1 is out of range: it must be > 0"),
    (["--lr=0"], "error: --lr=0 is out of range: it must be > 0"),
    (["--batch_size=0"], "error: --batch_size=0 is out of range: it must be >= 1"),
    (["--num_workers=-1"], "error: --num_workers=-1 is out of range: it must be >= 0"),
    (["--prepare_workers=-2"], "error: --prepare_workers=-2 is out of range: it must be >= 0"),
    (["--label_smoothing=2"], "error: --label_smoothing=2 is out of range: it must be in [0, 1)"),
    (["--epochs=-3"], "error: --epochs=-3 is out of range: it must be >= 1"),
    (["--warmup_fraction=1.5"], "error: --warmup_fraction=1.5 is out of range: it must be in [0, 1]"),
    (["--dropout=1"], "error: --dropout=1 is out of range: it must be in [0, 1)"),
])
def test_out_of_range_values_are_one_line_errors_before_any_work(script, argv, message, capsys):
    assert user_error(capsys, script, argv) == message


@pytest.mark.parametrize("script", ["train_lite_model"], indirect=True)
def test_stage_learning_rates_and_preset_values_are_checked(script, capsys):
    assert user_error(capsys, script, ["--stage1_lr=-1"]).startswith("error: --stage1_lr=-1 is out of range")
    assert user_error(capsys, script, ["--stage2_epochs=-1"]).startswith("error: --stage2_epochs=-1 is out of range")
    assert user_error(capsys, script, ["--stage1_epochs=0", "--stage2_epochs=0"]) == (
        "error: --stage1_epochs=0 and --stage2_epochs=0: no stage would train")
    # The cpu preset's own values are in range, and a valid command still reaches main.
    vars(script).update(PRESET="default")
    ran = []
    run_script(lambda: ran.append(True), vars(script), ["--preset=cpu", "--stage2_epochs=0"])
    assert ran == [True]


@pytest.mark.parametrize("script", ["train_simple_working"], indirect=True)
def test_output_dir_that_cannot_be_written_is_one_line(script, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = user_error(capsys, script, [f"--output_dir={blocker / 'runs'}"])
    assert err == f"error: --output_dir={blocker / 'runs'} cannot be made: {blocker} is a file"
    assert not (blocker.parent / "runs").exists()


def test_unwritable_output_dir_from_the_command_line_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, "train_simple_working.py", f"--output_dir={blocker}/x", "--lr=1e-3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert "is a file" in done.stderr


def test_actors_the_data_lacks_are_refused_where_the_split_is_made(synthetic_cache):
    with pytest.raises(DataError, match=r"ACTORS names actors the data does not have \(5-30\); "
                                        r"the data has actors 1-4"):
        make_split(synthetic_cache, "1-30", 2, 0, 0)
    assert make_split(synthetic_cache, "1-4", 2, 0, 0).test == (1, 2)  # a subset is fine


# ----------------------------------------------------------- items 1 and 3: failures after the run folder is made
def simple_checkpoint(path: Path) -> Path:
    model = build_model("simple", {"channels": [4, 8, 8]})
    save_checkpoint(path, make_state(model, "simple"))
    return path


@pytest.mark.parametrize("script", ["train_lite_model"], indirect=True)
def test_visual_checkpoint_of_another_model_is_a_one_line_error_and_leaves_no_run(
        script, synthetic_root, synthetic_cache, tmp_path, capsys):
    checkpoint = simple_checkpoint(tmp_path / "simple.pt")
    vars(script).update({**tiny_overrides(synthetic_root, synthetic_cache, tmp_path), "WIDTH": 16,
                         "FRAME_BACKBONE": "small", "AUDIO_CHANNELS": (4, 8, 8, 16), "FUSION": "concat"})
    with pytest.raises(SystemExit) as exit_info:
        run_script(script.main, vars(script), [f"--visual_checkpoint={checkpoint}"],
                   user_errors=(DataError, ModelConfigError))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {checkpoint} is not a face-encoder checkpoint of pretrain_visual.py"
    assert not (tmp_path / "train_lite_model").exists()  # the attempt left no run folder


@pytest.mark.parametrize("script", ["train_simple_working"], indirect=True)
def test_run_that_failed_before_training_leaves_nothing(script, synthetic_root, synthetic_cache, tmp_path):
    with pytest.raises(DataError, match="ACTORS names actors the data does not have"):
        run_main(script, {**tiny_overrides(synthetic_root, synthetic_cache, tmp_path), "ACTORS": "1-30"})
    assert not (tmp_path / "train_simple_working").exists()


def test_config_of_a_run_that_never_trained_blocks_nothing(tmp_path):
    # What an earlier version left after `--lr=-1` failed at the optimizer: config.json and nothing else.
    open_run("train_simple_working", "simple", str(tmp_path), {"LR": -1.0}, "cpu")
    run = open_run("train_simple_working", "simple", str(tmp_path), {"LR": 0.002}, "cpu")
    assert json.loads((run.dir / "config.json").read_text())["config"] == {"LR": 0.002}
    # Once it trained, another value is refused as before (two recipes would be mixed in one result).
    (run.dir / "fold0").mkdir()
    (run.dir / "fold0" / "log.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"made with other constants \(LR 0.002 -> 0.001\)"):
        open_run("train_simple_working", "simple", str(tmp_path), {"LR": 0.001}, "cpu")


def test_failed_fold_keeps_a_run_folder_another_process_is_starting(tmp_path):
    run = open_run("train_simple_working", "simple", str(tmp_path), {"LR": 0.002}, "cpu")
    other = run.sub("fold1")  # --fold=1 in another process, before its first epoch
    assert not run.discard_untrained(run.sub("fold0")) and other.dir.is_dir()
    other.dir.rmdir()
    assert run.discard_untrained(run.sub("fold0")) and not (tmp_path / "train_simple_working").exists()
    assert tmp_path.is_dir()  # OUTPUT_DIR itself (it may hold the cache) stays


def test_prepare_workers_may_differ_between_invocations_of_a_run(tmp_path):
    run = open_run("train_simple_working", "simple", str(tmp_path), {"LR": 0.002, "PREPARE_WORKERS": 0}, "cpu")
    (run.dir / "log.jsonl").write_text("{}\n")  # it trained
    open_run("train_simple_working", "simple", str(tmp_path), {"LR": 0.002, "PREPARE_WORKERS": 4}, "cpu")


def test_save_checkpoint_refuses_what_load_checkpoint_would_refuse(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint state"):
        save_checkpoint(tmp_path / "x.pt", {"weights": torch.zeros(1)})
    assert not (tmp_path / "x.pt").exists()


# ------------------------------------------------------------------------------------------ item 4: ablate.py
@pytest.mark.parametrize("script", ["ablate"], indirect=True)
def test_ablate_checks_every_row_before_training_any(script, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(script, "run_row", lambda row: never_runs())
    err = user_error(capsys, script, ["--fusions=('concat','gatd')", f"--output_dir={tmp_path}"], script.main)
    assert err == ("error: row 'audio+visual, gatd': fusion 'gatd' is not one of concat | product | gated | "
                   "cross_attention | transformer (did you mean gated?); no row was trained")
    assert not list(tmp_path.iterdir())
    err = user_error(capsys, script, ["--single_modality_fusion=bogus", f"--output_dir={tmp_path}"], script.main)
    assert "row 'audio only': fusion 'bogus' is not one of" in err


@pytest.mark.parametrize("script", ["ablate"], indirect=True)
def test_ablate_help_commands_paste_into_bash(script, capsys):
    with pytest.raises(SystemExit):
        run_script(script.main, vars(script), ["--help"])
    text = capsys.readouterr().out
    command = [line for line in text.splitlines() if line.strip().startswith("python ablate.py --dataset=ravdess")]
    lines = text.splitlines()
    start = lines.index(command[0])
    pasted = "\n".join(lines[start:start + 3]).replace("python ablate.py", "true")
    assert "\\\\" not in text
    done = subprocess.run(["bash", "-c", pasted + "\necho $?"], capture_output=True, text=True)
    assert done.stderr == "" and done.stdout.strip() == "0"


# -------------------------------------------------------------------------------- item 6: exact resume, workers
@pytest.mark.parametrize("script", ["train_simple_working"], indirect=True)
def test_resume_with_data_loader_workers_is_exact(script, synthetic_root, synthetic_cache, tmp_path, monkeypatch):
    base = {**tiny_overrides(synthetic_root, synthetic_cache, tmp_path), "EPOCHS": 2, "PATIENCE": 99,
            "MODALITIES": ("audio",), "NUM_WORKERS": 2}
    run_main(script, {**base, "RUN_NAME": "straight"})

    die_after_first_epoch(script, {**base, "RUN_NAME": "interrupted"}, monkeypatch)
    torch.manual_seed(123)  # another global state now: resume must restore the saved one
    vars(script).update({**base, "RUN_NAME": "interrupted"})
    script.main()

    folder = tmp_path / "train_simple_working"
    logs = {name: [json.loads(line) for line in (folder / name / "fold0" / "log.jsonl").read_text().splitlines()]
            for name in ("straight", "interrupted")}
    assert [r["epoch"] for r in logs["interrupted"]] == [1, 2]
    for key in ("train_loss", "train_accuracy", "val_loss", "grad_norm"):
        assert [r[key] for r in logs["interrupted"]] == [r[key] for r in logs["straight"]], key
    straight, resumed = (torch.load(folder / name / "fold0" / "ckpt_last.pt", weights_only=True)["model"]
                         for name in ("straight", "interrupted"))
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_a_bad_flag_under_torchrun_is_said_once():
    """Every process of a torchrun job gets the same bad flag; one of them (rank 0) says it."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                           "train_simple_working.py", "--batchsize=3"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: unknown option --batchsize")]
    assert len(errors) == 1, done.stderr


def test_a_mistake_only_another_rank_met_is_said_after_rank_0_had_its_turn(monkeypatch, capsys):
    """A rank other than 0 waits before it speaks, so that it cannot end the job before rank 0 says the mistake."""
    import common.config as config
    waits = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(config.time, "sleep", waits.append)

    def fails() -> None:
        raise ConfigError("this rank's own mistake")
    with pytest.raises(SystemExit) as ended:
        run_script(fails, {}, [])
    assert ended.value.code == 2
    assert waits == [config.RANK_0_REPORT_SECONDS]
    assert capsys.readouterr().err == "error: this rank's own mistake\n"
