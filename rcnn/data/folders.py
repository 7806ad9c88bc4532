"""Dataset folders written whole or not at all: built under a temporary name beside their destination and renamed
when complete, so a failure or an interrupt leaves no half-made dataset that a pipeline could read."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rcnn.errors import UserError


def refuse_used(destination: Path) -> None:
    """Refuse a destination that exists and is not an empty folder, before any work."""
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise UserError(f"'{destination}' already exists and is not an empty folder; name a new one")


@contextmanager
def new_folder(destination: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``destination`` to fill; renamed to ``destination`` when the block ends
    without error, removed when it raises (or is interrupted). ``destination`` must be absent or an empty folder."""
    destination = Path(destination)
    refuse_used(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    work = destination.parent / f".{destination.name}.partial-{os.getpid()}"  # made with the umask's permissions
    shutil.rmtree(work, ignore_errors=True)  # left by a process of the same id that was killed
    work.mkdir()
    try:
        yield work
        if destination.exists():
            destination.rmdir()  # empty, checked above
        os.replace(work, destination)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def folder_bytes(folder: Path) -> int:
    """The bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
