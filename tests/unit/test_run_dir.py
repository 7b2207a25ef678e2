"""Run-directory files are written atomically yet end up with the permissions of any normal file (the umask's)."""

from __future__ import annotations

import os
import stat

import pytest

from tunesmith.registry.run_dir import staged_dir, write_json_atomic


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_atomic_files_and_staged_folders_follow_the_umask(tmp_path, umask_022):
    write_json_atomic(tmp_path / "run" / "manifest.json", {"a": 1})
    with staged_dir(tmp_path / "run" / "adapter") as staging:
        (staging / "weights.bin").write_bytes(b"x")
    assert stat.S_IMODE((tmp_path / "run" / "manifest.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "run" / "adapter").stat().st_mode) == 0o755  # readable by a serving user


def test_a_failed_stage_leaves_no_folder_and_keeps_the_old_one(tmp_path, umask_022):
    final = tmp_path / "adapter"
    with staged_dir(final) as staging:
        (staging / "old").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(final) as staging:
        (staging / "new").write_text("half")
        raise RuntimeError("crash mid-write")
    assert [p.name for p in final.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
