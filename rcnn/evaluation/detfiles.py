"""PASCAL VOC devkit detection result files, ``comp4_det_<split>_<class>.txt``.

One line per detection, ``image_id score xmin ymin xmax ymax``, boxes in the devkit's
1-based inclusive pixels (the format ``VOCevaldet.m`` of the VOC devkit, Everingham et
al., reads). Parsed as plain text; nothing in a file is ever evaluated.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from rcnn.data.filenames import name_problem
from rcnn.errors import UserError
from rcnn.evaluation.voc import Detections
from rcnn.structures.boxes import as_boxes, from_voc_pixels, to_voc_pixels

_FIELDS = ("image_id", "score", "xmin", "ymin", "xmax", "ymax")


def devkit_filename(split: str, class_name: str) -> str:
    """The devkit's result file name for ``class_name`` on ``split``, e.g. ``comp4_det_test_dog.txt``.

    ``comp4`` is the VOC competition that allows training on outside data, as R-CNN does.
    A split or class name that cannot be part of one file name (a ``/``, ``..``, a NUL)
    is refused with ``ValueError``: the name must never lead out of the results folder.
    """
    for what, name in (("split", split), ("class", class_name)):
        problem = name_problem(name)
        if problem is not None:
            raise ValueError(f"{what} name {name!r} cannot be part of a file name: {problem}")
    return f"comp4_det_{split}_{class_name}.txt"


def _name_pattern(split: str) -> re.Pattern[str]:
    # Any competition prefix is accepted (comp3, comp4, a user's own tag); the split is
    # matched literally so that a class name may itself contain underscores.
    return re.compile(rf"^.+_det_{re.escape(split)}_(?P<cls>.+)\.txt$")


def write_devkit_file(
    path: str | os.PathLike,
    image_ids: Sequence[str],
    scores: np.ndarray,
    boxes: np.ndarray,
) -> None:
    """Write detections to ``path`` in the devkit's format, atomically.

    Args:
        image_ids: ``K`` image ids, without whitespace.
        scores: ``[K]`` confidences, written with 6 decimals.
        boxes: ``[K, 4]`` in ``(x1, y1, x2, y2)`` continuous pixel coordinates; written as
            VOC 1-based inclusive ``xmin ymin xmax ymax`` with 2 decimals.
    """
    path = Path(path)
    ids = [str(i) for i in image_ids]
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    voc = to_voc_pixels(as_boxes(boxes))
    if not (len(ids) == len(scores) == len(voc)):
        raise ValueError(f"got {len(ids)} image ids, {len(scores)} scores and {len(voc)} boxes")
    for image_id in ids:
        if not image_id or any(c.isspace() for c in image_id):
            raise ValueError(f"image id {image_id!r} is empty or contains whitespace")
    lines = [
        "%s %.6f %.2f %.2f %.2f %.2f\n" % (i, s, *b)  # noqa: UP031 - the devkit format, verbatim
        for i, s, b in zip(ids, scores.tolist(), voc.tolist(), strict=True)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    # A reader (or a crashed writer) must never see half a file: write beside it, then rename.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parse_line(path: Path, lineno: int, line: str) -> tuple[str, float, list[float]]:
    parts = line.split()
    if len(parts) != len(_FIELDS):
        raise UserError(
            f"{path}, line {lineno}: expected 6 fields '{' '.join(_FIELDS)}', got {len(parts)}: {line.strip()[:80]!r}"
        )
    values = []
    for name, text in zip(_FIELDS[1:], parts[1:], strict=True):
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"{path}, line {lineno}: {name} {text!r} is not a number") from None
        if not math.isfinite(value):
            raise UserError(f"{path}, line {lineno}: {name} {text!r} is not a finite number")
        values.append(value)
    return parts[0], values[0], values[1:]


def read_devkit_file(path: str | os.PathLike) -> Detections:
    """Read one devkit result file into :class:`Detections` (boxes converted to continuous coordinates).

    Blank lines are skipped. An empty file gives empty detections.

    Raises:
        UserError: the file is missing or unreadable, or a line is malformed (the message
            names the file and the line number).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"detection file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read detection file {path}: {err}") from None
    ids: list[str] = []
    scores: list[float] = []
    boxes: list[list[float]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        image_id, score, box = _parse_line(path, lineno, line)
        ids.append(image_id)
        scores.append(score)
        boxes.append(box)
    if not ids:
        return Detections.empty()
    return Detections(tuple(ids), np.array(scores, dtype=np.float64), from_voc_pixels(np.array(boxes)))


def detection_file_classes(path: str | os.PathLike, split: str) -> list[str]:
    """The classes named by the devkit result files for ``split`` at ``path`` (a folder or one file), sorted."""
    path = Path(path)
    pattern = _name_pattern(split)
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    names = {m["cls"] for f in files if not f.name.startswith(".") and (m := pattern.match(f.name)) is not None}
    return sorted(names)


def read_detections(path: str | os.PathLike, split: str, classes: Iterable[str]) -> dict[str, Detections]:
    """Read devkit result files for ``split`` from a folder or a single file.

    A folder gives every class of ``classes``, with empty detections where its file is
    missing; files whose names do not look like ``<prefix>_det_<split>_<class>.txt``, and
    those of classes outside ``classes`` (scoring a subset of a full results folder), are
    ignored. A single file gives only its own class, taken from its name.

    Raises:
        UserError: ``path`` is missing; a single file names a class outside ``classes``; a
            folder holds two files for one class; a single file is named otherwise; or a
            file is malformed.
    """
    path = Path(path)
    classes = list(classes)
    known = set(classes)
    pattern = _name_pattern(split)
    if not path.exists():
        raise UserError(f"detections path {path} does not exist")
    if path.is_dir():
        found: dict[str, Path] = {}
        for file in sorted(path.iterdir()):
            match = pattern.match(file.name)
            # Hidden names are editors' and interrupted writers' leftovers, not results.
            if match is None or file.name.startswith(".") or not file.is_file():
                continue
            name = match["cls"]
            if name not in known:
                continue
            if name in found:
                raise UserError(f"{path} holds two files for class {name!r}: {found[name].name} and {file.name}")
            found[name] = file
        return {name: read_devkit_file(found[name]) if name in found else Detections.empty() for name in classes}
    match = pattern.match(path.name)
    if match is None:
        raise UserError(
            f"cannot tell the class of {path}: expected a name like "
            f"{devkit_filename(split, '<class>')} (any '<prefix>_det_{split}_<class>.txt')"
        )
    name = match["cls"]
    if name not in known:
        raise UserError(f"{path}: class {name!r} is not one of the classes scored ({', '.join(classes)})")
    return {name: read_devkit_file(path)}
