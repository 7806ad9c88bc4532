"""Split files as editors save them (UTF-16, other encodings, comments) and the split files a folder holds."""

from __future__ import annotations

import pytest

from rcnn.data.datasets import VOCDataset, parse_voc_xml
from rcnn.errors import UserError


def _split(voc, name="trainval"):
    return voc / "ImageSets" / "Main" / f"{name}.txt"


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_a_utf16_split_file_is_read_by_its_byte_order_mark(voc_copy, codec):
    # Notepad's "Unicode" is UTF-16 LE with its mark; it was a UnicodeDecodeError traceback in every command.
    ids = VOCDataset(voc_copy, "trainval").ids
    text = "\r\n".join(ids) + "\r\n"
    mark = {"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff"}.get(codec, b"")
    _split(voc_copy).write_bytes(mark + text.encode(codec))
    assert VOCDataset(voc_copy, "trainval").ids == ids


def test_a_split_file_in_another_encoding_is_one_line_naming_the_file_and_line(voc_copy):
    split = _split(voc_copy)
    split.write_bytes("000000\n000001\ncafé\n".encode("latin-1"))
    with pytest.raises(UserError) as e:
        VOCDataset(voc_copy, "trainval")
    assert str(e.value) == f"{split}, line 3: byte 0xe9 is not UTF-8 text; save the file as UTF-8"
    split.write_bytes("000000\n".encode("utf-16-le"))  # no byte-order mark: every other byte is NUL
    with pytest.raises(UserError, match=r"trainval\.txt: holds NUL bytes, .*\(UTF-16 without a byte-order mark\?\); save it"):
        VOCDataset(voc_copy, "trainval")


def test_a_comment_line_is_told_to_be_removed(voc_copy):
    # It was told to "rename the image and its annotation", advice for an id with a space.
    split = _split(voc_copy)
    ids = VOCDataset(voc_copy, "trainval").ids
    split.write_text("# my ids\n" + "\n".join(ids) + "\n")
    with pytest.raises(UserError) as e:
        VOCDataset(voc_copy, "trainval")
    assert str(e.value) == (
        f"{split}, line 1: '# my ids' looks like a comment, but a split file holds only image ids, one per line: remove the line"
    )
    # One without a space could be an id; the annotation it lacks says what to do if it is a comment.
    split.write_text("#old\n" + "\n".join(ids) + "\n")
    problem = VOCDataset(voc_copy, "trainval").problem("#old")
    assert problem.endswith("(listed in the split file); a split file holds no comments: if this line is one, remove it")


def test_a_missing_split_names_the_split_files_there(voc_copy, tmp_path):
    folder = voc_copy / "ImageSets" / "Main"
    with pytest.raises(UserError) as e:
        VOCDataset(voc_copy, "val")
    assert str(e.value) == (
        f"split file '{folder / 'val'}.txt' does not exist (is 'val' the right split name? split files there: test, trainval)"
    )
    # VOC's folder holds the per-class files too: the splits come first, and only a few names are shown.
    for name in ("train", "aeroplane_train", "bicycle_train", "bird_train", "boat_train", "bottle_train", "bus_train"):
        (folder / f"{name}.txt").write_text("")
    with pytest.raises(UserError, match=r"split files there: test, train, trainval, aeroplane_train, .*, \.\.\. \(9 in all\)\)$"):
        VOCDataset(voc_copy, "val")
    (tmp_path / "bare" / "ImageSets" / "Main").mkdir(parents=True)
    with pytest.raises(UserError, match=r"Main holds no split file \(NAME\.txt\)\)$"):
        VOCDataset(tmp_path / "bare", "val")
    (tmp_path / "other").mkdir()
    with pytest.raises(UserError, match=r"there is no folder \S*other/ImageSets/Main\)$"):
        VOCDataset(tmp_path / "other", "val")


XML = "<annotation><folder>café</folder><size><width>50</width><height>40</height></size></annotation>"


def test_xml_annotations_in_other_encodings(tmp_path):
    p = tmp_path / "a.xml"
    for data in (
        XML.encode("utf-16"),  # by its byte-order mark
        ('<?xml version="1.0" encoding="UTF-16"?>' + XML).encode("utf-16"),
        ('<?xml version="1.0" encoding="ISO-8859-1"?>' + XML).encode("latin-1"),
    ):
        p.write_bytes(data)
        assert parse_voc_xml(p, tmp_path / "a.jpg", "a").width == 50
    p.write_bytes(XML.encode("latin-1"))  # neither UTF-8 nor declared
    with pytest.raises(UserError) as e:
        parse_voc_xml(p, tmp_path / "a.jpg", "a")
    assert str(e.value).startswith(f"{p}: malformed XML (") and str(e.value).endswith(
        "; line 1: byte 0xe9 is not UTF-8, and the file declares no other encoding: save it as UTF-8, or declare its "
        'encoding in a first line <?xml version="1.0" encoding="ISO-8859-1"?>'
    )
