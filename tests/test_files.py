import os
import subprocess
import sys

import pytest

from attnlm.files import HOST, atomic_open, atomic_write, remove_stale_temps, temp_path


def test_atomic_write_replaces_whole(tmp_path):
    path = tmp_path / "a.json"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_stale_temps_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".checkpoint.pt.tmp-{dead}@{HOST}"
    live = tmp_path / f".checkpoint.pt.tmp-{os.getppid()}@{HOST}"  # a running process's
    elsewhere = tmp_path / f".checkpoint.pt.tmp-{dead}@another-machine"  # its pid means nothing here
    mine = temp_path(tmp_path / "x")
    other = tmp_path / "checkpoint.pt"
    for p in (stale, live, elsewhere, mine, other):
        p.write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == [stale]
    assert sorted(remove_stale_temps(tmp_path, every=True)) == sorted([live, elsewhere])
    assert mine.exists() and other.exists()
