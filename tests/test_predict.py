"""predict.py and data/windows.py: any file name, the training preprocessing, sliding windows, unreadable files,
missing modalities, all three model kinds, JSON/CSV output and the command line."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import predict
from data.dataset import RavdessDataset
from data.preprocess import Settings, prepare_cache
from data.ravdess import EMOTIONS
from data.synthetic import Take, make_synthetic_ravdess, render_audio
from data.windows import read_windows, to_batch, window_starts
from models import build_model
from training.checkpoint import make_state, save_checkpoint
from common.config import ConfigError
from tests.shared_paths import REPO

SMALL_CONFIGS = {
    "simple": {"channels": [4, 8, 8]},
    "lite": {"width": 32, "audio_channels": [4, 8, 8, 16], "audio_tokens": 3, "visual_tokens": 2,
             "fusion_layers": 1, "n_heads": 2, "mlp_ratio": 2, "frame_backbone": "tiny"},
    "full": {"width": 32, "n_segments": 4, "audio_channels": [4, 8, 8, 16], "frame_backbone": "tiny",
             "layout": ["conv", "attn"], "n_heads": 4, "n_kv_heads": 2, "mlp_hidden": 64},
}


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Short RAVDESS-format clips renamed to arbitrary names, a video without sound, a sound-only mp4, a 10 s wav,
    an 8 s video, and two unreadable files."""
    root = tmp_path_factory.mktemp("predict_media")
    ravdess = root / "ravdess"
    files = make_synthetic_ravdess(ravdess, actors=(1,), takes=1, emotions=(3, 5), files=("av", "video", "audio"))
    by_name = {p.name: p for p in files}
    out = {"ravdess": ravdess,
           "happy_mp4": shutil.copy(by_name["01-01-03-01-01-01-01.mp4"], root / "my happy clip.mp4"),
           "angry_mp4": shutil.copy(by_name["01-01-05-01-01-01-01.mp4"], root / "angry.MP4"),
           "mute_mp4": shutil.copy(by_name["02-01-05-01-01-01-01.mp4"], root / "no sound.mp4"),
           "wav": shutil.copy(by_name["03-01-03-01-01-01-01.wav"], root / "speech.wav")}
    out["audio_mp4"] = root / "voice memo.mp4"  # an mp4 with a sound track and no video stream
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(out["wav"]), "-c:a", "aac", str(out["audio_mp4"])],
                   check=True)
    long_video = make_synthetic_ravdess(root / "long", actors=(2,), takes=1, emotions=(5,), seconds=8.0,
                                        files=("av",))[0]
    out["long_mp4"] = long_video
    out["long_wav"] = root / "ten seconds.wav"
    sf.write(out["long_wav"], render_audio(Take(1, 4, 1, 1, 1), 10.0, 22050), 22050)
    out["broken_mp4"] = root / "broken.mp4"
    out["broken_mp4"].write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    out["empty_wav"] = root / "empty.wav"
    out["empty_wav"].write_bytes(b"")
    return {k: Path(v) for k, v in out.items()}


def save_model(path: Path, name: str, run_config: dict | None = None, **overrides) -> Path:
    torch.manual_seed(0)
    model = build_model(name, {**SMALL_CONFIGS[name], **overrides})
    save_checkpoint(path, make_state(model, name, run_config=run_config or {}))
    return path


@pytest.fixture(scope="module")
def trained_simple(media: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SimpleCNN trained for a few steps on the preprocessed synthetic clips (so BatchNorm statistics and
    weights are those of a trained model, not of the initialisation)."""
    torch.manual_seed(0)
    model = build_model("simple", SMALL_CONFIGS["simple"])
    model.init_weights("kaiming")
    clips = [read_windows(media[k], Settings(), audio=True, frames=True, hop=1.0) for k in ("happy_mp4", "angry_mp4")]
    parts = [to_batch(w, Settings()) for w in clips]
    batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    labels = torch.tensor([2, 4])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(8):
        optimizer.zero_grad()
        F.cross_entropy(model(batch), labels).backward()
        optimizer.step()
    # Eight steps leave BatchNorm's running statistics far from the final weights' (momentum 0.1): recompute them
    # in one pass, so that eval mode sees what training saw.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model(batch)
    path = tmp_path_factory.mktemp("ckpt") / "simple.pt"
    save_checkpoint(path, make_state(model, "simple", optimizer, run_config={"DATASET": "ravdess",
                                                                             "DATA_ROOT": "/nowhere"}))
    return path


def run_main(monkeypatch: pytest.MonkeyPatch, paths: list[Path | str], **constants) -> tuple[int, list[dict]]:
    """predict.main with constants set as --key=value would; returns the exit status and the JSON records."""
    output = constants.pop("output")
    for key, value in {"OUTPUT": str(output), **{k.upper(): v for k, v in constants.items()}}.items():
        monkeypatch.setattr(predict, key, value)
    status = predict.main([str(p) for p in paths])
    return status, json.loads(Path(output).read_text())["predictions"]


# ------------------------------------------------------------------------------------------------ windows

def test_window_starts():
    assert window_starts(3.0, 3.6, 1.0, 16) == [None]  # shorter than a window: centred, as in training
    assert window_starts(3.6, 3.6, 1.0, 16) == [None]
    starts = window_starts(10.0, 3.6, 2.0, 16)
    assert len(starts) == 5 and starts[0] == 0.0 and starts[-1] == pytest.approx(6.4)  # last ends at the end
    assert np.diff(starts).max() <= 2.0
    thinned = window_starts(600.0, 3.6, 1.0, 8)
    assert len(thinned) == 8 and thinned[-1] == pytest.approx(596.4)
    # A file a little longer than a window (a 3.64 s or 4 s RAVDESS clip) is one centred window, as in the cache.
    assert window_starts(3.64, 3.6, 1.0, 16) == [None] and window_starts(4.0, 3.6, 1.0, 16) == [None]
    assert window_starts(4.2, 3.6, 1.0, 16) == [0.0, pytest.approx(0.6)]


def test_window_note_says_how_far_apart(media, trained_simple, tmp_path, monkeypatch):
    status, records = run_main(monkeypatch, [media["long_wav"]], checkpoint=str(trained_simple),
                               window_hop_seconds=2.0, output=tmp_path / "p.json")
    assert "5 windows of 3.6 s, 1.60 s apart, over 10.00 s" in records[0]["notes"]


def test_run_folder_is_a_checkpoint_and_the_default_is_the_quick_start_run(media, trained_simple, tmp_path,
                                                                          monkeypatch):
    import train_simple_working

    quick_start = Path(train_simple_working.OUTPUT_DIR) / "train_simple_working" / train_simple_working.RUN_NAME
    assert Path(predict.CHECKPOINT) == quick_start
    fold = tmp_path / "run" / "fold0"
    fold.mkdir(parents=True)
    shutil.copy(trained_simple, fold / "ckpt_best.pt")
    (tmp_path / "run" / "figures").mkdir()
    status, records = run_main(monkeypatch, [media["wav"]], checkpoint=str(tmp_path / "run"),
                               output=tmp_path / "p.json")
    assert status == 0 and records[0]["emotion"] in EMOTIONS
    assert json.loads((tmp_path / "p.json").read_text())["checkpoint"] == str(fold / "ckpt_best.pt")


def test_long_wav_is_split_into_windows_and_averaged(media, trained_simple, tmp_path, monkeypatch):
    status, records = run_main(monkeypatch, [media["long_wav"]], checkpoint=str(trained_simple),
                               window_hop_seconds=2.0, output=tmp_path / "p.json")
    assert status == 0 and records[0]["windows"] == 5 and records[0]["inputs"] == "audio"
    # The file's probabilities are the mean of the windows' softmax.
    predictor = predict.load_predictor(trained_simple, "cpu")
    windows = read_windows(media["long_wav"], predictor.settings, audio=True, frames=True, hop=2.0)
    with torch.no_grad():
        per_window = predictor.model(to_batch(windows, predictor.settings)).softmax(-1)
    assert per_window.shape[0] == 5 and not torch.allclose(per_window[0], per_window[-1])
    expected = per_window.mean(0).numpy()
    assert np.allclose([records[0]["probabilities"][e] for e in EMOTIONS], expected, atol=1e-6)


def test_long_video_windows_align_frames_and_sound(media):
    windows = read_windows(media["long_mp4"], Settings(), audio=True, frames=True, hop=1.5)
    assert windows.duration == pytest.approx(8.0, abs=0.1)
    assert windows.n_windows == 4 == len(windows.logmel) == len(windows.frames)
    assert windows.frames.shape[1:] == (16, 112, 112, 3) and windows.logmel.shape[1:] == (64, 361)
    assert windows.faces_found == 4
    # The face builds up its expression over the clip: the first and last windows see different faces.
    assert np.abs(windows.frames[0].astype(int) - windows.frames[-1].astype(int)).mean() > 1


def test_short_file_gets_exactly_the_training_preprocessing(tmp_path):
    """A clip no longer than the window is one window equal to what prepare_cache stores for it."""
    root = tmp_path / "data"
    mp4 = make_synthetic_ravdess(root, actors=(3,), takes=1, emotions=(6,), files=("av",))[0]
    prepare_cache(root, tmp_path / "cache", workers=0, progress=False, log=lambda _: None)
    with np.load(tmp_path / "cache" / "clips" / f"{mp4.stem[3:]}.npz") as cached:
        logmel, frames = cached["logmel"], cached["frames"]
    windows = read_windows(mp4, Settings(), audio=True, frames=True, hop=1.0)
    assert windows.starts == [None]
    assert np.array_equal(windows.frames[0], frames) and np.allclose(windows.logmel[0], logmel)
    sample = RavdessDataset(tmp_path / "cache")[0]
    batch = to_batch(windows, Settings())
    assert torch.allclose(batch["frames"][0], sample["frames"]) and torch.allclose(batch["audio"][0], sample["audio"])


# ---------------------------------------------------------------------------------------------- prediction

def test_mp4_and_wav_with_any_name_and_missing_modalities(media, trained_simple, tmp_path, monkeypatch):
    paths = [media["happy_mp4"], media["angry_mp4"], media["mute_mp4"], media["wav"], media["audio_mp4"]]
    status, records = run_main(monkeypatch, paths, checkpoint=str(trained_simple), output=tmp_path / "p.json")
    assert status == 0
    rows = {Path(r["file"]).name: r for r in records}
    assert [rows[p.name]["inputs"] for p in paths] == ["audio+video", "audio+video", "video", "audio", "audio"]
    assert all(r["error"] is None and r["windows"] == 1 for r in records)
    for r in records:
        probabilities = [r["probabilities"][e] for e in EMOTIONS]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert r["emotion"] == r["top"][0]["emotion"] and r["probability"] == max(probabilities)
        assert len(r["top"]) == 3 and r["top"][0]["probability"] >= r["top"][1]["probability"]
    assert "no sound" in " ".join(rows["no sound.mp4"]["notes"])
    assert "no video frames" in " ".join(rows["voice memo.mp4"]["notes"])
    assert rows["voice memo.mp4"]["probabilities"] == pytest.approx(rows["speech.wav"]["probabilities"], abs=0.05)
    # The model was trained on these two clips: it tells them apart.
    assert rows["my happy clip.mp4"]["emotion"] == "happy" and rows["angry.MP4"]["emotion"] == "angry"


def test_folder_and_unreadable_files_are_reported_and_the_rest_predicted(media, trained_simple, tmp_path,
                                                                          monkeypatch):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for key in ("wav", "broken_mp4", "empty_wav", "happy_mp4"):
        shutil.copy(media[key], folder / media[key].name)
    (folder / "notes.txt").write_text("not media")  # skipped, not an error
    status, records = run_main(monkeypatch, [folder, tmp_path / "missing.wav"], checkpoint=str(trained_simple),
                               output=tmp_path / "p.json")
    assert status == 0
    rows = {Path(r["file"]).name: r for r in records}
    assert set(rows) == {"speech.wav", "broken.mp4", "empty.wav", "my happy clip.mp4", "missing.wav"}
    assert "cannot open video" in rows["broken.mp4"]["error"] and "cannot read" in rows["empty.wav"]["error"]
    assert rows["missing.wav"]["error"] == "no such file or folder"
    assert rows["speech.wav"]["error"] is None and rows["my happy clip.mp4"]["error"] is None
    status, records = run_main(monkeypatch, [media["broken_mp4"]], checkpoint=str(trained_simple),
                               output=tmp_path / "q.json")
    assert status == 1 and records[0]["error"]


@pytest.mark.parametrize("name", ["simple", "lite", "full"])
def test_each_model_kind(name, media, tmp_path, monkeypatch):
    checkpoint = save_model(tmp_path / f"{name}.pt", name)
    status, records = run_main(monkeypatch, [media["angry_mp4"], media["long_wav"]], checkpoint=str(checkpoint),
                               output=tmp_path / "p.json")
    assert status == 0 and [r["inputs"] for r in records] == ["audio+video", "audio"]
    assert records[1]["windows"] > 1
    for r in records:
        assert np.isfinite(list(r["probabilities"].values())).all()


def test_single_modality_models(media, tmp_path, monkeypatch):
    audio_only = save_model(tmp_path / "audio.pt", "lite", modalities=["audio"], fusion="concat")
    status, records = run_main(monkeypatch, [media["angry_mp4"], media["mute_mp4"]], checkpoint=str(audio_only),
                               output=tmp_path / "a.json")
    assert status == 0 and records[0]["inputs"] == "audio"  # the frames are not even decoded
    assert "no sound track" in records[1]["error"]
    video_only = save_model(tmp_path / "video.pt", "simple", modalities=["visual"])
    status, records = run_main(monkeypatch, [media["mute_mp4"], media["wav"]], checkpoint=str(video_only),
                               output=tmp_path / "v.json")
    assert status == 0 and records[0]["inputs"] == "video"
    assert "no video frames" in records[1]["error"]


def test_feature_models_use_audio_only_or_refuse(media, tmp_path, monkeypatch):
    both = save_model(tmp_path / "features.pt", "simple", visual_input="features", feature_dim=35)
    status, records = run_main(monkeypatch, [media["happy_mp4"]], checkpoint=str(both), output=tmp_path / "f.json")
    assert status == 0 and records[0]["inputs"] == "audio"
    assert "per-clip features" in " ".join(records[0]["notes"])
    visual_only = save_model(tmp_path / "au.pt", "simple", visual_input="features", modalities=["visual"])
    with pytest.raises(ConfigError, match="per-clip visual features"):
        predict.load_predictor(visual_only, "cpu")


def test_preprocessing_settings_come_with_the_checkpoint(media, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"settings": {**Settings(n_frames=8, size=64).to_json(),
                                                                  "future_field": 1}}))
    from_manifest = save_model(tmp_path / "a.pt", "simple", run_config={"DATASET": "ravdess",
                                                                        "CACHE_DIR": str(cache)})
    predictor = predict.load_predictor(from_manifest, "cpu")
    assert (predictor.settings.n_frames, predictor.settings.size) == (8, 64)
    assert "manifest" in predictor.settings_source
    batch = to_batch(read_windows(media["happy_mp4"], predictor.settings, audio=True, frames=True, hop=1.0),
                     predictor.settings)
    assert batch["frames"].shape == (1, 8, 3, 64, 64)
    # The run's cache is not on this machine: its frames per clip and crop size still come from the run config.
    run = {"DATASET": "ravdess", "DATA_ROOT": "/elsewhere/RAVDESS", "N_FRAMES": 4, "FRAME_SIZE": 48,
           "OUTPUT_DIR": str(tmp_path / "absent"), "MODALITIES": ("audio", "visual")}
    predictor = predict.load_predictor(save_model(tmp_path / "b.pt", "simple", run_config=run), "cpu")
    assert (predictor.settings.n_frames, predictor.settings.size) == (4, 48)
    assert predictor.settings.modalities == ("audio", "video") and "run config" in predictor.settings_source
    predictor = predict.load_predictor(save_model(tmp_path / "c.pt", "simple"), "cpu")
    assert predictor.settings == Settings() and "defaults" in predictor.settings_source


def test_csv_output_parses_back(media, trained_simple, tmp_path, monkeypatch):
    for key, value in {"CHECKPOINT": str(trained_simple), "OUTPUT": str(tmp_path / "p.csv")}.items():
        monkeypatch.setattr(predict, key, value)
    assert predict.main([str(media["wav"]), str(media["broken_mp4"])]) == 0
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["file"]).name for r in rows] == ["speech.wav", "broken.mp4"]
    good, bad = rows
    assert good["emotion"] in EMOTIONS and float(good["probability"]) == max(float(good[f"p_{e}"]) for e in EMOTIONS)
    assert sum(float(good[f"p_{e}"]) for e in EMOTIONS) == pytest.approx(1.0, abs=1e-5)
    assert good["top"].startswith(good["emotion"]) and bad["error"] and bad["emotion"] == ""


def test_webcam_loop_on_a_video_stream(media, trained_simple, monkeypatch, capsys):
    for key, value in {"CHECKPOINT": str(trained_simple), "WEBCAM": True, "CAMERA": str(media["long_mp4"]),
                       "WEBCAM_EVERY_SECONDS": 1.0}.items():
        monkeypatch.setattr(predict, key, value)
    assert predict.main([]) == 0
    lines = capsys.readouterr().out.split("\r")[1:]  # one running prediction per \r
    # 120 frames at 15 fps: the first prediction once 3.6 s (54 frames) are in, then one every 15 frames.
    assert len(lines) == 5 and all(line.split()[0] in EMOTIONS for line in lines)
    assert "no more frames" in lines[-1]


def test_webcam_with_an_audio_only_model_says_what_it_sees(tmp_path, monkeypatch):
    audio_only = save_model(tmp_path / "audio.pt", "lite", modalities=["audio"], fusion="concat")
    for key, value in {"CHECKPOINT": str(audio_only), "WEBCAM": True}.items():
        monkeypatch.setattr(predict, key, value)
    with pytest.raises(ConfigError, match=r"needs a model that sees face frames \(no sound is recorded\); "
                                          r"this one sees audio$"):
        predict.main([])


def test_no_camera_is_one_clear_error(trained_simple, monkeypatch):
    for key, value in {"CHECKPOINT": str(trained_simple), "WEBCAM": True, "CAMERA": 97}.items():
        monkeypatch.setattr(predict, key, value)
    with pytest.raises(ConfigError, match="no camera found at index 97"):
        predict.main([])


# ------------------------------------------------------------------------------------------- command line

def test_command_line(media, trained_simple, tmp_path):
    out = tmp_path / "p.csv"
    done = subprocess.run([sys.executable, "predict.py", str(media["wav"]), str(media["broken_mp4"]),
                           f"--checkpoint={trained_simple}", f"--output={out}", "--top-k=2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "speech.wav" in done.stdout and "cannot open video broken.mp4" in done.stdout
    assert "1 of 2 predicted" in done.stdout and out.exists()
    wrong = subprocess.run([sys.executable, "predict.py", str(media["wav"]), "--checkpoint=x.pt", "--windw_hop=2"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines() == ["error: unknown option --windw_hop (did you mean --window_hop_seconds?)"]


def test_a_model_of_the_synthetic_quick_start_says_so_once(media, tmp_path):
    checkpoint = save_model(tmp_path / "quick.pt", "simple", run_config={"DATASET": "synthetic"})
    done = subprocess.run([sys.executable, "predict.py", str(media["wav"]), str(media["happy_mp4"]),
                           f"--checkpoint={checkpoint}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("trained on the synthetic quick-start set") == 1
    real = save_model(tmp_path / "real.pt", "simple", run_config={"DATASET": "ravdess"})
    done = subprocess.run([sys.executable, "predict.py", str(media["wav"]), f"--checkpoint={real}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "quick-start set" not in done.stdout


def test_ensemble_and_time_shifts_average_probabilities(media, tmp_path, monkeypatch):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model("simple", {**SMALL_CONFIGS["simple"], "modalities": ["audio"]})
        model.init_weights("kaiming")
        paths.append(tmp_path / f"seed{seed}.pt")
        save_checkpoint(paths[-1], make_state(model, "simple", run_config={"TIME_SHIFT_SECONDS": 0.3}))
    single = [run_main(monkeypatch, [media["wav"]], checkpoint=str(p), output=tmp_path / f"{p.stem}.json")[1][0]
              for p in paths]
    _, ensemble = run_main(monkeypatch, [media["wav"]], checkpoint=f"{paths[0]},{paths[1]}",
                           output=tmp_path / "ensemble.json")
    expected = (np.array(list(single[0]["probabilities"].values())) +
                np.array(list(single[1]["probabilities"].values()))) / 2
    np.testing.assert_allclose(list(ensemble[0]["probabilities"].values()), expected, atol=1e-5)

    predictor = predict.load_predictor(paths[0], "cpu", time_shifts=2)
    assert predictor.shift_steps == [-30, -15, 0, 15, 30]  # 0.3 s of 10 ms frames, in 2 steps each way
    windows = read_windows(media["wav"], predictor.settings, audio=True, frames=False, hop=1.0)
    batch = to_batch(windows, predictor.settings, "frames")
    with torch.no_grad():
        by_hand = np.mean([predictor.model({**batch, "audio": torch.roll(batch["audio"], s, -1)}).softmax(-1)
                           .mean(0).numpy() for s in predictor.shift_steps], axis=0)
    np.testing.assert_allclose(predictor.probabilities(windows), by_hand, atol=1e-5)
