"""File names, discovery and actor-disjoint splits (data/ravdess.py)."""
from pathlib import Path

import pytest

from data.ravdess import (DataError, RavdessWarning, Split, check_actor_disjoint, discover_clips, kfold_split,
                          parse_name, scan, split_actors)


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_parse_name_reads_all_seven_fields():
    name = parse_name("some/dir/01-01-05-02-01-02-12.MP4")
    assert (name.modality, name.vocal_channel, name.emotion, name.intensity, name.statement, name.repetition,
            name.actor) == (1, 1, 5, 2, 1, 2, 12)
    assert name.take == "01-05-02-01-02-12"
    assert parse_name("03-01-05-02-01-02-12.flac").take == name.take


@pytest.mark.parametrize("file, field", [
    ("04-01-05-02-01-02-12.mp4", "modality"),
    ("01-03-05-02-01-02-12.mp4", "vocal_channel"),
    ("01-01-09-02-01-02-12.mp4", "emotion"),
    ("01-01-05-03-01-02-12.mp4", "intensity"),
    ("01-01-05-02-00-02-12.mp4", "statement"),
    ("01-01-05-02-01-3-12.mp4", "repetition"),
    ("01-01-05-02-01-02-25.mp4", "actor"),
    ("01-01-05-02-01-02-ab.mp4", "actor"),
    ("01-01-01-02-01-02-12.mp4", "intensity"),   # neutral has no strong intensity
    ("01-02-08-01-01-02-12.mp4", "emotion"),     # song has no surprised
    ("03-01-05-02-01-02-12.mp4", "modality"),    # audio-only modality in an mp4
    ("01-01-05-02-01-02-12.wav", "modality"),
])
def test_parse_name_names_file_and_field(file, field):
    with pytest.raises(ValueError, match=rf"{file}.*field {field}"):
        parse_name(file)


def test_parse_name_rejects_wrong_field_count():
    with pytest.raises(DataError, match="01-01-05.wav.*7"):
        parse_name("01-01-05.wav")


def test_discovery_groups_the_files_of_a_take_into_one_clip(tmp_path):
    touch(tmp_path, "video/Actor_01/01-01-03-01-01-01-01.mp4", "video/Actor_01/02-01-03-01-01-01-01.mp4",
          "Audio_Speech/Actor_01/03-01-03-01-01-01-01.WAV", "Actor_02/03-01-04-02-02-01-02.flac",
          "elsewhere/02-01-04-02-02-01-02.mp4", "notes.txt", "Actor_01/song/03-02-03-01-01-01-01.wav")
    clips = discover_clips(tmp_path)
    assert [c.clip_id for c in clips] == ["01-03-01-01-01-01", "01-04-02-02-01-02"]
    first, second = clips
    assert first.av_file.name.startswith("01-") and first.video_file.name.startswith("02-")
    assert first.audio_source == first.audio_file and first.audio_file.suffix == ".WAV"
    assert (first.label, first.actor) == (2, 1)
    assert second.audio_source.suffix == ".flac" and second.video_source.name.startswith("02-")
    assert second.av_file is None


def test_sound_comes_from_the_mp4_when_there_is_no_wav(tmp_path):
    touch(tmp_path, "01-01-03-01-01-01-01.mp4")
    (clip,) = discover_clips(tmp_path)
    assert clip.audio_source == clip.av_file == clip.video_source


def test_channel_selection(tmp_path):
    touch(tmp_path, "03-01-03-01-01-01-01.wav", "03-02-03-01-01-01-01.wav", "03-02-04-01-01-01-01.wav")
    assert [c.vocal_channel for c in discover_clips(tmp_path, "song")] == [2, 2]
    assert len(discover_clips(tmp_path, "all")) == 3
    with pytest.raises(DataError, match="channel"):
        discover_clips(tmp_path, "chant")


def test_malformed_names_are_skipped_with_a_warning_listing_them(tmp_path):
    touch(tmp_path, "03-01-03-01-01-01-01.wav", "03-01-09-01-01-01-01.wav", "copy of 03-01.wav", "._03-01-03.wav",
          "__MACOSX/03-01-03-01-01-01-01.wav")
    with pytest.warns(RavdessWarning, match=r"skipped 2 file.*03-01-09-01-01-01-01.wav: field emotion.*copy of"):
        clips = discover_clips(tmp_path)
    assert len(clips) == 1


def test_duplicate_files_of_a_take_are_skipped(tmp_path):
    touch(tmp_path, "a/03-01-03-01-01-01-01.wav", "b/03-01-03-01-01-01-01.flac")
    found = scan(tmp_path)
    assert len(found.clips) == 1 and found.clips[0].audio_file.parent.name == "a"
    assert "duplicate" in found.skipped[0][1]


def test_missing_root_and_root_without_ravdess_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover_clips(tmp_path / "nope")
    touch(tmp_path, "readme.txt", "video.mp4")
    with pytest.raises(DataError, match=r"no RAVDESS files .* e\.g\. video\.mp4"):
        discover_clips(tmp_path)


def test_a_file_as_root_is_named_a_file(tmp_path):
    touch(tmp_path, "03-01-03-01-01-01-01.wav")
    with pytest.raises(DataError, match="is a file: give the folder"):
        discover_clips(tmp_path / "03-01-03-01-01-01-01.wav")


def test_linked_actor_folders_are_followed_and_a_link_cycle_ends(tmp_path):
    storage, root = tmp_path / "drive", tmp_path / "RAVDESS"
    touch(storage, "Actor_01/03-01-03-01-01-01-01.wav", "Actor_02/03-01-05-01-01-01-02.wav")
    root.mkdir()
    for actor in ("Actor_01", "Actor_02"):
        (root / actor).symlink_to(storage / actor, target_is_directory=True)
    (storage / "Actor_01" / "loop").symlink_to(root, target_is_directory=True)  # RAVDESS/Actor_01/loop -> RAVDESS
    clips = discover_clips(root)
    assert [c.actor for c in clips] == [1, 2]


def test_kfold_default_is_six_folds_of_four_consecutive_actors():
    folds = [kfold_split(fold=k) for k in range(6)]
    assert [f.test for f in folds] == [tuple(range(4 * k + 1, 4 * k + 5)) for k in range(6)]
    assert folds[0].val == (5, 6) and folds[5].val == (1, 2)  # from the next fold, wrapping round
    for split in folds:
        assert sorted(split.train + split.val + split.test) == list(range(1, 25))


def test_kfold_five_folds_over_actors_1_to_20_are_disjoint_and_cover_all():
    folds = [kfold_split(range(1, 21), n_folds=5, fold=k, n_val_actors=4) for k in range(5)]
    assert [f.test for f in folds] == [tuple(range(4 * k + 1, 4 * k + 5)) for k in range(5)]
    assert sorted(a for f in folds for a in f.test) == list(range(1, 21))
    for f in folds:
        assert not set(f.train) & set(f.test) and not set(f.val) & set(f.test) and not set(f.train) & set(f.val)
        assert len(f.train) == 12


def test_kfold_rejects_bad_arguments():
    with pytest.raises(DataError, match="fold must be"):
        kfold_split(fold=6)
    with pytest.raises(DataError, match="n_val_actors"):
        kfold_split(n_val_actors=5)
    with pytest.raises(DataError, match="n_folds"):
        kfold_split(range(1, 4), n_folds=5)


def test_split_actors_explicit_lists_and_counts():
    split = split_actors(test_actors=[21, 22, 23, 24], val_actors=[19, 20])
    assert split.test == (21, 22, 23, 24) and split.val == (19, 20) and split.train == tuple(range(1, 19))
    split = split_actors(test_actors=4, val_actors=2, actors=range(1, 21))
    assert split.test == (17, 18, 19, 20) and split.val == (15, 16)
    with pytest.raises(DataError, match="actor 21 is in both"):
        split_actors(test_actors=[21, 22], val_actors=[21])
    with pytest.raises(DataError, match=r"\[30\] are not among"):
        split_actors(test_actors=[30])


def test_overlapping_split_is_refused():
    with pytest.raises(DataError, match="actor 3 is in both train and test"):
        Split(train=(1, 2, 3), val=(), test=(3, 4))
    with pytest.raises(DataError, match="actor 7"):
        check_actor_disjoint({"train": [1, 7, 7], "test": [7]})
    check_actor_disjoint({"train": [1, 1, 2], "val": [], "test": [3]})
