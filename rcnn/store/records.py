"""Per-image records in HDF5: written in small complete part files, read through one index.

A long stage appends records to part files; each part is written under a
temporary name and renamed into place when closed, so a killed run leaves only
whole parts, and a rerun skips the images they hold. Several writers can fill one
folder at once (one ``shard`` name each). :func:`consolidate` joins the parts into
one file; :class:`RecordFile` reads a joined file and checks its schema first.
Both readers take a ``verify`` callable that vets each file before it is first
opened (an artifact store's check against the digests it recorded).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from rcnn.errors import UserError

SCHEMA = "rcnn.records"
SCHEMA_VERSION = 1


def _write_groups(
    h5: h5py.File, records: Iterable[tuple[str, Mapping[str, np.ndarray], Mapping]], compress: frozenset[str] = frozenset()
) -> None:
    images = h5.require_group("images")
    for image_id, arrays, attrs in records:
        g = images.create_group(image_id)
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            # LZF: fast, and ReLU features are full of zeros; track_times off keeps bytes reproducible.
            lzf = "lzf" if name in compress and arr.size else None
            g.create_dataset(name, data=arr, track_times=False, compression=lzf)
        for k, v in attrs.items():
            g.attrs[k] = v


def _stamp(h5: h5py.File, kind: str) -> None:
    h5.attrs["schema"] = SCHEMA
    h5.attrs["schema_version"] = SCHEMA_VERSION
    h5.attrs["kind"] = kind


class RecordWriter:
    """Buffers per-image records and writes them as complete part files.

    A part is flushed when it holds ``chunk_size`` images, or (if ``max_seconds``
    is set) when that long has passed since the last flush, bounding the work a
    kill can lose. Without ``max_seconds``, images written in a fixed order always
    fall into the same parts, so a resumed run writes byte-identical files; to keep
    that after an exception or Ctrl-C as after a kill, a part not yet full is then
    dropped (its images are computed again on resume) rather than written short.

    With ``background``, a full part is written (and fsynced) by a thread of its own while the caller
    computes the next: at most one part is being written and one filled, and a write's error is raised
    by the next ``add`` that fills a part, by ``flush`` or at the exit. The files are the same either way.
    """

    def __init__(
        self,
        parts_dir: Path,
        kind: str,
        shard: str = "0",
        chunk_size: int = 64,
        max_seconds: float | None = None,
        compress: Iterable[str] = (),
        background: bool = False,
    ):
        self.parts_dir = Path(parts_dir)
        self.compress = frozenset(compress)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.kind = kind
        self.shard = shard
        self.chunk_size = chunk_size
        self.max_seconds = max_seconds
        self._buffer: list[tuple[str, dict, dict]] = []
        self._last_flush = time.monotonic()
        # After the last part of this name, not after their count: a cluster run may have left gaps.
        seqs = [int(p.stem.rsplit("-", 1)[1]) for p in self.parts_dir.glob(f"part-{shard}-*.h5")]
        self._seq = max(seqs, default=-1) + 1
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rcnn-records") if background else None
        self._pending: Future | None = None

    def add(self, image_id: str, arrays: Mapping[str, np.ndarray], attrs: Mapping | None = None) -> None:
        self._buffer.append((image_id, dict(arrays), dict(attrs or {})))
        overdue = self.max_seconds is not None and time.monotonic() - self._last_flush >= self.max_seconds
        if len(self._buffer) >= self.chunk_size or overdue:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        path = self.parts_dir / part_name(self.shard, self._seq)
        if self._pool is None:
            write_part(path, self.kind, self._buffer, self.compress)
        else:
            self.wait()
            self._pending = self._pool.submit(write_part, path, self.kind, list(self._buffer), self.compress)
        self._seq += 1
        self._buffer.clear()

    def wait(self) -> None:
        """Wait for the part being written in the background, raising its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # Whatever was computed before an exception is still worth keeping, unless writing it would shift the
        # fixed part boundaries: a short part makes every later part, and the stages reading them, differ.
        try:
            if exc_type is not None and self.max_seconds is None and len(self._buffer) < self.chunk_size:
                self._buffer.clear()
            self.flush()
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


def part_name(shard: str, seq: int) -> str:
    return f"part-{shard}-{seq:06d}.h5"


def write_part(
    path: Path, kind: str, records: Iterable[tuple[str, Mapping[str, np.ndarray], Mapping]], compress: Iterable[str] = ()
) -> None:
    """Write one complete part file atomically: under a temporary name of this process's own, then renamed.

    Two processes writing the same part (a task rerun while its first worker still runs) write the same
    records, so whichever rename comes last leaves a whole, equal file.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with h5py.File(tmp, "w") as h5:
        _stamp(h5, kind)
        _write_groups(h5, records, frozenset(compress))
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def completed_parts(parts_dir: Path) -> dict[str, Path]:
    """Map image id -> part file for every record in the complete parts of ``parts_dir``.

    Temporary files of an interrupted flush are ignored (and removed); a part
    that cannot be read is removed so its images are computed again.
    """
    parts_dir = Path(parts_dir)
    index: dict[str, Path] = {}
    if not parts_dir.is_dir():
        return index
    for tmp in parts_dir.glob("*.tmp"):
        tmp.unlink(missing_ok=True)
    for part in sorted(parts_dir.glob("part-*.h5")):
        try:
            with h5py.File(part, "r") as h5:
                ids = list(h5["images"].keys())
        except (OSError, KeyError):
            part.unlink(missing_ok=True)
            continue
        for image_id in ids:
            index.setdefault(image_id, part)
    return index


def count_completed(parts_dir: Path) -> int:
    """How many distinct images the complete parts of ``parts_dir`` hold; reads only (for a status, while a writer
    may be at work: unreadable parts are passed over, not removed as :func:`completed_parts` removes them)."""
    ids: set[str] = set()
    for part in sorted(Path(parts_dir).glob("part-*.h5")):
        try:
            with h5py.File(part, "r") as h5:
                ids.update(h5["images"].keys())
        except (OSError, KeyError):
            continue
    return len(ids)


def consolidate(parts_dir: Path, out_path: Path, order: list[str], kind: str, attrs: Mapping | None = None) -> None:
    """Join the records of ``order`` from the parts into one HDF5 file, atomically."""
    index = completed_parts(parts_dir)
    missing = [i for i in order if i not in index]
    if missing:
        raise RuntimeError(f"{len(missing)} records missing from {parts_dir}, e.g. {missing[0]}")
    tmp = Path(str(out_path) + ".tmp")
    open_parts: dict[Path, h5py.File] = {}
    try:
        with h5py.File(tmp, "w") as out:
            _stamp(out, kind)
            for k, v in (attrs or {}).items():
                out.attrs[k] = v
            images = out.create_group("images")
            for image_id in order:
                part = index[image_id]
                if part not in open_parts:
                    open_parts[part] = h5py.File(part, "r")
                open_parts[part].copy(open_parts[part]["images"][image_id], images, name=image_id)
            out.create_dataset("order", data=np.array(order, dtype=h5py.string_dtype()), track_times=False)
    finally:
        for h5 in open_parts.values():
            h5.close()
    _fsync(tmp)
    os.replace(tmp, out_path)


def write_index(parts_dir: Path, out_path: Path, order: list[str], kind: str) -> dict[str, Path]:
    """Index the parts (without joining them): ``{"order": ids, "parts": {id: part name}}`` as JSON.

    Returns the part files the index refers to, so the caller can commit them.
    """
    index = completed_parts(parts_dir)
    missing = [i for i in order if i not in index]
    if missing:
        raise RuntimeError(f"{len(missing)} records missing from {parts_dir}, e.g. {missing[0]}")
    used = {index[i] for i in order}
    doc = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "order": order,
        "parts": {i: f"parts/{index[i].name}" for i in order},
    }
    tmp = Path(str(out_path) + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, out_path)
    return {f"parts/{p.name}": p for p in sorted(used)}


def _check_schema(path: Path, attrs: Mapping, kind: str) -> None:
    if attrs.get("schema") != SCHEMA or attrs.get("kind") != kind:
        raise UserError(f"'{path}' is not an rcnn '{kind}' record file")
    if int(attrs.get("schema_version", -1)) != SCHEMA_VERSION:
        raise UserError(
            f"'{path}' has schema version {attrs.get('schema_version')}, expected {SCHEMA_VERSION}; rerun the stage with --force"
        )


def _open_h5(path: Path, kind: str) -> h5py.File:
    try:
        h5 = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"'{path}' is not a readable HDF5 file ({e}); rerun the stage with --force") from None
    try:
        _check_schema(path, dict(h5.attrs), kind)
    except UserError:
        h5.close()
        raise
    return h5


class _Reader:
    """What both readers share: ids in split order and checked access to one image's arrays."""

    path: Path
    ids: list[str]

    def _group(self, image_id: str) -> h5py.Group:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids)

    def array(self, image_id: str, name: str, dtype=None, ndim: int | None = None) -> np.ndarray:
        """One array of one image's record, with its dtype and rank checked."""
        try:
            arr = self._group(image_id)[name][()]
        except KeyError:
            raise UserError(f"'{self.path}': no '{name}' for image {image_id}") from None
        except OSError as e:
            raise UserError(f"'{self.path}': record of image {image_id} is damaged ({e}); rerun with --force") from None
        if dtype is not None and arr.dtype != np.dtype(dtype):
            raise UserError(f"'{self.path}': '{image_id}/{name}' has dtype {arr.dtype}, expected {np.dtype(dtype)}")
        if ndim is not None and arr.ndim != ndim:
            raise UserError(f"'{self.path}': '{image_id}/{name}' has {arr.ndim} dimensions, expected {ndim}")
        return arr

    def record_attrs(self, image_id: str) -> Mapping:
        return self._group(image_id).attrs

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


Verify = Callable[[Path], None]


class RecordFile(_Reader):
    """Read-only access to a consolidated record file, validated on open (by ``verify`` too, if given)."""

    def __init__(self, path: Path, kind: str, verify: Verify | None = None):
        self.path = Path(path)
        if verify is not None:
            verify(self.path)
        self._h5 = _open_h5(self.path, kind)
        try:
            self.ids = [s.decode() if isinstance(s, bytes) else s for s in self._h5["order"][()]]
        except KeyError:
            self._h5.close()
            raise UserError(f"'{self.path}' has no index of its records; rerun the stage with --force") from None

    @property
    def attrs(self) -> Mapping:
        return self._h5.attrs

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._h5["images"]

    def _group(self, image_id: str) -> h5py.Group:
        return self._h5["images"][image_id]

    def close(self) -> None:
        self._h5.close()


class RecordSet(_Reader):
    """Read-only access to records left in their parts and joined by an index (see :func:`write_index`).

    ``verify``, if given, vets the index on open and each part when a record in it is first read.
    """

    def __init__(self, index_path: Path, kind: str, verify: Verify | None = None):
        self.path = Path(index_path)
        self.kind = kind
        self._verify = verify
        if verify is not None:
            verify(self.path)
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"record index '{self.path}' is missing or damaged ({e}); rerun the stage with --force") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("parts"), dict) or not isinstance(doc.get("order"), list):
            raise UserError(f"'{self.path}' is not an rcnn record index")
        _check_schema(self.path, doc, kind)
        self.ids = [str(i) for i in doc["order"]]
        root = self.path.parent.resolve()
        self._parts: dict[str, Path] = {}
        for image_id, rel in doc["parts"].items():
            part = (root / str(rel)).resolve()
            if root not in part.parents:
                raise UserError(f"'{self.path}' points outside its folder ({rel})")
            self._parts[str(image_id)] = part
        self._open: dict[Path, h5py.File] = {}

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._parts

    def _group(self, image_id: str) -> h5py.Group:
        part = self._parts[image_id]
        if part not in self._open:
            if self._verify is not None:
                self._verify(part)
            self._open[part] = _open_h5(part, self.kind)
        return self._open[part]["images"][image_id]

    def close(self) -> None:
        for h5 in self._open.values():
            h5.close()
        self._open.clear()
