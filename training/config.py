"""Command-line overrides of a script's UPPER_SNAKE constants: `--batch_size=32` or `--batch-size=32`.

Values are parsed as Python literals (`--modalities="('audio',)"`, `--amp=False`); anything that is not a
literal stays a string (`--data_root=/content/drive/RAVDESS`).
"""
from __future__ import annotations

import ast
import difflib
import json
import sys
from pathlib import Path
from typing import Callable


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
    # An int where a float is expected is fine (LR=1e-3 vs --lr=0); a string where a number is expected is a typo.
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
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


def apply_overrides(namespace: dict, argv: list[str]) -> dict:
    """Apply `--key=value` arguments to the UPPER_SNAKE constants in `namespace`; return the resolved config."""
    keys = config_keys(namespace)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"arguments look like --key=value, got '{arg}'")
        name, text = arg[2:].split("=", 1)
        key = name.replace("-", "_").upper()
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean --{close[0].lower()}?)" if close else ""
            raise ConfigError(f"unknown option --{name}{hint}")
        namespace[key] = _check_type(key, namespace[key], _parse_value(text))
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


def run_script(main: Callable[[], object], namespace: dict, argv: list[str],
               user_errors: tuple[type[Exception], ...] = ()) -> None:
    """Apply `--key=value` overrides to a script's constants, then run `main`; a user mistake (a `ConfigError` or
    one of `user_errors`) ends with one `error: ...` line and exit status 2 instead of a traceback."""
    try:
        apply_overrides(namespace, argv)
        main()
    except (ConfigError, *user_errors) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (a training script resumes from its last checkpoint when run again with the same RUN_NAME)",
              file=sys.stderr)
        sys.exit(130)
