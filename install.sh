#!/usr/bin/env bash
# One-command install: ffmpeg (if missing, via apt-get), a virtual environment and the Python requirements.
#   bash install.sh                 # venv in ./.venv
#   FER_VENV=~/venvs/fer bash install.sh
# On Colab, keep the preinstalled torch instead:  !pip install -r requirements-colab.txt
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v ffmpeg >/dev/null 2>&1; then
    # ffmpeg reads the sound track of mp4 files and muxes the synthetic quick-start videos.
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
    else
        echo "error: ffmpeg is missing; install it (e.g. sudo apt-get install ffmpeg) and run again" >&2
        exit 1
    fi
fi

VENV="${FER_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -r requirements.txt
echo "installed into $VENV; activate with: source $VENV/bin/activate"
