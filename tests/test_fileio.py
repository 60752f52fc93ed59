"""The one atomic-write helper (r1tune.fileio): whole files and whole folders, or nothing."""

import os
import stat

import pytest

from r1tune.fileio import atomic_folder, atomic_path, write_text_atomic


class Boom(Exception):
    pass


def test_folder_replaces_an_existing_folder_whole(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "stale.bin").write_text("old")
    (final / "keep.txt").write_text("old")
    with atomic_folder(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".tmp-")
        (tmp / "keep.txt").write_text("new")
        assert (final / "keep.txt").read_text() == "old"  # untouched until the commit
    assert sorted(p.name for p in final.iterdir()) == ["keep.txt"]  # no file of the old folder survives
    assert (final / "keep.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # neither temp nor moved-aside folder left
    assert stat.S_IMODE(final.stat().st_mode) == 0o755


def test_folder_error_leaves_no_temp_and_keeps_the_old_folder(tmp_path):
    final = tmp_path / "nested" / "out"
    final.mkdir(parents=True)
    (final / "a.txt").write_text("old")
    with pytest.raises(Boom):
        with atomic_folder(final) as tmp:
            (tmp / "a.txt").write_text("half")
            raise Boom
    assert sorted(p.name for p in final.parent.iterdir()) == ["out"]
    assert (final / "a.txt").read_text() == "old"

    fresh = tmp_path / "fresh"
    with pytest.raises(Boom):
        with atomic_folder(fresh) as tmp:
            (tmp / "a.txt").write_text("half")
            raise Boom
    assert not fresh.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_file_error_never_leaves_a_half_written_file(tmp_path):
    path = tmp_path / "report.json"
    write_text_atomic(path, "complete")
    with pytest.raises(Boom):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise Boom
    assert path.read_text() == "complete"
    assert os.listdir(tmp_path) == ["report.json"]

    missing = tmp_path / "sub" / "new.txt"  # parent folders are created
    with pytest.raises(Boom):
        with atomic_path(missing) as tmp:
            tmp.write_text("half")
            raise Boom
    assert not missing.exists() and os.listdir(missing.parent) == []
    assert write_text_atomic(missing, "done") == missing and missing.read_text() == "done"
