import os
import stat

import pytest

from layergen.atomic import atomic_dir, atomic_path, check_writable, write_text_atomic


def test_atomic_file_gets_normal_permissions_and_replaces(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_atomic_failure_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_dir_replaces_whole_folder_only_on_success(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "old.txt").write_text("x")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("y")
            raise RuntimeError
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_unwritable_targets_are_named_in_the_error_not_the_temporary_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    target = tmp_path / "file.txt" / "sub" / "out.png"
    for attempt in (lambda: atomic_path(target).__enter__(), lambda: atomic_dir(target).__enter__(),
                    lambda: check_writable(target)):
        with pytest.raises(NotADirectoryError) as exc:
            attempt()
        assert exc.value.filename == str(target) and "cannot write there" in exc.value.strerror
    check_writable(tmp_path / "new" / "deeper" / "a.png")  # tests the folders it would need, then removes them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    (tmp_path / "kept").mkdir()
    check_writable(tmp_path / "kept" / "new" / "a.png")  # a folder that was there stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "kept"] and not any((tmp_path / "kept").iterdir())
    with atomic_path(tmp_path / "new" / "deeper" / "a.png") as tmp:  # the write itself creates them
        tmp.write_text("x")
    assert (tmp_path / "new" / "deeper" / "a.png").read_text() == "x"
