"""Data problems say their real cause: a file given as DATA_ROOT, a cache in which every clip failed."""
from __future__ import annotations

import pytest

from data.preprocess import prepare_cache
from data.ravdess import DataError
from data.setup import DataSettings, make_split, prepare_data


def test_data_root_that_is_a_file_is_named_a_file(tmp_path):
    wav = tmp_path / "03-01-03-01-01-01-01.wav"
    wav.write_bytes(b"")
    with pytest.raises(DataError, match="DATA_ROOT .* is a file: give the folder"):
        prepare_data(DataSettings(dataset="ravdess", data_root=str(wav), output_dir=str(tmp_path)))


def test_a_cache_whose_clips_all_failed_says_so_not_that_the_actor_list_is_empty(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("03-01-03-01-01-01-01.wav", "03-01-05-01-01-01-02.wav"):
        (root / name).write_bytes(b"not a sound file")
    prepare_cache(root, tmp_path / "cache", workers=0, progress=False, log=lambda _: None)
    with pytest.raises(DataError, match=r"holds no usable clip: all 2 clips failed in preprocessing \(e\.g\. "
                                        r"01-03-01-01-01-01: cannot read"):
        make_split(tmp_path / "cache", "auto", n_folds=2, fold=0, n_val_actors=0)
