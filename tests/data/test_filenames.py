"""Names from data used as file names: nothing may lead out of its folder."""

from __future__ import annotations

import pytest

from rcnn.data.filenames import MAX_NAME_BYTES, child_path, name_problem


@pytest.mark.parametrize(
    "name, needle",
    [
        ("x/../../../../tmp/ESCAPED", "contains '/'"),
        ("/etc", "contains '/'"),
        ("a\\b", "contains '\\'"),
        ("..", "means a folder"),
        (".", "means a folder"),
        ("", "empty"),
        ("cat\x00.png", "control character"),
        ("two\nlines", "control character"),
    ],
)
def test_names_that_are_not_one_file_are_refused(name, needle):
    assert needle in name_problem(name)
    with pytest.raises(ValueError, match="cannot be a file name"):
        child_path("/some/folder", name)


def test_long_names_leave_room_for_what_file_names_add():
    assert f"longer than {MAX_NAME_BYTES} bytes" in name_problem("c" * (MAX_NAME_BYTES + 1))
    assert "bytes" in name_problem("é" * (MAX_NAME_BYTES // 2 + 1))  # two bytes each in UTF-8
    # A derived file name may be longer, up to the filesystems' 255 bytes.
    assert child_path("/f", "c" * 255).name == "c" * 255
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        child_path("/f", "c" * 256)


@pytest.mark.parametrize("name", ["dog", "pottedplant", "traffic light", "dog_2", ".hidden", "猫", "c" * MAX_NAME_BYTES, "a..b"])
def test_plain_names_pass_and_stay_in_their_folder(name, tmp_path):
    assert name_problem(name) is None
    path = child_path(tmp_path, name)
    assert path.parent == tmp_path and path.name == name
