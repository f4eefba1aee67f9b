"""Hyperparameter search with Optuna over the constants of any training script; test actors never reach the search.

A trial runs TRAIN_SCRIPT once per cross-validation fold, as its own process with `--key=value` overrides. The
folds are those of the final evaluation (N_FOLDS blocks of consecutive ACTORS, `data.ravdess.kfold_split`). For
fold k the run gets `--actors=` every actor except the fold's test actors, so no loader of the search ever holds
a test clip; the fold's validation actors are the run's held-out part (its `--test_actors`, scored once on the
checkpoint the run selected), and the run picks its best epoch on N_VAL_ACTORS of its own training actors (the
ones after the validation actors). Each epoch's validation METRIC is read from the run's log.jsonl as it is
written and fed to the pruner (a pruned trial's process is stopped). The objective is METRIC on the folds'
validation actors, averaged over SEARCH_FOLDS.

The study lives in Optuna's storage: a journal file in the study folder by default, or an RDB URL
(`--storage=postgresql://...`), so several `python tune.py` processes, on one machine or many, share one study and
N_TRIALS counts the trials of all of them. Before its first trial each process prepares the data once (the cache, or
the synthetic set; one process works while the others wait for it). Rerunning the same command resumes: a trial
whose process died on this machine is queued again with the same parameters and its runs resume from their last
checkpoint; so is a trial that failed for a reason other than its parameters (a crash, I/O; not a non-finite loss),
which uses no budget (TRIAL_RETRIES). When the trials
are done, the study folder holds trials.csv, best_args.txt (the best constants as a `--key=value` line) and PNG
plots (optimisation history, parameter importances); then (EVALUATE_BEST) the last process to finish runs the best
configuration once in the usual cross-validation with the test folds (the protocol of docs/results.md's rows,
EVALUATE_PROCESSES folds at a time), and that is the number to report.

Real audio + facial action units, Lite model (docs/results.md's benchmark), two single-threaded processes on 2 cores:
    for i in 1 2; do OMP_NUM_THREADS=1 python tune.py --study_name=lite_audio_au & done; wait
A quick look on the synthetic set (SimpleCNN, audio only, 12 actors):
    python tune.py --train_script=train_simple_working.py --train_args=--modalities=audio,--epochs=3,--num_workers=0 \\
        --search_space="{'lr': ('log', 1e-3, 3e-2), 'dropout': ('float', 0.0, 0.5)}" --actors=1-12 --n_folds=6 \\
        --search_folds="(0, 1)" --n_trials=4 --study_name=quick
Several machines: one database for the study, the same command on each machine:
    python tune.py --storage=postgresql://user:password@host/optuna --study_name=lite_audio_au
Colab:
    !python tune.py --study_name=lite_audio_au --n_trials=20
"""
from __future__ import annotations

import ast
import csv
import difflib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from data.ravdess import DataError, Split, kfold_split
from common.config import ConfigError, parse_actors, run_script
from common.files import HOST, atomic_write, atomic_write_text, process_alive

# ---- what to tune
TRAIN_SCRIPT = "train_lite_model.py"  # a training script of this repository, or a path to one
SHARED = "../shared/data"  # only used to build TRAIN_ARGS below
# Fixed arguments of every run (data, budget, workers); a list of --key=value strings (on the command line:
# --train_args=--epochs=3,--num_workers=0). The default is the Lite audio + action units benchmark (docs/results.md).
TRAIN_ARGS = ["--dataset=ravdess", f"--data_root={SHARED}/ravdess_speech_16k",
              "--cache_dir=checkpoints/cache/ravdess_speech_16k_16x112", "--visual_input=features",
              f"--feature_file={SHARED}/ravdess_clip_features/au_mfcc.npz", "--num_workers=0",
              "--preset=cpu"]
# The search space: a constant of TRAIN_SCRIPT (lower case, as on its command line) -> its distribution:
#   ("log", low, high) a float drawn log-uniformly | ("float", low, high) | ("int", low, high[, step])
#   | ("choice", (value, value, ...)).
# The default space: the recipe constants of the training scripts (docs/configuration.md, "The training recipe").
SEARCH_SPACE = {
    "stage1_lr": ("log", 5e-4, 5e-3),
    "weight_decay": ("log", 1e-3, 0.1),
    "label_smoothing": ("float", 0.0, 0.2),
    "time_shift_seconds": ("float", 0.0, 0.5),
    "time_mask_seconds": ("float", 0.0, 1.0),
    "feature_noise": ("float", 0.0, 0.3),
    "modality_dropout": ("float", 0.0, 0.5),
    "fusion": ("choice", ("concat", "product", "gated", "cross_attention", "transformer")),
}

# ---- folds (the same actor-disjoint folds as the final evaluation)
ACTORS = "1-20"  # actors in the experiment, e.g. "1-20" (21-24 held out elsewhere)
N_FOLDS = 5  # blocks of consecutive actors
N_VAL_ACTORS = 2  # validation actors per fold (taken from the training actors), the search's held-out actors
SEARCH_FOLDS = "all"  # "all" or a tuple of folds such as (0, 2): the objective averages over these
METRIC = "accuracy"  # "accuracy" or "uar": objective, per-epoch reports and each run's checkpoint selection

# ---- search
N_TRIALS = 40  # trials of the study in all, over every process that works on it
STARTUP_TRIALS = 8  # random trials before TPE models the space
SAMPLER_SEED = None  # None: each process draws differently (processes that share a study must not share a seed)
# Parameter sets tried before any sampled one, each a dict over SEARCH_SPACE's keys: give the hand-set recipe's
# values, and trials.csv shows what the search gained over it on the same objective (noted "given"; never pruned,
# since a reference stopped early compares with nothing).
FIRST_TRIALS = ()
PRUNER = "median"  # "median": stop a trial below the median of earlier trials at the same fold and epoch;
#                    "threshold": stop a trial whose METRIC is below PRUNE_BELOW; "none"
PRUNER_STARTUP_TRIALS = 4  # "median" prunes nothing until this many trials have finished
PRUNE_AFTER_EPOCHS = 3  # never prune in the first epochs of a fold (their validation metric is noise)
PRUNE_BELOW = 0.2  # "threshold": e.g. 0.2 stops trials stuck near chance (0.125)
POLL_SECONDS = 2.0  # how often a running fold's log.jsonl is read
# A trial that failed for a reason other than its parameters (a crash, I/O, the data; not a non-finite loss) is
# queued again with the same parameters and uses no budget: this process retries it up to TRIAL_RETRIES times in a
# row, then stops, and the next run of tune.py takes it up again.
TRIAL_RETRIES = 2

# ---- final evaluation
EVALUATE_BEST = True  # after the search: the best configuration once in the usual CV over N_FOLDS with test folds
# Validation actors of the final CV's runs. 0: the protocol of docs/results.md's rows (each fold trains on all its
# training actors and tests the last weights), so the tuned row compares with the hand-set one.
EVALUATE_VAL_ACTORS = 0
EVALUATE_PROCESSES = 1  # folds of the final CV trained at once, each its own process (2 on 2 cores, single-threaded)

# ---- output
OUTPUT_DIR = "checkpoints"  # study folder OUTPUT_DIR/tune/STUDY_NAME; trial runs OUTPUT_DIR/<script>/tune_STUDY_NAME
STUDY_NAME = "lite_audio_au"  # the same name joins / resumes the study
STORAGE = ""  # "" = journal file in the study folder; a path = a journal file there; "<dialect>://..." = an RDB URL

DISTRIBUTIONS = ("log", "float", "int", "choice")
PRUNERS = ("median", "threshold", "none")
METRICS = ("accuracy", "uar")
# Arguments tune.py sets itself for each run: the split, where the run goes, and the selection metric.
CONTROLLED = ("actors", "test_actors", "val_actors", "fold", "n_folds", "n_val_actors", "run_name", "output_dir",
              "select_metric")
EPOCH_STRIDE = 1000  # report step = fold position x EPOCH_STRIDE + epoch, so a pruner compares the same fold
REPO = Path(__file__).resolve().parent


class TrialFailed(RuntimeError):
    """A run of a trial ended with an error that is not the user's. `model_failure`: the parameters' fault (a
    non-finite loss, with its crash dump), which uses up the trial; else a crash, I/O or data problem, which queues
    the trial again."""

    def __init__(self, message: str, model_failure: bool = False) -> None:
        super().__init__(message)
        self.model_failure = model_failure


# ------------------------------------------------------------------------------------------------ settings

def script_path() -> Path:
    path = Path(TRAIN_SCRIPT)
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parent / TRAIN_SCRIPT
    if not path.is_file():
        raise ConfigError(f"TRAIN_SCRIPT {TRAIN_SCRIPT} does not exist")
    return path


def script_constants(path: Path) -> set[str]:
    """The lower-case names of the script's top-level UPPER_SNAKE constants, read without importing it; private
    names (`_PRESETS`, `_FUSION_CHOICES`) are not options and are left out."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            names.update(t.id.lower() for t in node.targets
                         if isinstance(t, ast.Name) and t.id.isupper() and not t.id.startswith("_"))
    return names


def _arg_key(arg: str) -> str:
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"TRAIN_ARGS entries look like --key=value, got '{arg}'")
    return arg[2:].split("=", 1)[0].replace("-", "_").lower()


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_range(key: str, spec: tuple) -> None:
    """A ('log' | 'float' | 'int', low, high[, step]) entry of SEARCH_SPACE: numbers, low < high, low > 0 for 'log',
    whole numbers and a positive step for 'int' (Optuna would otherwise fail inside the first trial)."""
    kind = spec[0]
    usage = f"SEARCH_SPACE['{key}'] = {spec!r}: write ('{kind}', low, high"
    if not (len(spec) in (3, 4) and all(_is_number(v) for v in spec[1:]) and spec[1] < spec[2]):
        raise ConfigError(f"{usage}{', step' if kind == 'int' else ''}) with numbers low < high")
    if len(spec) == 4 and kind != "int":
        raise ConfigError(f"{usage}); a step is only for 'int'")
    if kind == "log" and spec[1] <= 0:
        raise ConfigError(f"{usage}) with 0 < low (a log-uniform range cannot start at {spec[1]})")
    if kind == "int" and not (all(float(v).is_integer() for v in spec[1:]) and (len(spec) == 3 or spec[3] > 0)):
        raise ConfigError(f"{usage}[, step]) with whole numbers and a positive step")


def check_settings(script: Path) -> None:
    """Every choice and every search key checked before any trial runs: one line per mistake."""
    known = script_constants(script)
    if not isinstance(SEARCH_SPACE, dict) or not SEARCH_SPACE:
        raise ConfigError(f"SEARCH_SPACE must be a non-empty dict such as \"{{'lr': ('log', 1e-4, 1e-2)}}\", "
                          f"got {SEARCH_SPACE!r}")
    for key, spec in SEARCH_SPACE.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"SEARCH_SPACE key '{key}' is not a constant of {script.name}{hint}")
        if key in CONTROLLED:
            raise ConfigError(f"SEARCH_SPACE key '{key}' is set by tune.py itself")
        kind = spec[0] if isinstance(spec, (tuple, list)) and spec else None
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"SEARCH_SPACE['{key}'] = {spec!r}: the first item must be one of {DISTRIBUTIONS}")
        if kind == "choice" and not (len(spec) == 2 and isinstance(spec[1], (tuple, list)) and spec[1]):
            raise ConfigError(f"SEARCH_SPACE['{key}'] = {spec!r}: write ('choice', (value, value, ...))")
        if kind != "choice":
            check_range(key, spec)
    for arg in TRAIN_ARGS:
        key = _arg_key(arg)
        if key in CONTROLLED:
            raise ConfigError(f"TRAIN_ARGS sets --{key}; tune.py sets it for each run (set ACTORS, N_FOLDS, "
                              f"N_VAL_ACTORS, METRIC or OUTPUT_DIR of tune.py instead)")
        if key in SEARCH_SPACE:
            raise ConfigError(f"--{key} is both in TRAIN_ARGS and SEARCH_SPACE")
    if "select_metric" not in known:
        raise ConfigError(f"{script.name} has no SELECT_METRIC constant; tune.py needs its runs to select on METRIC")
    if METRIC not in METRICS:
        raise ConfigError(f"METRIC must be one of {METRICS}, got '{METRIC}'")
    if PRUNER not in PRUNERS:
        raise ConfigError(f"PRUNER must be one of {PRUNERS}, got '{PRUNER}'")
    if N_VAL_ACTORS < 1:
        raise ConfigError("N_VAL_ACTORS must be at least 1: the search scores each trial on the validation actors")
    for params in FIRST_TRIALS:
        if not isinstance(params, dict) or set(params) != set(SEARCH_SPACE):
            raise ConfigError(f"FIRST_TRIALS entry {params!r}: write a dict with exactly the keys of SEARCH_SPACE "
                              f"({', '.join(SEARCH_SPACE)})")
    if EVALUATE_VAL_ACTORS < 0 or EVALUATE_PROCESSES < 1:
        raise ConfigError(f"EVALUATE_VAL_ACTORS must be at least 0 and EVALUATE_PROCESSES at least 1, got "
                          f"{EVALUATE_VAL_ACTORS} and {EVALUATE_PROCESSES}")


def search_splits() -> list[tuple[int, Split, tuple[int, ...]]]:
    """(fold, the fold's split, the run's own validation actors) for every fold of the search."""
    actors = parse_actors(ACTORS)
    folds = range(N_FOLDS) if SEARCH_FOLDS == "all" else SEARCH_FOLDS
    if not isinstance(folds, (range, tuple, list)) or not folds:
        raise ConfigError(f"SEARCH_FOLDS must be 'all' or a tuple of folds, got {SEARCH_FOLDS!r}")
    splits = []
    for fold in folds:
        split = kfold_split(actors, N_FOLDS, fold, N_VAL_ACTORS)
        # The run's validation actors: the training actors after the fold's validation actors (wrapping round).
        after = [a for a in split.train if a > max(split.val)] + [a for a in split.train if a < min(split.val)]
        inner_val = tuple(sorted(after[:N_VAL_ACTORS]))
        if len(inner_val) == len(split.train):
            raise ConfigError(f"fold {fold} has too few training actors ({len(split.train)}) for N_VAL_ACTORS="
                              f"{N_VAL_ACTORS} validation actors inside each run")
        splits.append((fold, split, inner_val))
    return splits


# ------------------------------------------------------------------------------------------------ storage

def study_dir() -> Path:
    return Path(OUTPUT_DIR) / "tune" / STUDY_NAME


def make_storage():
    import optuna

    if "://" in STORAGE:
        return STORAGE
    path = Path(STORAGE) if STORAGE else study_dir() / "journal.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    journal = optuna.storages.journal
    # Optuna 4+ calls the file backend JournalFileBackend; 3.x had JournalFileStorage.
    backend = getattr(journal, "JournalFileBackend", None) or getattr(journal, "JournalFileStorage")
    return journal.JournalStorage(backend(str(path)))


def make_pruner():
    import optuna

    if PRUNER == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=0)
    if PRUNER == "threshold":
        return optuna.pruners.ThresholdPruner(lower=PRUNE_BELOW)
    return optuna.pruners.NopPruner()


# ------------------------------------------------------------------------------------------------ data

def prepare_data_once(script: Path) -> None:
    """Prepare the trials' data (the cache; the synthetic set for DATASET='synthetic') before the first trial, in a
    process that reads TRAIN_ARGS as TRAIN_SCRIPT does (`prepare_child`). Every tune.py process of the study does
    this; the cache's lock lets one work while the others wait, so no trial ever fails on half-prepared data."""
    command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); import tune; "
               f"tune.prepare_child(sys.argv[1], sys.argv[2:])", str(script), *TRAIN_ARGS, f"--output_dir={OUTPUT_DIR}"]
    returncode = subprocess.run(command, stdin=subprocess.DEVNULL).returncode
    if returncode == 2:  # a user mistake (e.g. DATA_ROOT), already told in one error: line by the child
        raise SystemExit(2)
    if returncode != 0:
        raise TrialFailed(f"preparing the data with {script.name} {' '.join(TRAIN_ARGS)} failed (exit status "
                          f"{returncode}, output above); no trial was run")


def prepare_child(script: str, args: list[str]) -> None:
    """Body of `prepare_data_once`'s process: the training script's constants with `args` applied (presets
    included, as its own command line would), then only its data preparation (data.setup.prepare_data)."""
    import importlib.util

    from data.setup import prepare_data

    spec = importlib.util.spec_from_file_location("tune_train_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a script does nothing on import but define its constants
    namespace = vars(module)
    run_script(lambda: prepare_data(module.data_settings()), namespace, args, user_errors=(DataError,))


# ------------------------------------------------------------------------------------------------ trials

def requeue(study, trial) -> None:
    """End a trial that did not finish and queue its parameters again; the new trial resumes its runs."""
    from optuna.trial import TrialState

    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    root = trial.user_attrs.get("retry_of", trial.number)
    given = {"given": True} if trial.user_attrs.get("given") else {}
    study.enqueue_trial(trial.params, user_attrs={"retry_of": root, **given})
    print(f"trial {trial.number} did not finish: queued again with the same parameters")


def enqueue_first_trials(study) -> None:
    """FIRST_TRIALS, queued once per study (by the first process to start it; a repeat is skipped)."""
    if FIRST_TRIALS and claim(study_dir() / "first_trials.claim"):
        for params in FIRST_TRIALS:
            study.enqueue_trial(params, user_attrs={"given": True}, skip_if_exists=True)


def requeue_dead_trials(study) -> None:
    """Trials left RUNNING by a process of this machine that no longer exists (killed, machine restarted)."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if trial.user_attrs.get("host") == HOST and pid and not process_alive(pid):
            requeue(study, trial)


def counted_trials(study) -> list:
    """The trials that use up N_TRIALS: all but the failed ones that were queued again or were over budget."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)

    def requeued(t) -> bool:
        root = t.user_attrs.get("retry_of", t.number)
        return any(o.user_attrs.get("retry_of") == root and o.number > t.number for o in trials)

    return [t for t in trials if not (t.state == TrialState.FAIL and (t.user_attrs.get("over_budget") or requeued(t)))]


def next_trial(study):
    """The next trial of this process, or None when the study's N_TRIALS are taken (by any process)."""
    from optuna.trial import TrialState

    taken = [t for t in counted_trials(study) if t.state != TrialState.WAITING]  # a queued trial is still to run
    if len(taken) >= N_TRIALS:
        return None
    trial = study.ask()
    # Two processes may ask at the same moment for the last trial: the storage numbers trials in order, so the one
    # whose trial falls beyond N_TRIALS gives it back.
    if trial.number not in [t.number for t in counted_trials(study)][:N_TRIALS]:
        trial.set_user_attr("over_budget", True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    trial.set_user_attr("host", HOST)
    trial.set_user_attr("pid", os.getpid())
    return trial


def suggest(trial) -> dict:
    params = {}
    for key, spec in SEARCH_SPACE.items():
        kind = spec[0]
        if kind in ("log", "float"):
            params[key] = trial.suggest_float(key, spec[1], spec[2], log=kind == "log")
        elif kind == "int":
            params[key] = trial.suggest_int(key, spec[1], spec[2], step=spec[3] if len(spec) == 4 else 1)
        else:
            params[key] = trial.suggest_categorical(key, list(spec[1]))
    return params


def as_args(params: dict) -> list[str]:
    """{'fusion': 'gated', 'lr': 0.001} -> ['--fusion=gated', '--lr=0.001'] (values as the scripts parse them)."""
    args = []
    for key, value in params.items():
        text = value if isinstance(value, str) and not _is_literal(value) else repr(value)
        args.append(f"--{key}={text}")
    return args


def _is_literal(text: str) -> bool:
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return False
    return True


def _actor_list(actors: tuple[int, ...]) -> str:
    return ",".join(str(a) for a in actors)


def run_prefix() -> str:
    return f"tune_{STUDY_NAME}"


def find_run_dir(run_name: str) -> Path | None:
    """The run folder a script made for `run_name` (OUTPUT_DIR/<script's folder>/<run_name>)."""
    found = sorted(Path(OUTPUT_DIR).glob(f"*/{run_name}/config.json"))
    return found[0].parent if found else None


def read_log(run_dir: Path | None) -> list[dict]:
    """Complete lines of a run's log.jsonl (the line being written is left for the next read)."""
    if run_dir is None or not (run_dir / "log.jsonl").exists():
        return []
    text = (run_dir / "log.jsonl").read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1].strip()


def _crash_dump_since(run_dir: Path | None, since: float) -> bool:
    """Whether the run saved a crash dump (a non-finite loss: training/progress.crash_exit) after `since`."""
    if run_dir is None or not (run_dir / "crash").is_dir():
        return False
    return any(dump.stat().st_mtime >= since - 1 for dump in (run_dir / "crash").iterdir())


def run_fold(trial, position: int, fold: int, split: Split, inner_val: tuple[int, ...], params: dict,
             script: Path) -> float:
    """Train one fold of a trial in its own process; report each epoch; return METRIC on the fold's val actors."""
    import optuna

    run_id = trial.user_attrs.get("retry_of", trial.number)
    run_name = f"{run_prefix()}/trial{run_id:04d}/fold{fold}"
    command = [sys.executable, str(script), *TRAIN_ARGS, *as_args(params),
               f"--actors={_actor_list(split.train + split.val)}", f"--test_actors={_actor_list(split.val)}",
               f"--val_actors={_actor_list(inner_val)}", f"--run_name={run_name}", f"--output_dir={OUTPUT_DIR}",
               f"--select_metric={METRIC}"]
    log_path = study_dir() / "logs" / f"trial{run_id:04d}_fold{fold}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        reported = 0
        try:
            while True:
                finished = process.poll() is not None
                run_dir = find_run_dir(run_name)
                records = read_log(run_dir)
                for record in records[reported:]:
                    trial.report(record[f"val_{METRIC}"], position * EPOCH_STRIDE + record["epoch"])
                    prunable = record["epoch"] >= PRUNE_AFTER_EPOCHS and not trial.user_attrs.get("given")
                    if prunable and trial.should_prune():
                        raise optuna.TrialPruned(f"fold {fold}, epoch {record['epoch']}: "
                                                 f"validation {METRIC} {record[f'val_{METRIC}']:.3f}")
                reported = len(records)
                if finished:
                    break
                time.sleep(POLL_SECONDS)
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    if process.returncode == 2:  # the scripts' exit status for a user mistake: no further trial would run
        raise ConfigError(f"{script.name} (trial {trial.number}, fold {fold}): {_last_line(log_path)} "
                          f"(log: {log_path})")
    if process.returncode != 0 or run_dir is None or not (run_dir / "metrics.json").exists():
        raise TrialFailed(f"fold {fold} exited with status {process.returncode}: {_last_line(log_path)} "
                          f"(log: {log_path})", model_failure=_crash_dump_since(run_dir, started))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if sorted(metrics["test_actors"]) != sorted(split.val):  # the held-out actors must be the fold's validation actors
        raise TrialFailed(f"{run_dir}/metrics.json scored actors {metrics['test_actors']}, expected {list(split.val)}")
    return float(metrics[METRIC])


def run_trial(study, trial, splits: list, script: Path) -> bool:
    """All folds of one trial, then tell the study: COMPLETE with the mean, PRUNED, or FAIL. False when the trial
    failed for a reason other than its parameters: it is then queued again and uses no budget."""
    import optuna
    from optuna.trial import TrialState

    params = suggest(trial)
    start = time.time()
    scores: list[float] = []
    try:
        for position, (fold, split, inner_val) in enumerate(splits):
            scores.append(run_fold(trial, position, fold, split, inner_val, params, script))
            trial.set_user_attr("fold_scores", scores)
    except optuna.TrialPruned as pruned:
        study.tell(trial, state=TrialState.PRUNED)
        print(f"trial {trial.number} pruned at {pruned} ({time.time() - start:.0f} s) {as_args(params)}")
        return True
    except TrialFailed as err:
        trial.set_user_attr("error", str(err))
        print(f"trial {trial.number} failed: {err}")
        if err.model_failure:  # the parameters' result, as a low score would be
            study.tell(trial, state=TrialState.FAIL)
            return True
        requeue(study, trial)
        return False
    except ConfigError:  # a user mistake stops every trial: fixed and rerun, this one runs again
        requeue(study, trial)
        raise
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the trial is queued again for the next run of tune.py
        requeue(study, trial)
        raise
    value = sum(scores) / len(scores)
    study.tell(trial, value)
    print(f"trial {trial.number}: validation {METRIC} {value:.1%} (folds {', '.join(f'{s:.1%}' for s in scores)}; "
          f"{time.time() - start:.0f} s) {' '.join(as_args(params))}")
    return True


# ------------------------------------------------------------------------------------------------ outputs

def trials_table(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append({"number": t.number, "state": t.state.name, f"val_{METRIC}": t.value,
                     "fold_scores": " ".join(f"{s:.4f}" for s in t.user_attrs.get("fold_scores", [])),
                     **{f"param_{k}": v for k, v in t.params.items()},
                     "duration_s": None if duration is None else round(duration, 1),
                     "retry_of": t.user_attrs.get("retry_of"), "note": trial_note(t)})
    return rows


def trial_note(trial) -> str:
    if trial.user_attrs.get("error"):
        return trial.user_attrs["error"]
    if trial.user_attrs.get("over_budget"):
        return "over budget: another process took the last trial"
    return "given (FIRST_TRIALS)" if trial.user_attrs.get("given") else ""


def write_trials_csv(study, path: Path) -> None:
    rows = trials_table(study)
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def best_command(script: Path, best_args: list[str], cv_run_name: str, fold: int | str = "all") -> list[str]:
    return [sys.executable, str(script), *TRAIN_ARGS, *best_args, f"--actors={ACTORS}", f"--n_folds={N_FOLDS}",
            f"--n_val_actors={EVALUATE_VAL_ACTORS}", f"--fold={fold}", f"--select_metric={METRIC}",
            f"--output_dir={OUTPUT_DIR}", f"--run_name={cv_run_name}"]


def run_best_cv(script: Path, best_args: list[str], cv_run_name: str, log_path: Path) -> int:
    """The final CV's folds, EVALUATE_PROCESSES at a time, then `--fold=all` collects them (a finished fold is
    reported, not retrained); the exit status of the first fold that failed, else of the collection."""
    with open(log_path, "a") as log:
        if EVALUATE_PROCESSES > 1:
            pending = list(range(N_FOLDS))
            running: list[subprocess.Popen] = []
            while pending or running:
                while pending and len(running) < EVALUATE_PROCESSES:
                    command = best_command(script, best_args, cv_run_name, pending.pop(0))
                    running.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
                time.sleep(POLL_SECONDS)
                for process in [p for p in running if p.poll() is not None]:
                    running.remove(process)
                    if process.returncode != 0:
                        for other in running:
                            other.terminate()
                            other.wait()
                        return process.returncode
        command = best_command(script, best_args, cv_run_name)
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode


def save_plots(study, folder: Path) -> list[Path]:
    """Optimisation history and parameter importances as PNG; importances need two finished trials that differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    written = []
    plots = {"optimization_history.png": vis.plot_optimization_history,
             "param_importances.png": vis.plot_param_importances}
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the matplotlib backend of optuna.visualization is "experimental"
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as err:
                print(f"{name} not drawn: {err}")
                continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.tight_layout()
        figure.savefig(folder / name, dpi=120)
        plt.close(figure)
        written.append(folder / name)
    return written


def claim(path: Path) -> bool:
    """True for the one process that creates `path` (or takes it over from a dead process of this machine)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        owner = json.loads(path.read_text() or "{}")
        if owner.get("host") != HOST or process_alive(owner.get("pid", 0)):
            return False
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        json.dump({"host": HOST, "pid": os.getpid()}, f)
    return True


def evaluate_best(study, script: Path, best_args: list[str]) -> None:
    """The best configuration once in the usual CV with the test folds (exactly one process runs it)."""
    trial = study.best_trial
    cv_run_name = f"{run_prefix()}/best_trial{trial.number:04d}"
    claim_file = study_dir() / f"best_trial{trial.number:04d}.claim"
    if not claim(claim_file):
        print(f"the best configuration is being evaluated by another process ({claim_file})")
        return
    log_path = study_dir() / "logs" / f"best_trial{trial.number:04d}_cv.log"
    print(f"evaluating trial {trial.number} in {N_FOLDS}-fold CV with test folds (log: {log_path})")
    returncode = run_best_cv(script, best_args, cv_run_name, log_path)
    cv_dir = find_run_dir(cv_run_name)
    if returncode != 0 or cv_dir is None or not (cv_dir / "cv_metrics.json").exists():
        claim_file.unlink()
        raise TrialFailed(f"the CV of the best configuration failed: {_last_line(log_path)} (log: {log_path})")
    cv = json.loads((cv_dir / "cv_metrics.json").read_text())
    summary = (f"best trial {trial.number} (validation {METRIC} {trial.value:.1%}): {N_FOLDS}-fold actor-disjoint "
               f"CV test accuracy {cv['accuracy']['mean']:.1%} +- {cv['accuracy']['std']:.1%}, "
               f"UAR {cv['uar']['mean']:.1%} +- {cv['uar']['std']:.1%} ({cv_dir / 'cv_metrics.json'})")
    atomic_write_text(study_dir() / "best_cv.txt", summary + "\n")
    print(summary)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt  # so that a SIGTERM stops the running fold's process and queues the trial again


def main() -> None:
    import optuna
    from optuna.trial import TrialState

    script = script_path()
    check_settings(script)
    splits = search_splits()
    prepare_data_once(script)
    study_dir().mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(n_startup_trials=STARTUP_TRIALS, seed=SAMPLER_SEED, multivariate=True,
                                         constant_liar=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate TPE
        study = optuna.create_study(study_name=STUDY_NAME, storage=make_storage(), sampler=sampler,
                                    pruner=make_pruner(), direction="maximize", load_if_exists=True)
    runs_of_study = [d for d in Path(OUTPUT_DIR).glob(f"*/{run_prefix()}") if d.is_dir()]
    if not study.get_trials(deepcopy=False) and runs_of_study:
        raise ConfigError(f"{runs_of_study[0]} holds the runs of an earlier study named '{STUDY_NAME}' whose storage "
                          f"is gone: choose another STUDY_NAME or delete that folder")
    enqueue_first_trials(study)
    requeue_dead_trials(study)
    print(f"study '{STUDY_NAME}': {len(counted_trials(study))}/{N_TRIALS} trials taken; folds "
          f"{', '.join(str(fold) for fold, _, _ in splits)} of {N_FOLDS} over actors {ACTORS} "
          f"(test actors of each fold left out of every run)")

    failed_in_a_row = 0  # trials that failed for a reason other than their parameters, queued again
    while (trial := next_trial(study)) is not None:
        failed_in_a_row = 0 if run_trial(study, trial, splits, script) else failed_in_a_row + 1
        if failed_in_a_row > TRIAL_RETRIES:
            raise TrialFailed(f"{failed_in_a_row} trials in a row failed for a reason other than their parameters "
                              f"(the last error is above); the trial is queued again: rerun tune.py once the cause "
                              f"is fixed")

    folder = study_dir()
    write_trials_csv(study, folder / "trials.csv")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        print(f"no trial has finished yet; trials: {folder / 'trials.csv'}")
        return
    save_plots(study, folder)
    best_args = as_args(study.best_trial.params)
    atomic_write_text(folder / "best_args.txt", " ".join(best_args) + "\n")
    print(f"best trial {study.best_trial.number}: validation {METRIC} {study.best_value:.1%}\n"
          f"  {' '.join(best_args)}\n  (trials: {folder / 'trials.csv'}, plots and best_args.txt: {folder})")
    if not EVALUATE_BEST:
        return
    if study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        print("other processes are still running trials; the last one to finish evaluates the best configuration")
        return
    evaluate_best(study, script, best_args)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    run_script(main, globals(), sys.argv[1:], user_errors=(DataError, TrialFailed))
