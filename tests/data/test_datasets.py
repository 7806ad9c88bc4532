"""VOC reader: coordinate conversion, difficult flags and clear errors for bad files."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from rcnn.data.datasets import VOCDataset, check_pipeline_data, find_bad_images, load_image, parse_voc_xml
from rcnn.errors import UserError

XML = """<annotation><size><width>50</width><height>40</height><depth>3</depth></size>
<object><name>cat</name><difficult>0</difficult>
<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>20</ymax></bndbox></object>
<object><name>dog</name><difficult>1</difficult>
<bndbox><xmin>5</xmin><ymin>6</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object>
</annotation>"""


def test_voc_pixels_become_continuous_boxes(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(XML)
    ann = parse_voc_xml(p, tmp_path / "a.jpg", "a")
    # xmin=1..xmax=10 covers pixels 0..9, i.e. the continuous span [0, 10].
    np.testing.assert_array_equal(ann.boxes, np.array([[0, 0, 10, 20], [4, 5, 50, 40]], np.float32))
    assert ann.boxes.dtype == np.float32
    assert ann.labels == ("cat", "dog")
    assert ann.difficult.tolist() == [False, True]
    assert (ann.width, ann.height) == (50, 40)
    assert ann.label_indices(("dog", "cat")).tolist() == [1, 0]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("<annotation><size>", "malformed XML"),
        ("<annotation></annotation>", "missing <size>"),
        ("<annotation><size><width>a</width><height>3</height></size></annotation>", "<width> is not a number"),
        (XML.replace("<xmax>10</xmax>", "<xmax>0</xmax>"), "inverted box"),
        (XML.replace("<name>cat</name>", ""), "missing <name>"),
    ],
)
def test_bad_xml_is_a_user_error_naming_the_file(tmp_path, text, needle):
    p = tmp_path / "bad.xml"
    p.write_text(text)
    with pytest.raises(UserError, match=needle) as e:
        parse_voc_xml(p, tmp_path / "bad.jpg", "bad")
    assert "bad.xml" in str(e.value)


def test_dataset_reads_split_and_checks(tiny_voc):
    ds = VOCDataset(tiny_voc, "trainval")
    assert len(ds) > 0
    ds.check()
    ann = ds.annotation(ds.ids[0])
    image = load_image(ann)
    assert image.shape == (ann.height, ann.width, 3)
    assert set(ds.classes()) <= {"circle", "square", "triangle", "star", "cross"}
    assert len(ds.fingerprint) == 32


def test_missing_root_split_and_image(voc_copy, tmp_path):
    with pytest.raises(UserError, match="dataset root .* does not exist"):
        VOCDataset(tmp_path / "nowhere", "trainval")
    with pytest.raises(UserError, match="split file .*nosplit.txt"):
        VOCDataset(voc_copy, "nosplit")
    ds = VOCDataset(voc_copy, "test")
    (voc_copy / "JPEGImages" / f"{ds.ids[0]}.jpg").unlink()
    with pytest.raises(UserError, match="listed in .* but missing"):
        ds.check()


def test_unknown_class_and_size_mismatch(voc_copy):
    ds = VOCDataset(voc_copy, "trainval")
    with pytest.raises(UserError, match="not in the pipeline's class list"):
        ds.check(classes=("nothing",))
    image_id = ds.ids[0]
    xml = voc_copy / "Annotations" / f"{image_id}.xml"
    xml.write_text(xml.read_text().replace("<width>96</width>", "<width>97</width>"))
    fresh = VOCDataset(voc_copy, "trainval")
    with pytest.raises(UserError, match="is 96x96 but its annotation says 97x96"):
        load_image(fresh.annotation(image_id))


def test_ids_escaping_the_root_are_refused(voc_copy):
    (voc_copy / "ImageSets" / "Main" / "evil.txt").write_text("../../etc/passwd\n")
    with pytest.raises(UserError, match="not a plain file name"):
        VOCDataset(voc_copy, "evil")


@pytest.mark.parametrize(
    "name, why", [("x/../../../../tmp/ESCAPED", "'/'"), ("..", "folder"), ("a\\b", "'\\'"), ("a\tb", "control")]
)
def test_class_names_that_cannot_be_file_names_are_refused_naming_the_file(tmp_path, name, why):
    p = tmp_path / "a.xml"
    p.write_text(XML.replace("<name>dog</name>", f"<name>{name}</name>"))
    with pytest.raises(UserError, match="cannot be a file name") as e:
        parse_voc_xml(p, tmp_path / "a.jpg", "a")
    assert str(e.value).startswith(str(p)) and why in str(e.value) and "\n" not in str(e.value)


def test_class_name_refusal_says_why(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(XML.replace("<name>dog</name>", "<name>x/../../../../tmp/ESCAPED</name>"))
    escaped = re.escape("a.xml: object 1 has class name 'x/../../../../tmp/ESCAPED', which cannot be a file name (it contains '/")
    with pytest.raises(UserError, match=escaped):
        parse_voc_xml(p, tmp_path / "a.jpg", "a")


def test_an_id_with_a_space_says_so_instead_of_missing(voc_copy):
    split = voc_copy / "ImageSets" / "Main" / "spaced.txt"
    split.write_text("000002\nmy image\n")
    with pytest.raises(UserError, match=r"spaced\.txt, line 2: 'my image' is not one image id; ids cannot contain whitespace"):
        VOCDataset(voc_copy, "spaced")
    # VOC's per-class layout, ``<id> <-1|0|1>``, is still one id per line.
    split.write_text("000002 -1\n000004  1\n000005 0\n")
    assert VOCDataset(voc_copy, "spaced").ids == ["000002", "000004", "000005"]


@pytest.mark.parametrize("split", ["../../outside", "a\\b", ".."])
def test_split_names_that_are_not_plain_file_names_are_refused(voc_copy, split):
    with pytest.raises(UserError, match="split name .* cannot be a file name"):
        VOCDataset(voc_copy, split)


def _mark_difficult(voc, split: str, cls: str) -> None:
    for image_id in VOCDataset(voc, split).ids:
        xml = voc / "Annotations" / f"{image_id}.xml"
        text = xml.read_text()
        parts = text.split("<object>")
        for k, part in enumerate(parts[1:], start=1):
            if f"<name>{cls}</name>" in part:
                parts[k] = part.replace("<difficult>0</difficult>", "<difficult>1</difficult>")
        xml.write_text("<object>".join(parts))


def test_pipeline_data_check_names_classes_without_training_objects(voc_copy):
    trainval, test = VOCDataset(voc_copy, "trainval"), VOCDataset(voc_copy, "test")
    found = trainval.classes()
    check_pipeline_data(trainval, test, found)
    with pytest.raises(UserError, match=r"^class unicorn has no object to train on in split 'trainval'"):
        check_pipeline_data(trainval, test, (*found, "unicorn"))
    with pytest.raises(UserError, match=r"^classes unicorn, zebra have no object"):
        check_pipeline_data(trainval, test, (*found, "unicorn", "zebra"))
    # A class whose every training object is marked difficult has nothing to train on either, unless asked.
    _mark_difficult(voc_copy, "trainval", "star")
    trainval = VOCDataset(voc_copy, "trainval")
    assert "star" in trainval.classes()
    with pytest.raises(UserError, match=r"^class star has no object .*\(star: only objects marked difficult; data.use_difficult"):
        check_pipeline_data(trainval, test, found, use_difficult=False)
    check_pipeline_data(trainval, test, found)  # R-CNN's default: difficult objects are trained on


def test_pipeline_data_check_reads_both_splits_and_the_class_list(voc_copy):
    trainval, test = VOCDataset(voc_copy, "trainval"), VOCDataset(voc_copy, "test")
    found = trainval.classes()
    with pytest.raises(UserError, match=r"class name 'a/b' of the pipeline's class list cannot be a file name"):
        check_pipeline_data(trainval, test, (*found, "a/b"))
    (voc_copy / "Annotations" / f"{test.ids[-1]}.xml").write_text("<annotation>")
    with pytest.raises(UserError, match=rf"{test.ids[-1]}\.xml: malformed XML"):
        check_pipeline_data(trainval, VOCDataset(voc_copy, "test"), found)


def test_fingerprint_changes_with_content(voc_copy):
    before = VOCDataset(voc_copy, "test").fingerprint
    image_id = VOCDataset(voc_copy, "test").ids[0]
    xml = voc_copy / "Annotations" / f"{image_id}.xml"
    xml.write_text(xml.read_text() + " ")
    assert VOCDataset(voc_copy, "test").fingerprint != before


def test_bad_images_are_found_skipped_and_change_the_fingerprint(voc_copy):
    clean = VOCDataset(voc_copy, "trainval")
    before, bad = clean.fingerprint, clean.ids[0]
    image = voc_copy / "JPEGImages" / f"{bad}.jpg"
    saved = image.read_bytes()
    image.write_bytes(saved[:-200])
    found = find_bad_images(VOCDataset(voc_copy, "trainval"), classes=None, known_good=set())
    assert list(found) == [bad] and "truncated JPEG" in found[bad]
    kept = VOCDataset(voc_copy, "trainval", skip=found)
    assert kept.ids == clean.ids[1:] and kept.skipped == found
    assert kept.fingerprint != before
    image.write_bytes(saved)
    assert find_bad_images(VOCDataset(voc_copy, "trainval")) == {}
    # Nothing skipped: the same fingerprint as a dataset read without skipping.
    assert VOCDataset(voc_copy, "trainval", skip={}).fingerprint == before


def test_images_under_other_suffixes_are_found_and_a_missing_one_says_where_it_looked(voc_copy):
    ds = VOCDataset(voc_copy, "trainval")
    first, second = ds.ids[:2]
    jpg = voc_copy / "JPEGImages" / f"{first}.jpg"
    png = jpg.with_suffix(".PNG")
    png.write_bytes(cv2.imencode(".png", cv2.imread(str(jpg)))[1].tobytes())
    jpg.unlink()
    (voc_copy / "JPEGImages" / f"{second}.jpg").unlink()
    ds = VOCDataset(voc_copy, "trainval")
    assert ds.image_path(first) == png and ds.problem(first) is None and ds.decode_problem(first) is None
    assert ds.problem(second) == (
        f"image '{voc_copy / 'JPEGImages' / second}.jpg' is listed in {ds.split_file} but missing "
        f"(nor is there {second} with .jpeg, .png, .bmp, .tif, .tiff, .webp)"
    )


def test_a_byte_order_mark_in_a_split_file_is_not_part_of_the_first_id(voc_copy):
    split = voc_copy / "ImageSets" / "Main" / "trainval.txt"
    ids = VOCDataset(voc_copy, "trainval").ids
    split.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(ids).encode())
    assert VOCDataset(voc_copy, "trainval").ids == ids


def test_ids_written_with_their_extension_get_a_hint(voc_copy):
    split = voc_copy / "ImageSets" / "Main" / "trainval.txt"
    first = VOCDataset(voc_copy, "trainval").ids[0]
    split.write_text(f"{first}.jpg\n")
    problem = VOCDataset(voc_copy, "trainval").problem(f"{first}.jpg")
    assert problem.endswith(f"is missing (listed in the split file); split files list ids without an extension ('{first}')")


def test_a_class_name_differing_in_case_gets_a_suggestion(voc_copy):
    ds = VOCDataset(voc_copy, "trainval")
    image_id = ds.ids[0]
    name = ds.annotation(image_id).labels[0]
    others = tuple(c for c in ds.classes() if c != name)
    problem = ds.problem(image_id, (*others, name.upper()))
    assert problem.endswith(f"did you mean '{name.upper()}'?")
    advice = (
        "add it to data.classes (a class needs objects in trainval to be learnt), or rename or remove the object, "
        "or set data.other_classes: ignore to leave such objects out"
    )
    assert ds.problem(image_id, others).endswith(advice)


def test_a_test_split_with_nothing_to_score_is_refused(voc_copy):
    trainval, test = VOCDataset(voc_copy, "trainval"), VOCDataset(voc_copy, "test")
    for cls in test.classes():
        _mark_difficult(voc_copy, "test", cls)
    with pytest.raises(UserError, match=r"^split 'test' of .* has no object to score \(none, or only objects marked difficult"):
        check_pipeline_data(trainval, VOCDataset(voc_copy, "test"), trainval.classes())


def test_a_turned_photo_whose_size_disagrees_names_its_exif_tag(voc_copy):
    import dataclasses

    from PIL import Image

    ds = VOCDataset(voc_copy, "trainval")
    ann = ds.annotation(ds.ids[0])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 30 wide and 20 high; viewers show it turned, 20 wide and 30 high
    Image.new("RGB", (30, 20), (90, 90, 90)).save(ann.path, exif=exif)
    as_displayed = dataclasses.replace(ann, width=20, height=30)
    turned = r"is 30x20 but its annotation says 20x30 \(its EXIF orientation tag shows it turned 90° clockwise"
    with pytest.raises(UserError, match=turned):
        load_image(as_displayed)
    Image.new("RGB", (30, 20), (90, 90, 90)).save(ann.path)  # no tag: no hint
    with pytest.raises(UserError, match=r"annotation says 20x30$"):
        load_image(as_displayed)


def test_classes_differing_only_in_case_are_refused(voc_copy):
    # Their devkit files and plots would be one file on a case-insensitive filesystem.
    trainval, test = VOCDataset(voc_copy, "trainval"), VOCDataset(voc_copy, "test")
    found = trainval.classes()
    with pytest.raises(UserError, match=rf"^classes '{found[0]}', '{found[0].upper()}' differ only in case"):
        check_pipeline_data(trainval, test, (*found, found[0].upper()))


def test_only_keeps_the_listed_classes_objects(voc_copy):
    full = VOCDataset(voc_copy, "trainval")
    keep = full.classes()[:2]
    only = VOCDataset(voc_copy, "trainval", only=keep)
    assert only.classes() == keep
    for image_id in full.ids:
        a, b = full.annotation(image_id), only.annotation(image_id)
        mask = [name in keep for name in a.labels]
        assert b.labels == tuple(n for n, k in zip(a.labels, mask) if k)
        np.testing.assert_array_equal(b.boxes, a.boxes[mask])
        np.testing.assert_array_equal(b.difficult, a.difficult[mask])
        assert only.problem(image_id, keep) is None
    assert only.fingerprint == full.fingerprint  # the same files: what is left out is the configuration's doing
