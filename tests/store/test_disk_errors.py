"""Disk full or permission denied: one line naming the path, exit 1, completed work intact."""

from __future__ import annotations

import errno
import json

import h5py
from conftest import run_cli

from rcnn.store import artifacts as store


def test_disk_full_midway_keeps_the_completed_unit(pipelines_file, tmp_path, capsys, monkeypatch):
    common = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    assert run_cli(["proposals", "tiny", *common], capsys)[0] == 0
    unit = tmp_path / "runs" / "tiny" / "proposals" / "test"
    before = json.loads((unit / "manifest.json").read_text())

    real_file = h5py.File

    def full_disk(path, mode="r", *args, **kwargs):
        if mode != "r":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_file(path, mode, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", full_disk)
    code, _, err = run_cli(["proposals", "tiny", "--force", *common], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert "No space left on device" in lines[0] and "part-" in lines[0] and "completed work is kept" in lines[0]
    # The earlier, complete unit is untouched and still up to date.
    assert json.loads((unit / "manifest.json").read_text()) == before
    assert store.file_digest(unit / "proposals.h5") == before["outputs"]["proposals.h5"]["digest"]


def test_read_only_runs_folder_is_one_line(pipelines_file, tmp_path, capsys, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "runs" / "tiny"))

    monkeypatch.setattr(store.Path, "mkdir", denied)
    code, _, err = run_cli(
        ["proposals", "tiny", "--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path / "runs"), "--quiet"], capsys
    )
    assert code == 1 and err.count("\n") == 1 and "Permission denied" in err and str(tmp_path / "runs") in err


def test_second_writer_refuses_or_waits(pipelines_file, tmp_path, capsys):
    import threading
    import time

    common = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    unit = tmp_path / "runs" / "tiny" / "proposals" / "trainval"
    with store.unit_lock(unit):
        code, _, err = run_cli(["proposals", "tiny", *common], capsys)
    assert code == 1 and "another rcnn process is writing proposals/trainval" in err and "--wait" in err

    # With --wait the second writer blocks until the lock is released, then completes.
    released = threading.Event()

    def hold():
        with store.unit_lock(unit):
            time.sleep(1.0)
        released.set()

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.2)
    code, out, err = run_cli(["proposals", "tiny", "--wait", *common], capsys)
    holder.join()
    assert code == 0, err
    assert released.is_set() and "recall" in out


def test_hdf5s_own_disk_full_message_is_said_in_one_line_naming_the_file(pipelines_file, tmp_path, capsys, monkeypatch):
    # h5py's message spans two lines (its time stamp ends in a newline) and names the file only inside it.
    part = tmp_path / "runs" / "tiny" / "proposals" / "trainval" / ".work" / "parts" / "part-0-000000.h5.123.tmp"
    said = (
        "Can't close file (file write failed: time = Sat Dec  5 22:29:18 2026\n, "
        f"filename = '{part}', file descriptor = 16, errno = 28, error message = 'No space left on device', "
        "buf = 0x7fb968102e20, total write size = 2048, bytes this sub-write = 2048, offset = 4096)"
    )

    def full_disk(path, mode="r", *args, **kwargs):
        raise OSError(errno.ENOSPC, said)

    monkeypatch.setattr(h5py, "File", full_disk)
    common = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    code, _, err = run_cli(["proposals", "tiny", *common], capsys)
    assert code == 1 and err == f"rcnn: error: No space left on device: {part}; completed work is kept\n", err
