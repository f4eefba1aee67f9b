"""Command-line overrides of a script's UPPER_SNAKE constants: `--batch_size=32` or `--batch-size=32`.

Values are parsed as Python literals (`--modalities="('audio',)"`, `--amp=False`); anything that is not a
literal stays a string (`--data_root=/content/drive/RAVDESS`); a bare `--flag` sets a True/False constant to True.
The script's own source documents its constants: the comment after a constant is its help text. A choice constant
declares its allowed values beside it in code (`FUSION = "gated"`, then `_FUSION_CHOICES = ("concat", ...)`);
they are checked before the script does any work (`--fusion=crossattention` -> one line naming the allowed values
and the closest one). `--help` prints the docstring and every constant with its comment and value.
"""
from __future__ import annotations

import ast
import difflib
import io
import json
import os
import re
import sys
import tempfile
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common import distributed


class ConfigError(ValueError):
    """A user mistake in the configuration; scripts print it as one line and exit with status 2."""


def _parse_value(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def config_keys(namespace: dict) -> list[str]:
    """The overridable constants of a script: its UPPER_SNAKE globals holding plain values."""
    plain = (bool, int, float, str, list, tuple, dict, type(None))
    return sorted(k for k, v in namespace.items() if k.isupper() and not k.startswith("_") and isinstance(v, plain))


def _check_type(key: str, old: object, new: object) -> object:
    # An int where a float is expected is fine (LR=1e-3 vs --lr=1); a string where a number is expected is a typo.
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    # A count (epochs, batch size) is a whole number: 2.5 epochs would run as 3 and be logged as "epoch 3/2.5".
    if isinstance(old, int) and not isinstance(old, bool) and isinstance(new, float):
        if not new.is_integer():
            raise ConfigError(f"--{key.lower()} expects a whole number, got {new:g}")
        return int(new)
    # "all" is the one word a number may become (--fold=all: every fold of the cross-validation).
    if isinstance(old, (int, float)) and not isinstance(old, bool) and isinstance(new, str) and new != "all":
        raise ConfigError(f"--{key.lower()} expects a number, got '{new}'")
    if isinstance(old, bool) and not isinstance(new, bool):
        raise ConfigError(f"--{key.lower()} expects True or False, got '{new}'")
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return type(old)(new)
    if isinstance(old, (list, tuple)) and isinstance(new, str):  # --modalities=audio or --modalities=audio,visual
        return type(old)(part for part in new.split(",") if part)
    return new


@dataclass
class ConstantDoc:
    """What a script's source says about one of its constants."""

    comment: str  # the comment on the constant's line(s)
    heading: str  # the heading of its group, a comment such as "# ---- data" -> "data"
    notes: list[str]  # comment lines between the previous constant and this one, other than the heading


def constant_docs(source: str) -> dict[str, ConstantDoc]:
    """The module-level UPPER_SNAKE assignments of a script's source with their comments and group headings."""
    comments: dict[int, str] = {}
    standalone: dict[int, str] = {}
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            text = token.string.lstrip("#").strip()
            (standalone if not lines[row - 1][:col].strip() else comments)[row] = text
    docs: dict[str, ConstantDoc] = {}
    heading, last_line = "", 0
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id.isupper()):
            continue
        between = [standalone[row] for row in range(last_line + 1, node.lineno) if row in standalone]
        headings = [text for text in between if text.startswith("--")]
        if headings:  # "---- data" / "--- model ---" -> "data" / "model"
            heading = headings[-1].strip("- ")
        last_line = node.end_lineno or node.lineno
        comment = " ".join(comments[row] for row in range(node.lineno, last_line + 1) if row in comments)
        notes = [text for text in between if not text.startswith("--")]
        docs[node.targets[0].id] = ConstantDoc(comment, heading, notes)
    return docs


def script_docs(namespace: dict) -> dict[str, ConstantDoc]:
    """`constant_docs` of the script that owns `namespace` (none for a namespace without a source file)."""
    path = namespace.get("__file__")
    if not path or not Path(path).is_file():
        return {}
    return constant_docs(Path(path).read_text())


def choice_name(key: str) -> str:
    """Where a script declares the allowed values of its choice constant `key`: the private tuple beside it,
    `FUSION = "gated"` then `_FUSION_CHOICES = ("concat", "gated", ...)` (None may be one of them)."""
    return f"_{key}_CHOICES"


def declared_choices(namespace: dict) -> dict[str, tuple]:
    """{constant: its allowed values} of the choice constants a script's namespace declares."""
    return {key: tuple(namespace[choice_name(key)]) for key in config_keys(namespace)
            if isinstance(namespace.get(choice_name(key)), (tuple, list))}


def source_choices(source: str, key: str) -> tuple:
    """The allowed values a script's source declares for `key` (read without importing the script); () if none."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [choice_name(key)]:
            return tuple(ast.literal_eval(node.value))
    return ()


def check_choices(namespace: dict) -> None:
    """Raise a one-line ConfigError for a choice constant whose value (a string, or each item of a tuple/list) is
    not one of the values its script declares, naming them and the closest one."""
    for key, choices in declared_choices(namespace).items():
        value = namespace[key]
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if item not in choices:
                names = [str(c) for c in choices]
                close = difflib.get_close_matches(str(item), names, n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"--{key.lower()}={item} is not one of {' | '.join(names)}{hint}")


def _docstring_as_written(namespace: dict) -> str:
    """The module docstring as it stands in the source (its line-continuation backslashes kept, so the commands
    in it can be copied), else `__doc__`."""
    path = namespace.get("__file__")
    if path and Path(path).is_file():
        source = Path(path).read_text()
        body = ast.parse(source).body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            literal = ast.get_source_segment(source, body[0].value) or ""
            return literal.lstrip("rRbBuU")[3:-3].strip()
    return (namespace.get("__doc__") or "").strip()


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def help_text(namespace: dict) -> str:
    """The script's docstring, then its options grouped under the source's headings: --key=value  comment."""
    docs = script_docs(namespace)
    keys = config_keys(namespace)
    groups = [(docs[k].heading, k) for k in docs if k in keys] + [("imported from other modules", k) for k in keys if k not in docs]
    lines = [_docstring_as_written(namespace), "",
             "Options (--key=value; values are Python literals, shown as currently set):"]
    shown = {k: f"--{k.lower()}={_shorten(repr(namespace[k]))}" for k in keys}
    width = min(44, max(map(len, shown.values()), default=0))
    heading = None
    for group, key in groups:
        if group != heading:
            heading = group
            lines.append(f"  {heading}" if heading else "")
        doc = docs.get(key)
        lines += [f"    # {note}" for note in (doc.notes if doc else [])]
        lines.append(f"    {shown[key]:<{width}}  {doc.comment if doc else ''}".rstrip())
    return "\n".join(lines)


def apply_preset(namespace: dict, explicit: set[str]) -> None:
    """A script's `PRESET` names an entry of its `_PRESETS` ({name: {CONSTANT: value}}): those constants are set
    first, and every constant given on the command line (`explicit`) keeps the user's value."""
    presets = namespace.get("_PRESETS")
    if not isinstance(presets, dict) or "PRESET" not in namespace:
        return
    if namespace["PRESET"] not in presets:
        close = difflib.get_close_matches(str(namespace["PRESET"]), list(presets), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"PRESET must be one of {', '.join(presets)}, got '{namespace['PRESET']}'{hint}")
    for key, value in presets[namespace["PRESET"]].items():
        if key not in explicit:
            namespace[key] = value


# Allowed ranges of numeric constants, by name (a regular expression matching the whole name): (low, low included,
# high, high included), None for no bound. One table for every script, checked before a script does any work, so
# `--lr=-1` or `--batch_size=0` is a one-line error rather than a traceback from the optimizer or the DataLoader,
# and `--epochs=-3` or `--warmup_fraction=1.5` is refused rather than trained with. A constant whose value is not a
# number (None: "the recipe's", "all") is not checked.
_RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    r"(\w+_)?LR": (0, False, None, False),  # a learning rate; 0 would train nothing
    r"EPOCHS|STEPS|OVERFIT_STEPS|BATCH_SIZE|PATIENCE": (1, True, None, False),
    r"\w+_EPOCHS|WARMUP_STEPS": (0, True, None, False),  # a stage of 0 epochs is skipped
    r"(\w+_)?WORKERS": (0, True, None, False),  # 0: in the main process (PREPARE_WORKERS 0: one per CPU)
    r"LABEL_SMOOTHING|(\w+_)?DROPOUT": (0, True, 1, False),
    r"WARMUP_FRACTION|EMA_DECAY": (0, True, 1, True),
    r"WEIGHT_DECAY|CLIP_NORM|FEATURE_NOISE|MIXUP_ALPHA|TEST_TIME_SHIFTS|N_VAL_ACTORS": (0, True, None, False),
    r"N_FRAMES|FRAME_SIZE|FREQ_MASKS|FREQ_MASK_BINS|TIME_MASKS|TIME_MASK_SECONDS|TIME_SHIFT_SECONDS":
        (0, True, None, False),
    r"N_FOLDS": (2, True, None, False),
}


def _range_text(low: float | None, low_in: bool, high: float | None, high_in: bool) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def check_ranges(namespace: dict) -> None:
    """Raise a one-line ConfigError for a numeric constant outside its range in `_RANGES`; constants a script
    does not define, and values that are not numbers, are left alone."""
    for key in config_keys(namespace):
        value = namespace[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        for pattern, (low, low_in, high, high_in) in _RANGES.items():
            if not re.fullmatch(pattern, key):
                continue
            above = low is None or value > low or (low_in and value == low)
            below = high is None or value < high or (high_in and value == high)
            if not (above and below):
                raise ConfigError(f"--{key.lower()}={value:g} is out of range: it must be "
                                  f"{_range_text(low, low_in, high, high_in)}")
            break
    stages = sorted(k for k in config_keys(namespace) if re.fullmatch(r"STAGE\d+_EPOCHS", k))
    if stages and all(namespace[k] == 0 for k in stages):  # each stage may be skipped, not all of them
        raise ConfigError(f"{' and '.join(f'--{k.lower()}=0' for k in stages)}: no stage would train")


def check_output_dir(namespace: dict) -> None:
    """An OUTPUT_DIR that cannot be written is a one-line error before any work (rather than the chained
    tracebacks of the first folder made in it): the nearest existing folder on its path must be writable."""
    output_dir = namespace.get("OUTPUT_DIR")
    if not isinstance(output_dir, str) or not output_dir:
        return
    path = Path(output_dir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--output_dir={output_dir} cannot be made: {existing} is a file")
    try:  # a real write: permissions, a read-only file system and a full disk all show here (root included)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"--output_dir={output_dir} is not writable ({err.strerror or err} in {existing})") from None


def apply_overrides(namespace: dict, argv: list[str]) -> dict:
    """Apply `--key=value` arguments to the UPPER_SNAKE constants in `namespace`, check its choice constants,
    numeric ranges and output folder; return the resolved config. A bare `--flag` of a True/False constant means
    `--flag=True`."""
    keys = config_keys(namespace)
    explicit: set[str] = set()
    for arg in argv:
        flag = arg[2:].replace("-", "_").upper()
        if arg.startswith("--") and "=" not in arg and isinstance(namespace.get(flag), bool) and flag in keys:
            arg += "=True"
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"arguments look like --key=value, got '{arg}'")
        name, text = arg[2:].split("=", 1)
        key = name.replace("-", "_").upper()
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean --{close[0].lower()}?)" if close else ""
            raise ConfigError(f"unknown option --{name}{hint}")
        namespace[key] = _check_type(key, namespace[key], _parse_value(text))
        explicit.add(key)
    apply_preset(namespace, explicit)
    check_choices(namespace)
    check_ranges(namespace)
    check_output_dir(namespace)
    return {k: namespace[k] for k in config_keys(namespace)}


def to_jsonable(config: dict) -> dict:
    """The config with tuples as lists and paths as strings, so it round-trips through JSON."""
    return json.loads(json.dumps(config, default=lambda o: str(o) if isinstance(o, Path) else repr(o)))


def parse_actors(spec: str | int | list | tuple) -> list[int]:
    """'1-20' / '1-4,9,21-24' / [21, 22] / 5 -> a sorted list of actor numbers."""
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, (list, tuple)):
        return sorted(int(a) for a in spec)
    actors: set[int] = set()
    for part in str(spec).replace(" ", "").split(","):
        try:
            low, _, high = part.partition("-")
            actors.update(range(int(low), int(high or low) + 1))
        except ValueError:
            raise ConfigError(f"actor list '{spec}' should look like '1-20' or '1-4,9,21-24'") from None
    return sorted(actors)


# How long a torchrun process other than rank 0 waits for rank 0 to say the same mistake and for the job to stop.
RANK_0_REPORT_SECONDS = 30


def report_user_error(err: Exception) -> None:
    """Print `error: ...` once per job. Under torchrun every process usually meets the same mistake (often before the
    process group exists) and rank 0 says it. The others wait: a rank that exited first would have torchrun kill rank 0
    before it spoke; rank 0 exiting gets them stopped. A mistake that rank 0 did not meet is said after the wait."""
    if int(os.environ.get("RANK", 0)) != 0:
        time.sleep(RANK_0_REPORT_SECONDS)
    print(f"error: {err}", file=sys.stderr)


def run_script(main: Callable[..., object], namespace: dict, argv: list[str],
               user_errors: tuple[type[Exception], ...] = (), takes_paths: bool = False) -> None:
    """Apply `--key=value` overrides to a script's constants, then run `main`; a user mistake (a `ConfigError` or
    one of `user_errors`) ends with one `error: ...` line and exit status 2 instead of a traceback. `--help` or `-h`
    prints the docstring and the constants instead. With `takes_paths`, the arguments that are not options are
    passed to `main(paths)`. An int that `main` returns is the exit status."""
    if "--help" in argv or "-h" in argv:
        try:
            print(help_text(namespace), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        sys.exit(0)
    try:
        paths = [arg for arg in argv if not arg.startswith("-")] if takes_paths else []
        apply_overrides(namespace, [arg for arg in argv if arg not in paths])
        status = main(paths) if takes_paths else main()
    except (ConfigError, *user_errors) as err:
        report_user_error(err)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (a training script resumes from its last checkpoint when run again with the same RUN_NAME)",
              file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.cleanup()  # under torchrun: leave the process group (nothing to do in one process)
    if isinstance(status, int) and not isinstance(status, bool):
        sys.exit(status)
