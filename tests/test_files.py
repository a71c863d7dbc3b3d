"""jaxquant.files.atomic_write: whole files or nothing."""

from __future__ import annotations

import os
import stat

import pytest

from jaxquant.files import atomic_write


def test_writes_bytes_and_text_creating_folders(tmp_path):
    p = tmp_path / "a" / "b" / "out.json"
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    atomic_write(p, "é\n")
    assert p.read_bytes() == "é\n".encode()
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600  # the temporary file's mode, unless asked
    atomic_write(str(p), "x", mode=0o644)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
    assert os.listdir(p.parent) == ["out.json"]  # no temporary file left


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    p = tmp_path / "out.txt"
    p.write_text("old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, "new")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_rejects_other_data():
    with pytest.raises(TypeError, match="bytes or str"):
        atomic_write("/nonexistent/x", {"a": 1})
