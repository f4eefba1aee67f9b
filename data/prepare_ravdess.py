"""Preprocess RAVDESS into a cache (face crops + log-mel per clip) so that training never decodes media again.

Finds every RAVDESS file under ROOT in any folder layout (Zenodo zips extracted anywhere, a Drive folder, the
16 kHz FLAC copy in shared/), groups the 01-/02-/03- files of a take into one clip, and writes CACHE
(docs/internals.md). Rerunning skips finished clips; the closing summary lists failures (input files that cannot be
used), clips without a face or without sound, and the throughput in clips/s. Several processes may run on one cache
at once (they take turns: "waiting for another process ..."); a clip that cannot be written to the cache (disk full,
permissions) ends the run with an error naming it and exit status 2. See data/preprocess.py for what happens to one
clip.

    python data/prepare_ravdess.py --root=~/data/RAVDESS --cache=cache/ravdess
    python data/prepare_ravdess.py --root=../shared/data/ravdess_speech_16k --cache=cache/ravdess16k
    !python data/prepare_ravdess.py --root=/content/drive/MyDrive/RAVDESS --cache=/content/cache/ravdess --workers=2
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a file: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.preprocess import prepare_cache  # noqa: E402
from data.ravdess import DataError  # noqa: E402

# Data
ROOT = ""                        # folder holding the RAVDESS files (searched recursively)
CACHE = "cache/ravdess"          # output folder: manifest.json + clips/<clip_id>.npz
CHANNEL = "speech"               # 'speech', 'song' or 'all'
MODALITIES = ("audio", "video")  # what to extract; a take lacking one gets it marked absent
# Video
N_FRAMES = 16                    # frames sampled evenly over the window
SIZE = 112                       # px, side of the square face crop
# Audio and alignment
SECONDS = 3.6                    # s, window centred on each recording (audio cropped or padded to it)
# Execution
WORKERS = None                   # worker processes; None = one per CPU, 0 = in this process
PROGRESS = True                  # tqdm progress bar


def main() -> None:
    if not ROOT:
        raise DataError("say where the RAVDESS files are: --root=/path/to/RAVDESS")
    summary = prepare_cache(ROOT, CACHE, channel=CHANNEL, modalities=MODALITIES, n_frames=N_FRAMES, size=SIZE,
                            seconds=SECONDS, workers=WORKERS, progress=PROGRESS)
    if summary.n_clips == len(summary.failures):
        raise DataError(f"every clip failed; the first reason: {summary.failures[0][1]}")


if __name__ == "__main__":
    from common.config import run_script

    run_script(main, globals(), sys.argv[1:], user_errors=(DataError,))
