"""File names made from data: class names, image ids, split and pipeline names.

Each must stay one file (or folder) directly inside the folder it is written to; a
name that would climb out of it, or that no filesystem takes, is refused here. And
the class a misspelt class name most likely meant, for the advice that names it.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

# Room for what derived names add within the usual 255-byte limit of one file name
# (``.comp4_det_<split>_<class>.txt.<random>.tmp``, the devkit's result file as it is written).
MAX_NAME_BYTES = 150
_MAX_FILE_NAME_BYTES = 255


def _problem(name: str, max_bytes: int) -> str | None:
    if not isinstance(name, str):
        return f"it is not text but {type(name).__name__} {name!r}"
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return f"'{name}' means a folder, not a file in it"
    for sep in ("/", "\\"):
        if sep in name:
            # '\\' is no separator on POSIX, but it is on Windows, where the same files may be read.
            return f"it contains '{sep}'"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it contains a control character (NUL, tab, newline, ...)"
    if len(name.encode("utf-8", "surrogateescape")) > max_bytes:
        return f"it is longer than {max_bytes} bytes"
    return None


def name_problem(name: str) -> str | None:
    """Why ``name`` (a class name, an image id, a split or pipeline name) cannot become a file name, or None."""
    return _problem(name, MAX_NAME_BYTES)


def child_path(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name``, refusing (``ValueError``) any ``name`` that is not one file directly inside ``folder``.

    The last line of defence for names made from data: readers refuse such names with
    a message naming their source before anything is written.
    """
    problem = _problem(name, _MAX_FILE_NAME_BYTES)
    if problem is not None:
        raise ValueError(f"{name!r} cannot be a file name in {folder}: {problem}")
    return Path(folder) / name


def close_class(name: str, classes: tuple[str, ...], cutoff: float = 0.75) -> str | None:
    """The class of ``classes`` that ``name`` is most likely a misspelling of, if one is close enough: its
    case-blind :class:`difflib.SequenceMatcher` ratio at least ``cutoff``."""
    folded = [c.casefold() for c in classes]
    close = difflib.get_close_matches(name.casefold(), folded, n=1, cutoff=cutoff)
    return classes[folded.index(close[0])] if close else None
