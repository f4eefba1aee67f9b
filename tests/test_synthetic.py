"""The synthetic RAVDESS (data/synthetic.py): real file format, and a signal that depends on the emotion."""
import json
import subprocess

import cv2
import numpy as np
import pytest
import soundfile as sf

from data.ravdess import DataError, discover_clips, parse_name
from data.synthetic import make_synthetic_cache, make_synthetic_ravdess, takes_for


def ffprobe_streams(path) -> list[str]:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type,codec_name,sample_rate",
                          "-of", "json", str(path)], capture_output=True, check=True).stdout
    return [f"{s['codec_type']}:{s['codec_name']}:{s.get('sample_rate', '')}" for s in json.loads(out)["streams"]]


def test_files_are_in_the_real_ravdess_format(synthetic_root):
    files = sorted(p for p in synthetic_root.rglob("*") if p.is_file())
    assert len(files) == 4 * 8 * 2 * 3 and {p.parent.name for p in files} == {f"Actor_0{a}" for a in (1, 2, 3, 4)}
    names = [parse_name(p) for p in files]  # every name valid
    assert {n.modality for n in names} == {1, 2, 3} and {n.emotion for n in names} == set(range(1, 9))
    assert {n.intensity for n in names if n.emotion != 1} == {1, 2}  # two takes: a normal and a strong one
    wav = next(p for p in files if p.suffix == ".wav")
    info = sf.info(wav)
    assert (info.samplerate, info.channels, info.subtype) == (48000, 1, "PCM_16")
    av = next(p for p in files if p.name.startswith("01-"))
    video_only = next(p for p in files if p.name.startswith("02-"))
    assert ffprobe_streams(av) == ["video:mpeg4:", "audio:aac:48000"]
    assert ffprobe_streams(video_only) == ["video:mpeg4:"]
    cap = cv2.VideoCapture(str(av))
    assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT), cap.get(cv2.CAP_PROP_FPS),
            cap.get(cv2.CAP_PROP_FRAME_COUNT)) == (160, 120, 15, 30)
    assert len(discover_clips(synthetic_root)) == 64


def test_options_and_h264(tmp_path):
    files = make_synthetic_ravdess(tmp_path, actors=(7,), takes=1, emotions=(3,), width=64, height=48, seconds=0.5,
                                   files=("av",), codec="libx264")
    assert [p.name for p in files] == ["01-01-03-01-01-01-07.mp4"]
    assert ffprobe_streams(files[0]) == ["video:h264:", "audio:aac:48000"]
    with pytest.raises(DataError, match="even"):
        make_synthetic_ravdess(tmp_path, width=63)
    with pytest.raises(DataError, match="files"):
        make_synthetic_ravdess(tmp_path, files=("mp3",))


def test_takes_follow_ravdess_rules():
    takes = takes_for([1], takes=8)
    assert len([t for t in takes if t.emotion == 1]) == 4 and all(t.intensity == 1 for t in takes if t.emotion == 1)
    assert len([t for t in takes if t.emotion == 2]) == 8


def test_the_emotion_can_be_learned_across_actors(tmp_path):
    """A ridge classifier on crude features, trained on actors 1-6 and tested on 7-8, is far above chance (1/8)
    from either modality alone: the signal is in the content, not in a per-actor shortcut."""
    cache = make_synthetic_cache(tmp_path, actors=range(1, 9), takes=2, n_frames=8, size=48)
    clips = json.loads((cache / "manifest.json").read_text())["clips"]
    audio, video = [], []
    for e in clips:
        with np.load(cache / "clips" / f"{e['clip_id']}.npz") as z:
            mel, frames = z["logmel"], z["frames"]
        audio.append(np.concatenate([mel.mean(1), mel.std(1), np.abs(np.diff(mel, axis=1)).mean(1),
                                     (mel * np.linspace(-1, 1, mel.shape[1])).mean(1)]))
        video.append(frames[4:].mean((0, 3))[::2, ::2].ravel())
    labels = np.array([e["label"] for e in clips])
    test = np.array([e["actor"] for e in clips]) >= 7
    for features in (np.array(audio), np.array(video)):
        assert ridge_accuracy(features, labels, ~test, test) > 0.3


def ridge_accuracy(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    x = np.c_[x, np.ones(len(x))]
    w = np.linalg.solve(x[train].T @ x[train] + 10 * np.eye(x.shape[1]), x[train].T @ np.eye(8)[y[train]])
    return float(((x[test] @ w).argmax(1) == y[test]).mean())
