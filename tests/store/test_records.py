"""Per-image record parts: atomic flushes, resume bookkeeping, consolidation and validation."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from rcnn.errors import UserError
from rcnn.store import records


def test_parts_consolidate_in_split_order(tmp_path):
    parts = tmp_path / "parts"
    with records.RecordWriter(parts, "k", chunk_size=2) as w:
        for i in range(5):
            w.add(f"im{i}", {"boxes": np.full((i, 4), i, np.float32)}, {"seconds": 0.1 * i})
    assert len(list(parts.glob("part-*.h5"))) == 3
    assert set(records.completed_parts(parts)) == {f"im{i}" for i in range(5)}
    out = tmp_path / "all.h5"
    order = ["im3", "im0", "im4", "im1", "im2"]
    records.consolidate(parts, out, order, "k")
    with records.RecordFile(out, "k") as f:
        assert f.ids == order
        assert f.array("im3", "boxes", np.float32, 2).shape == (3, 4)
        assert f.record_attrs("im4")["seconds"] == pytest.approx(0.4)
        with pytest.raises(UserError, match="dtype"):
            f.array("im3", "boxes", np.float64)


def test_interrupted_flush_and_damaged_part_are_recomputed(tmp_path):
    parts = tmp_path / "parts"
    with records.RecordWriter(parts, "k", chunk_size=1) as w:
        w.add("a", {"x": np.zeros(1)})
        w.add("b", {"x": np.zeros(1)})
    (parts / "part-0-000009.h5.tmp").write_bytes(b"half written")
    victim = sorted(parts.glob("part-*.h5"))[1]
    victim.write_bytes(b"\x89HDF garbage")
    assert set(records.completed_parts(parts)) == {"a"}
    assert not victim.exists() and not list(parts.glob("*.tmp"))


def test_consolidate_refuses_missing_records(tmp_path):
    with records.RecordWriter(tmp_path / "p", "k") as w:
        w.add("a", {"x": np.zeros(1)})
    with pytest.raises(RuntimeError, match="missing"):
        records.consolidate(tmp_path / "p", tmp_path / "o.h5", ["a", "b"], "k")


def test_reader_rejects_foreign_or_truncated_files(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(UserError, match="not a readable HDF5"):
        records.RecordFile(junk, "k")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5:
        h5.attrs["schema"] = "something else"
    with pytest.raises(UserError, match="not an rcnn 'k' record file"):
        records.RecordFile(other, "k")
    with records.RecordWriter(tmp_path / "p", "k") as w:
        w.add("a", {"x": np.zeros(1)})
    good = tmp_path / "good.h5"
    records.consolidate(tmp_path / "p", good, ["a"], "k")
    with h5py.File(good, "a") as h5:
        h5.attrs["schema_version"] = 99
    with pytest.raises(UserError, match="schema version 99"):
        records.RecordFile(good, "k")
    truncated = tmp_path / "trunc.h5"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserError):
        records.RecordFile(truncated, "k")


def test_a_writer_after_parts_with_gaps_overwrites_none_of_them(tmp_path):
    # Parts written per group by a cluster run can leave gaps (groups 0 and 2 done, 1 not): a plain run
    # resuming after them must number its parts past the last one, not by their count.
    parts = tmp_path / "parts"
    parts.mkdir()
    records.write_part(parts / records.part_name("0", 0), "t", [("a", {"x": np.zeros(1)}, {})])
    records.write_part(parts / records.part_name("0", 2), "t", [("c", {"x": np.zeros(1)}, {})])
    with records.RecordWriter(parts, "t", chunk_size=1) as w:
        w.add("b", {"x": np.ones(1)})
    assert sorted(p.name for p in parts.iterdir()) == ["part-0-000000.h5", "part-0-000002.h5", "part-0-000003.h5"]
    assert {i: p.name for i, p in records.completed_parts(parts).items()} == {
        "a": "part-0-000000.h5",
        "b": "part-0-000003.h5",
        "c": "part-0-000002.h5",
    }


def _write_all(parts, background: bool, n: int = 7) -> dict[str, bytes]:
    with records.RecordWriter(parts, "k", chunk_size=2, background=background) as w:
        for i in range(n):
            w.add(f"im{i}", {"boxes": np.full((i + 1, 4), i, np.float32)})
    return {p.name: p.read_bytes() for p in sorted(parts.glob("part-*.h5"))}


def test_background_writing_gives_the_same_files(tmp_path):
    plain, background = _write_all(tmp_path / "a", False), _write_all(tmp_path / "b", True)
    assert list(plain) == ["part-0-000000.h5", "part-0-000001.h5", "part-0-000002.h5", "part-0-000003.h5"]
    assert background == plain  # byte for byte


def test_a_background_write_error_is_raised_and_earlier_parts_are_kept(tmp_path, monkeypatch):
    real, calls = records.write_part, []

    def fails_second(path, *args, **kwargs):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(records, "write_part", fails_second)
    parts = tmp_path / "parts"
    with pytest.raises(OSError, match="No space"):
        with records.RecordWriter(parts, "k", chunk_size=1, background=True) as w:
            for i in range(5):
                w.add(f"im{i}", {"x": np.zeros(1)})
    # The failure surfaced at the next flush, which stopped the loop; the exit still wrote the image computed
    # since (as a plain writer keeps what was computed). The failed part left no file behind.
    assert calls == ["part-0-000000.h5", "part-0-000001.h5", "part-0-000002.h5"]
    assert set(records.completed_parts(parts)) == {"im0", "im2"}
    assert sorted(p.name for p in parts.iterdir()) == ["part-0-000000.h5", "part-0-000002.h5"]


def test_an_error_in_the_caller_keeps_full_parts_and_a_resume_writes_the_same_files(tmp_path):
    # A short part written at Ctrl-C would shift every later part's images: other files than an unbroken run's,
    # and every stage reading them stale. It is dropped; its images are computed again.
    ids = [f"im{i}" for i in range(7)]
    for background in (False, True):
        parts, whole = tmp_path / f"parts-{background}", tmp_path / f"whole-{background}"
        with pytest.raises(KeyboardInterrupt):
            with records.RecordWriter(parts, "k", chunk_size=2, background=background) as w:
                for image_id in ids[:3]:
                    w.add(image_id, {"x": np.full(1, int(image_id[2:]))})
                raise KeyboardInterrupt
        assert set(records.completed_parts(parts)) == {"im0", "im1"}
        done = records.completed_parts(parts)
        with records.RecordWriter(parts, "k", chunk_size=2, background=background) as w:
            for image_id in ids:
                if image_id not in done:
                    w.add(image_id, {"x": np.full(1, int(image_id[2:]))})
        with records.RecordWriter(whole, "k", chunk_size=2, background=background) as w:
            for image_id in ids:
                w.add(image_id, {"x": np.full(1, int(image_id[2:]))})
        resumed = {p.name: p.read_bytes() for p in sorted(parts.glob("part-*.h5"))}
        assert resumed == {p.name: p.read_bytes() for p in sorted(whole.glob("part-*.h5"))} and len(resumed) == 4
    # Without fixed parts (a writer flushed by time), what was computed is written.
    timed = tmp_path / "timed"
    with pytest.raises(KeyboardInterrupt):
        with records.RecordWriter(timed, "k", chunk_size=2, max_seconds=60.0) as w:
            for image_id in ids[:3]:
                w.add(image_id, {"x": np.zeros(1)})
            raise KeyboardInterrupt
    assert set(records.completed_parts(timed)) == {"im0", "im1", "im2"}
