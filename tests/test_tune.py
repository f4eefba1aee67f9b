"""tune.py on the synthetic RAVDESS fixture: two processes share one journal study, pruning stops a run, and no run
of the search loads a clip of its fold's test actors (recorded inside the training processes)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import imported_script
from tests.shared_paths import REPO


# The recording copy of train_simple_working.py: every clip a DataLoader reads is written down with the run's name.
RECORDER = '''
import sys as _sys
_sys.path.insert(0, {repo!r})
from data import dataset as _dataset
_RUN = next((a.split("=", 1)[1] for a in _sys.argv if a.startswith("--run_name=")), "?")
_original_getitem = _dataset.RavdessDataset.__getitem__


def _recording_getitem(self, index):
    item = _original_getitem(self, index)
    with open({record!r}, "a") as f:
        f.write(f"{{_RUN}}\\t{{int(item['actor'])}}\\n")
    return item


_dataset.RavdessDataset.__getitem__ = _recording_getitem
'''


def recording_script(folder: Path, record: Path) -> Path:
    """train_simple_working.py with the recorder after its `from __future__` line (same constants, same folders)."""
    source = (REPO / "train_simple_working.py").read_text()
    future = "from __future__ import annotations\n"
    path = folder / "train_simple_working.py"
    path.write_text(source.replace(future, future + RECORDER.format(repo=str(REPO), record=str(record)), 1))
    return path


def train_args(root: Path, cache: Path, epochs: int) -> list[str]:
    return ["--dataset=ravdess", f"--data_root={root}", f"--cache_dir={cache}", "--modalities=audio",
            f"--epochs={epochs}", f"--patience={epochs}", "--batch_size=16", "--num_workers=0", "--device=cpu"]


def tune_args(script: Path, root: Path, cache: Path, out: Path, **extra) -> list[str]:
    """4 actors in 4 folds of one; the search uses fold 0: test actor 1 (left out), validation actor 2 (held out),
    the run's own validation actor 3, training actor 4."""
    settings = {"train_script": str(script), "train_args": repr(train_args(root, cache, 1)),
                "search_space": repr({"lr": ("log", 1e-3, 1e-2), "dropout": ("choice", (0.0, 0.3))}),
                "actors": "1-4", "n_folds": 4, "n_val_actors": 1, "search_folds": "(0,)", "n_trials": 3,
                "startup_trials": 2, "pruner": "none", "poll_seconds": 0.2, "output_dir": str(out),
                "study_name": "tiny", **extra}
    return [f"--{key}={value}" for key, value in settings.items()]


def test_two_processes_share_one_study_and_never_load_test_actors(synthetic_root, synthetic_cache, tmp_path):
    record = tmp_path / "loaded.tsv"
    script = recording_script(tmp_path, record)
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "tune.py"),
               *tune_args(script, synthetic_root, synthetic_cache, out, evaluate_processes=2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs

    study = out / "tune" / "tiny"
    rows = list(csv.DictReader(open(study / "trials.csv")))
    finished = [r for r in rows if r["state"] == "COMPLETE"]
    assert sorted(int(r["number"]) for r in finished) == [0, 1, 2], rows  # every trial once, none twice
    assert all(r["state"] == "COMPLETE" or r["note"].startswith("over budget") for r in rows)
    for row in finished:
        assert float(row["val_accuracy"]) == pytest.approx(float(row["fold_scores"]))
    runs = out / "train_simple_working" / "tune_tiny"
    names = sorted(p.name for p in runs.iterdir())
    assert [n for n in names if n.startswith("trial")] == ["trial0000", "trial0001", "trial0002"]
    assert len([n for n in names if n.startswith("best_trial")]) == 1  # evaluated by one process only

    best = (study / "best_args.txt").read_text().split()
    assert {a.split("=")[0] for a in best} == {"--lr", "--dropout"}
    assert (study / "optimization_history.png").stat().st_size > 0
    assert (study / "param_importances.png").stat().st_size > 0
    assert "test accuracy" in (study / "best_cv.txt").read_text()

    loaded: dict[str, set[int]] = {}
    for line in record.read_text().splitlines():
        run, actor = line.split("\t")
        loaded.setdefault(run, set()).add(int(actor))
    search = {run: actors for run, actors in loaded.items() if "/trial" in run}
    assert len(search) == 3
    for run, actors in search.items():  # actor 2, the fold's validation actor, is the run's held-out part
        assert actors == {2, 3, 4}, (run, actors)
    # The recorder does see test clips: the final evaluation over the 4 test folds loads every actor.
    (evaluation,) = [actors for run, actors in loaded.items() if "/best_trial" in run]
    assert evaluation == {1, 2, 3, 4}
    # Its folds ran as separate processes, with the benchmark rows' protocol: no validation actors.
    (best_run,) = [runs / n for n in names if n.startswith("best_trial")]
    cv = json.loads((best_run / "cv_metrics.json").read_text())
    assert len(cv["accuracy"]["per_fold"]) == 4
    assert json.loads((best_run / "config.json").read_text())["config"]["N_VAL_ACTORS"] == 0


@pytest.fixture
def tune_module():
    yield from imported_script("tune")


def prune_every_trial(tune_module, root: Path, cache: Path, out: Path, epochs: int, **settings) -> None:
    """In-process settings of a search on fold 0 of 4 actors whose threshold pruner stops any trial it may."""
    vars(tune_module).update({
        "TRAIN_SCRIPT": str(REPO / "train_simple_working.py"), "TRAIN_ARGS": train_args(root, cache, epochs),
        "SEARCH_SPACE": {"lr": ("log", 1e-3, 1e-2)}, "ACTORS": "1-4", "N_FOLDS": 4, "N_VAL_ACTORS": 1,
        "SEARCH_FOLDS": (0,), "PRUNER": "threshold", "PRUNE_BELOW": 1.01, "PRUNE_AFTER_EPOCHS": 1,
        "POLL_SECONDS": 0.1, "OUTPUT_DIR": str(out), "EVALUATE_BEST": False, **settings})


def test_pruning_stops_the_running_fold(tune_module, synthetic_root, synthetic_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    prune_every_trial(tune_module, synthetic_root, synthetic_cache, out, 200, N_TRIALS=1, STUDY_NAME="pruned")
    tune_module.main()
    rows = list(csv.DictReader(open(out / "tune" / "pruned" / "trials.csv")))
    assert [r["state"] for r in rows] == ["PRUNED"]
    run = out / "train_simple_working" / "tune_pruned" / "trial0000" / "fold0"
    epochs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert 1 <= len(epochs) < 200 and not (run / "metrics.json").exists()  # stopped long before its 200 epochs


def test_a_given_trial_is_never_pruned(tune_module, synthetic_root, synthetic_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    prune_every_trial(tune_module, synthetic_root, synthetic_cache, out, 3, N_TRIALS=2, STUDY_NAME="reference",
                      FIRST_TRIALS=({"lr": 2e-3},))
    tune_module.main()
    rows = list(csv.DictReader(open(out / "tune" / "reference" / "trials.csv")))
    assert [(r["state"], r["note"]) for r in rows] == [("COMPLETE", "given (FIRST_TRIALS)"), ("PRUNED", "")]


def test_the_objective_is_the_mean_over_the_folds(tune_module, monkeypatch):
    import optuna

    scores = {0: 0.5, 2: 0.25}
    monkeypatch.setattr(tune_module, "run_fold", lambda trial, position, fold, *rest: scores[fold])
    study = optuna.create_study(direction="maximize")
    splits = [(fold, None, None) for fold in scores]
    tune_module.run_trial(study, study.ask(), splits, Path("unused.py"))
    assert study.best_value == pytest.approx(0.375) and study.best_trial.user_attrs["fold_scores"] == [0.5, 0.25]


def test_search_settings_are_checked_before_any_run(tune_module, tmp_path):
    vars(tune_module).update({"TRAIN_SCRIPT": "train_lite_model.py", "OUTPUT_DIR": str(tmp_path)})
    vars(tune_module)["SEARCH_SPACE"] = {"stage1_lrr": ("log", 1e-4, 1e-2)}
    with pytest.raises(tune_module.ConfigError, match="did you mean 'stage1_lr'"):
        tune_module.main()
    vars(tune_module)["SEARCH_SPACE"] = {"actors": ("choice", ("1-8",))}
    with pytest.raises(tune_module.ConfigError, match="set by tune.py"):
        tune_module.main()
    vars(tune_module)["SEARCH_SPACE"] = {"fusion": ("categorical", ("concat",))}
    with pytest.raises(tune_module.ConfigError, match="first item must be one of"):
        tune_module.main()
    assert not (tmp_path / "tune").exists()


def test_a_trial_of_a_dead_process_is_queued_again_with_its_runs(tune_module, tmp_path):
    import optuna

    vars(tune_module).update({"OUTPUT_DIR": str(tmp_path), "STUDY_NAME": "resumed", "N_TRIALS": 2,
                              "SEARCH_SPACE": {"lr": ("log", 1e-3, 1e-2)}})
    study = optuna.create_study(study_name="resumed", storage=tune_module.make_storage(), direction="maximize")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = study.ask()
    lr = tune_module.suggest(orphan)["lr"]
    orphan.set_user_attr("host", tune_module.HOST)
    orphan.set_user_attr("pid", int(dead.stdout))  # that process has exited: the trial was interrupted

    tune_module.requeue_dead_trials(study)
    retry = tune_module.next_trial(study)
    assert retry.number == 1 and tune_module.suggest(retry) == {"lr": lr}
    assert retry.user_attrs["retry_of"] == 0  # its runs go to trial0000's folders and resume there
    assert [t.number for t in tune_module.counted_trials(study)] == [1]  # the interrupted one uses no budget
    study.tell(retry, 0.5)
    assert tune_module.next_trial(study).number == 2
    study.tell(2, 0.4)
    assert tune_module.next_trial(study) is None  # N_TRIALS=2 are done


def test_first_trials_run_before_any_sampled_one(tune_module, tmp_path, monkeypatch):
    hand_set = {"stage1_lr": 2e-3, "fusion": "concat"}
    space = {"stage1_lr": ("log", 1e-4, 1e-2), "fusion": ("choice", ("concat", "gated"))}
    vars(tune_module).update({"OUTPUT_DIR": str(tmp_path), "STUDY_NAME": "given", "N_TRIALS": 3, "SEARCH_SPACE": space,
                              "SEARCH_FOLDS": (0,), "FIRST_TRIALS": (hand_set,), "EVALUATE_BEST": False})
    monkeypatch.setattr(tune_module, "run_fold", lambda trial, *rest: trial.params["stage1_lr"])
    monkeypatch.setattr(tune_module, "prepare_data_once", lambda script: None)  # no run reads data here
    tune_module.main()
    rows = list(csv.DictReader(open(tmp_path / "tune" / "given" / "trials.csv")))
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3
    assert (float(rows[0]["param_stage1_lr"]), rows[0]["param_fusion"]) == (2e-3, "concat")
    assert rows[0]["note"] == "given (FIRST_TRIALS)" and rows[1]["note"] == rows[2]["note"] == ""

    # A trial queued by hand into the finished study runs when N_TRIALS is raised by one.
    import optuna
    study = optuna.load_study(study_name="given", storage=tune_module.make_storage())
    study.enqueue_trial({"stage1_lr": 5e-3, "fusion": "gated"})
    vars(tune_module)["N_TRIALS"] = 4
    tune_module.main()
    rows = list(csv.DictReader(open(tmp_path / "tune" / "given" / "trials.csv")))
    assert [(r["state"], float(r["param_stage1_lr"])) for r in rows[3:]] == [("COMPLETE", 5e-3)]

    vars(tune_module).update({"STUDY_NAME": "wrong", "FIRST_TRIALS": ({"stage1_lr": 2e-3},)})
    with pytest.raises(tune_module.ConfigError, match="exactly the keys of SEARCH_SPACE"):
        tune_module.main()


# ------------------------------------------------------------------------------------------------ issue 26

def run_tune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tune.py"), *args], capture_output=True, text=True, cwd=cwd)


def test_a_bad_search_space_is_one_error_line_before_the_journal(tmp_path):
    common = ["--train_script=train_simple_working.py", f"--output_dir={tmp_path / 'out'}", "--study_name=bad"]
    for space, message in (("not a dict", "SEARCH_SPACE must be a non-empty dict"),
                           ("{'lr': ('log', 0.0, 0.1)}", "with 0 < low"),
                           ("{'lr': ('float', 'a', 0.1)}", "with numbers low < high"),
                           ("{'epochs': ('int', 1, 5.5)}", "whole numbers")):
        run = run_tune(f"--search_space={space}", *common, cwd=tmp_path)
        assert run.returncode == 2 and run.stderr.startswith("error:"), (space, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1 and message in run.stderr, (space, run.stderr)
    assert not (tmp_path / "out").exists()  # no journal, no dead trial in it


def test_an_unknown_search_key_suggests_only_real_constants(tune_module, tmp_path):
    vars(tune_module).update({"TRAIN_SCRIPT": "train_lite_model.py", "OUTPUT_DIR": str(tmp_path),
                              "SEARCH_SPACE": {"added_constants": ("float", 0.0, 1.0)}})
    with pytest.raises(tune_module.ConfigError, match="not a constant of train_lite_model.py") as error:
        tune_module.main()
    assert "_added_constants" not in str(error.value)
    assert "_added_constants" not in tune_module.script_constants(REPO / "train_lite_model.py")


def failing_folds(tune_module, monkeypatch, failures: list) -> list[int]:
    """run_fold that raises the next of `failures` (a TrialFailed, or None for a score of 0.5); returns the trial
    numbers it ran."""
    ran = []

    def run_fold(trial, *rest):
        ran.append(trial.number)
        failure = failures.pop(0) if failures else None
        if failure is not None:
            raise failure
        return 0.5

    monkeypatch.setattr(tune_module, "run_fold", run_fold)
    monkeypatch.setattr(tune_module, "prepare_data_once", lambda script: None)
    return ran


def test_a_trial_failed_by_the_infrastructure_is_retried_and_uses_no_budget(tune_module, tmp_path, monkeypatch):
    vars(tune_module).update({"TRAIN_SCRIPT": "train_lite_model.py", "OUTPUT_DIR": str(tmp_path), "N_TRIALS": 2,
                              "STUDY_NAME": "retried", "SEARCH_SPACE": {"stage1_lr": ("log", 1e-4, 1e-2)},
                              "SEARCH_FOLDS": (0,), "EVALUATE_BEST": False, "TRIAL_RETRIES": 2})
    crash = tune_module.TrialFailed("fold 0 exited with status 1: OSError: [Errno 5] Input/output error")
    nan = tune_module.TrialFailed("fold 0 exited with status 1: error: non-finite loss", model_failure=True)
    ran = failing_folds(tune_module, monkeypatch, [crash, None, nan])
    tune_module.main()
    rows = list(csv.DictReader(open(tmp_path / "tune" / "retried" / "trials.csv")))
    # trial 0 crashed: retried as trial 1 with its parameters (and run folders); trial 2, a NaN, uses the budget
    assert [r["state"] for r in rows] == ["FAIL", "COMPLETE", "FAIL"] and ran == [0, 1, 2]
    assert rows[1]["retry_of"] == "0" and rows[1]["param_stage1_lr"] == rows[0]["param_stage1_lr"]
    assert "non-finite" in rows[2]["note"]

    # A cause that persists: after TRIAL_RETRIES retries this process stops; the trial waits for the next run.
    vars(tune_module).update({"STUDY_NAME": "stopped", "N_TRIALS": 1})
    ran = failing_folds(tune_module, monkeypatch, [crash] * 3)
    with pytest.raises(tune_module.TrialFailed, match="3 trials in a row"):
        tune_module.main()
    assert ran == [0, 1, 2]
    ran = failing_folds(tune_module, monkeypatch, [])
    tune_module.main()  # the cause fixed: the rerun redoes it
    rows = list(csv.DictReader(open(tmp_path / "tune" / "stopped" / "trials.csv")))
    assert [r["state"] for r in rows] == ["FAIL"] * 3 + ["COMPLETE"] and ran == [3]
    assert {r["param_stage1_lr"] for r in rows} == {rows[0]["param_stage1_lr"]}


def test_two_searches_on_an_empty_folder_run_every_trial_once(tmp_path):
    """Issue 26's acceptance: the docstring's quick look on the synthetic set, started twice at once on a fresh
    output folder (2 trials, 1 epoch, 1 fold: the synthetic set's 192 clips take most of the ~90 s). Both used to
    generate the synthetic set into one folder (one failed: "moov atom not found") and that trial was lost to the
    budget."""
    quick_look = ["--train_script=train_simple_working.py",
                  "--train_args=--modalities=audio,--epochs=1,--num_workers=0,--device=cpu",
                  "--search_space={'lr': ('log', 1e-3, 3e-2)}", "--actors=1-12", "--n_folds=6",
                  "--search_folds=(0,)", "--n_trials=2", "--study_name=quick", "--evaluate_best=False",
                  "--poll_seconds=0.2", f"--output_dir={tmp_path / 'out'}"]
    command = [sys.executable, str(REPO / "tune.py"), *quick_look]
    workers = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    rows = list(csv.DictReader(open(tmp_path / "out" / "tune" / "quick" / "trials.csv")))
    assert sorted(int(r["number"]) for r in rows if r["state"] == "COMPLETE") == [0, 1], rows
    assert all(r["state"] == "COMPLETE" or r["note"].startswith("over budget") for r in rows), rows
    assert sum("generating the synthetic" in out for out in outputs) == 1, outputs  # one process made the data
