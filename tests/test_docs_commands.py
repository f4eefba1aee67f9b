"""Every `python <script>.py --flag ...` command in the README and docs/ names flags its script has: a renamed
or removed constant breaks a documented command, and this test says which."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from common.config import config_keys
from tests.shared_paths import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:python|torchrun)\s[^`\n]*?(?P<script>[\w/]+\.py)(?P<args>[^`\n|]*)")
# Flags that are not a script's constants: the help flags, the placeholders the prose explains, the mistake the
# docs show on purpose, and torchrun's own options.
NOT_CONSTANTS = {"help", "h", "flag", "key", "batchsize", "nproc_per_node", "nnodes", "node_rank", "master_addr",
                 "master_port", "rdzv_backend", "rdzv_endpoint", "standalone"}


def joined_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) with a command continued over lines (trailing backslash) joined into its first line."""
    joined: list[tuple[int, str]] = []
    continued = False
    for number, line in enumerate(text.splitlines(), 1):
        if continued:
            joined[-1] = (joined[-1][0], joined[-1][1] + " " + line.strip())
        else:
            joined.append((number, line))
        continued = line.endswith("\\")
        if continued:
            joined[-1] = (joined[-1][0], joined[-1][1].removesuffix("\\"))
    return joined


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, flags) of every command in the docs that runs a script of this repository."""
    found = []
    for doc in DOCS:
        for number, line in joined_lines(doc.read_text()):
            for match in COMMAND.finditer(line):
                script = match["script"]
                if not (REPO / script).is_file():
                    continue
                flags = re.findall(r"(?<![\w=,-])--([A-Za-z][\w-]*)", match["args"])  # not inside a value
                found.append((f"{doc.name}:{number}", script, flags))
    return found


def test_the_docs_name_commands():
    scripts = {script for _, script, _ in documented_commands()}
    assert {"train_simple_working.py", "train_lite_model.py", "predict.py", "tune.py"} <= scripts


@pytest.mark.parametrize("where, script, flags", documented_commands())
def test_every_documented_flag_is_a_constant_of_its_script(where, script, flags):
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    keys = {key.lower() for key in config_keys(vars(module))}
    unknown = [f for f in flags if f.replace("-", "_").lower() not in keys and f not in NOT_CONSTANTS]
    assert not unknown, f"{where}: {script} has no constant for --{', --'.join(unknown)}"
