"""How much of the face crops' colour statistics is the person: the check behind the frame calibration's choice.

Person calibration of face frames (data/calibration.py) standardises each colour channel of a person's face crops
by that person's mean and std. Without RAVDESS video of many clips per actor no accuracy can be measured here, so
this measures what the choice rests on, on the real RAVDESS faces there are: the per-channel mean of the face crop
of each of the 20 actor portraits (one near-neutral frame per actor: skin, lighting, camera) against the same
statistic over the frames of the one real clip (actor 01, 3.3 s: what changes while one person speaks). When the
spread between people is many times the spread within a clip, removing each person's mean removes a nuisance that
dominates the frames' colour statistics, and a few frames of the person estimate it.

    python benchmarks/frame_calibration_check.py     # the real portraits and clip in ../shared/data
"""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.preprocess import Settings, face_crops, read_frames_at  # noqa: E402
from common.config import ConfigError, run_script  # noqa: E402

SAMPLE_DIR = "../shared/data/ravdess_video_sample"  # actor_portraits/Actor_XX.png and the 01-...-01.mp4 clip
FRAME_SIZE = 112  # face crop side, as in training on RAVDESS


def crop_channel_means(frames: list[np.ndarray], settings: Settings) -> np.ndarray:
    """(N, 3) RGB means in [0, 1] of each frame's face crop (one face box for the frames, as in preprocessing)."""
    crops, found = face_crops(frames, settings)
    if not found:
        print("note: no face found, centre crop used")
    return crops.reshape(len(frames), -1, 3).mean(1) / 255.0


def main() -> dict:
    folder = Path(SAMPLE_DIR).expanduser()
    portraits = sorted((folder / "actor_portraits").glob("Actor_*.png"))
    clips = sorted(folder.glob("*.mp4"))
    if not portraits or not clips:
        raise ConfigError(f"{folder} holds no actor_portraits/Actor_*.png or .mp4 clip (see ../shared/README.md)")
    settings = Settings(size=FRAME_SIZE)
    between = np.concatenate([crop_channel_means([cv2.imread(str(p))], settings) for p in portraits])
    frames = read_frames_at(clips[0], lambda n, fps: np.arange(n))
    within = crop_channel_means(frames, settings)
    result = {"actors": len(portraits), "clip_frames": len(frames),
              "between_actors_std": between.std(0), "within_clip_std": within.std(0)}
    print(f"face-crop channel means (R, G, B in [0, 1]): spread between {len(portraits)} actors' portraits "
          f"{np.round(result['between_actors_std'], 4).tolist()}, within the {len(frames)} frames of "
          f"{clips[0].name} {np.round(result['within_clip_std'], 4).tolist()}: ratio "
          f"{np.round(result['between_actors_std'] / result['within_clip_std'], 1).tolist()}")
    return result


if __name__ == "__main__":
    run_script(main, globals(), sys.argv[1:])
