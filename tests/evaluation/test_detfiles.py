"""Devkit result files: exact text, coordinate conversion, round trips and error messages."""

from __future__ import annotations

import numpy as np
import pytest

from rcnn.errors import UserError
from rcnn.evaluation.detfiles import (
    devkit_filename,
    read_detections,
    read_devkit_file,
    write_devkit_file,
)


def test_literal_line_converts_voc_pixels_to_continuous(tmp_path):
    # VOC pixels 1..10 x 1..20 inclusive are the continuous box (0, 0, 10, 20).
    path = tmp_path / "comp4_det_test_cat.txt"
    path.write_text("000001 0.9 1 1 10 20\n")
    dets = read_devkit_file(path)
    assert dets.image_ids == ("000001",)
    np.testing.assert_array_equal(dets.scores, [0.9])
    np.testing.assert_array_equal(dets.boxes, [[0, 0, 10, 20]])


def test_written_text_is_the_devkit_format(tmp_path):
    path = tmp_path / "out.txt"
    write_devkit_file(path, ["000001", "000002"], np.array([0.5, -1.25]), np.array([[0, 0, 10, 20], [4.5, 5, 6, 7.125]]))
    assert path.read_text() == "000001 0.500000 1.00 1.00 10.00 20.00\n000002 -1.250000 5.50 6.00 6.00 7.12\n"


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    ids = [f"{rng.integers(0, 10_000):06d}" for _ in range(n)]
    scores = rng.normal(size=n)
    xy = rng.uniform(0, 400, size=(n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 200, size=(n, 2))], axis=1).astype(np.float32)
    path = tmp_path / devkit_filename("test", "dog")
    write_devkit_file(path, ids, scores, boxes)
    dets = read_devkit_file(path)
    assert dets.image_ids == tuple(ids)
    np.testing.assert_allclose(dets.scores, scores, atol=5e-7 + 1e-12)
    np.testing.assert_allclose(dets.boxes, boxes, atol=1e-2)


def test_write_replaces_atomically_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "comp4_det_test_cat.txt"
    path.write_text("old contents\n")
    write_devkit_file(path, ["a"], [1.0], [[0, 0, 1, 1]])
    assert path.read_text() == "a 1.000000 1.00 1.00 1.00 1.00\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    with pytest.raises(ValueError, match="whitespace"):
        write_devkit_file(path, ["two words"], [1.0], [[0, 0, 1, 1]])
    assert path.read_text() == "a 1.000000 1.00 1.00 1.00 1.00\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_empty_write_and_read(tmp_path):
    path = tmp_path / "empty.txt"
    write_devkit_file(path, [], np.zeros(0), np.zeros((0, 4)))
    assert path.read_text() == ""
    dets = read_devkit_file(path)
    assert len(dets) == 0 and dets.boxes.shape == (0, 4)


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("\na 0.5 1 1 2 2\n   \nb 0.25 1 1 3 3  \n")
    assert read_devkit_file(path).image_ids == ("a", "b")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("000001 0.9 1 1 10", "line 2: expected 6 fields"),
        ("000001 0.9 1 1 10 20 30", "line 2: expected 6 fields"),
        ("000001 high 1 1 10 20", "line 2: score 'high' is not a number"),
        ("000001 0.9 1 1 ten 20", "line 2: xmax 'ten' is not a number"),
        ("000001 0.9 nan 1 10 20", "line 2: xmin 'nan' is not a finite number"),
        ("000001 inf 1 1 10 20", "line 2: score 'inf' is not a finite number"),
        ("__import__('os').system('true') 1 1 1 1", "line 2: expected 6 fields"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "comp4_det_test_cat.txt"
    path.write_text(f"000000 0.1 1 1 2 2\n{line}\n")
    with pytest.raises(UserError, match=message) as err:
        read_devkit_file(path)
    assert str(path) in str(err.value)


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_devkit_file(tmp_path / "nope.txt")


def test_filename():
    assert devkit_filename("test", "diningtable") == "comp4_det_test_diningtable.txt"


def _write(folder, name, rows):
    write_devkit_file(folder / name, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def test_folder_mode(tmp_path):
    _write(tmp_path, "comp4_det_test_cat.txt", [("a", 0.9, [0, 0, 10, 10])])
    _write(tmp_path, "comp4_det_test_dog.txt", [("b", 0.8, [1, 1, 5, 5]), ("a", 0.1, [2, 2, 3, 3])])
    _write(tmp_path, "comp4_det_val_cow.txt", [("c", 0.5, [0, 0, 1, 1])])  # other split: ignored
    (tmp_path / "README.md").write_text("not a result file")
    out = read_detections(tmp_path, "test", ["cat", "dog", "cow"])
    assert list(out) == ["cat", "dog", "cow"]
    assert out["cat"].image_ids == ("a",)
    assert out["dog"].image_ids == ("b", "a")
    np.testing.assert_allclose(out["dog"].boxes, [[1, 1, 5, 5], [2, 2, 3, 3]])
    assert len(out["cow"]) == 0


def test_folder_files_of_classes_not_asked_for_are_left_out(tmp_path):
    # Scoring a subset of a full results folder; the zebra file was refused.
    _write(tmp_path, "comp4_det_test_zebra.txt", [("a", 0.9, [0, 0, 10, 10])])
    _write(tmp_path, "comp4_det_test_cat.txt", [("b", 0.8, [1, 1, 5, 5])])
    out = read_detections(tmp_path, "test", ["cat"])
    assert list(out) == ["cat"] and out["cat"].image_ids == ("b",)


def test_folder_with_two_files_for_one_class(tmp_path):
    _write(tmp_path, "comp3_det_test_cat.txt", [])
    _write(tmp_path, "comp4_det_test_cat.txt", [])
    with pytest.raises(UserError, match="two files"):
        read_detections(tmp_path, "test", ["cat"])


def test_single_file_mode(tmp_path):
    _write(tmp_path, "mine_det_test_potted_plant.txt", [("a", 0.9, [0, 0, 10, 10])])
    out = read_detections(tmp_path / "mine_det_test_potted_plant.txt", "test", ["cat", "potted_plant"])
    assert list(out) == ["potted_plant"]
    assert out["potted_plant"].image_ids == ("a",)


@pytest.mark.parametrize("name", ["detections.txt", "comp4_det_val_cat.txt", "comp4_det_test_cat.csv"])
def test_single_file_with_wrong_name(tmp_path, name):
    (tmp_path / name).write_text("")
    with pytest.raises(UserError, match="comp4_det_test_<class>.txt"):
        read_detections(tmp_path / name, "test", ["cat"])


def test_single_file_for_unknown_class(tmp_path):
    _write(tmp_path, "comp4_det_test_zebra.txt", [])
    with pytest.raises(UserError, match="zebra"):
        read_detections(tmp_path / "comp4_det_test_zebra.txt", "test", ["cat"])


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_detections(tmp_path / "nope", "test", ["cat"])


@pytest.mark.parametrize(
    "split, name", [("test", "x/../../../../tmp/ESCAPED"), ("test", ".."), ("../up", "dog"), ("test", "a\x00b")]
)
def test_file_names_never_lead_out_of_the_results_folder(split, name):
    with pytest.raises(ValueError, match="cannot be part of a file name"):
        devkit_filename(split, name)
