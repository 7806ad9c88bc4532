"""Split files (``ImageSets/Main/<split>.txt``): their text as Windows editors save it, their ids, and which
split files a folder holds, for the advice when one is missing."""

from __future__ import annotations

import codecs
from pathlib import Path

from rcnn.errors import UserError

# Longest first: UTF-32 LE's mark starts with UTF-16 LE's. Notepad's "Unicode" is UTF-16 LE with its mark.
_BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
SHOWN_SPLITS = 8  # split names a missing split's message lists (VOC's folder holds 84, most per class)


def split_file_text(path: Path) -> str:
    """The text of a split file: UTF-8 (with or without the byte-order mark Windows editors write), or UTF-16 or
    UTF-32 by their mark; other bytes are refused in one line naming the file and the line."""
    data = path.read_bytes()
    codec = next((codec for mark, codec in _BYTE_ORDER_MARKS if data.startswith(mark)), None)
    if codec is not None:
        try:
            return data.decode(codec)  # the codec reads and drops the mark
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: starts as {codec.upper()} text but is not ({e.reason}); save it as UTF-8") from None
    if b"\x00" in data:  # UTF-16 without its mark: every other byte is NUL in ASCII ids
        raise UserError(f"{path}: holds NUL bytes, so it is not UTF-8 text (UTF-16 without a byte-order mark?); save it as UTF-8")
    data = data.removeprefix(codecs.BOM_UTF8)  # Windows editors start UTF-8 with it too; it is not part of the first id
    bad = not_utf8(data)
    if bad is not None:
        raise UserError(f"{path}, {bad} is not UTF-8 text; save the file as UTF-8")
    return data.decode("utf-8")


def not_utf8(data: bytes) -> str | None:
    """Where ``data`` stops being UTF-8, as ``line N: byte 0xE9``; None if it is UTF-8 throughout."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return f"line {line}: byte 0x{data[e.start]:02x}"
    return None


def read_split_file(path: Path) -> list[str]:
    """The image ids of a split file: one per line, or VOC's per-class layout ``<id> <-1|0|1>``; blank lines skipped."""
    ids = []
    for lineno, line in enumerate(split_file_text(path).splitlines(), start=1):
        fields = line.split()
        if len(fields) == 2 and fields[1] in ("-1", "0", "1"):
            fields = fields[:1]
        if len(fields) > 1 and line.lstrip().startswith("#"):
            raise UserError(
                f"{path}, line {lineno}: {line.strip()!r} looks like a comment, but a split file holds only image ids, "
                "one per line: remove the line"
            )
        if len(fields) > 1:
            # Cutting at the space would report an image "missing" that is there.
            raise UserError(
                f"{path}, line {lineno}: {line.strip()!r} is not one image id; ids cannot contain "
                "whitespace (the devkit's result files separate fields by it): rename the image and its annotation"
            )
        ids += fields
    return ids


def missing_split_file(folder: Path, split: str) -> str:
    """Why split ``split`` cannot be read from ``folder`` (its ``ImageSets/Main``), naming the split files it holds."""
    if not folder.is_dir():
        held = f"there is no folder {folder}"
    else:
        names = sorted(p.name[: -len(".txt")] for p in folder.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
        names.sort(key=lambda n: "_" in n)  # train, val, test, ... before VOC's per-class aeroplane_train, ...
        shown = ", ".join(names[:SHOWN_SPLITS]) + (f", ... ({len(names)} in all)" if len(names) > SHOWN_SPLITS else "")
        held = f"split files there: {shown}" if names else f"{folder} holds no split file (NAME.txt)"
    return f"split file '{folder / split}.txt' does not exist (is '{split}' the right split name? {held})"
