"""Every bad input of the README's table: what the user sees, through the real command line."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_pipelines
from PIL import Image

from cli import main
from rcnn.datasets import VOCDataset, decode_image


def run_proposals(voc, tmp_path, capsys) -> tuple[int, str, str]:
    pf = write_pipelines(tmp_path / "p.yaml", voc)
    with pytest.raises(SystemExit) as e:
        main(["proposals", "tiny", "--pipelines-file", str(pf), "--runs-dir", str(tmp_path / "runs"), "--quiet"])
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def first(voc, split="trainval") -> str:
    return VOCDataset(voc, split).ids[0]


def damage_truncated_jpeg(voc):
    path = voc / "JPEGImages" / f"{first(voc)}.jpg"
    path.write_bytes(path.read_bytes()[:-200])
    return "truncated JPEG"


def damage_corrupt_jpeg(voc):
    (voc / "JPEGImages" / f"{first(voc)}.jpg").write_bytes(b"this is not an image at all" * 10)
    return "cannot be decoded"


def damage_size(voc):
    xml = voc / "Annotations" / f"{first(voc)}.xml"
    xml.write_text(xml.read_text().replace("<height>96</height>", "<height>90</height>"))
    return "is 96x96 but its annotation says 96x90"


def _set_first_xmax(voc, value: str) -> None:
    xml = voc / "Annotations" / f"{first(voc)}.xml"
    text = xml.read_text()
    start, end = text.index("<xmax>") + len("<xmax>"), text.index("</xmax>")
    xml.write_text(text[:start] + value + text[end:])


def damage_outside(voc):
    _set_first_xmax(voc, "140")
    return "lies outside the 96x96 image"


def damage_inverted(voc):
    _set_first_xmax(voc, "0")
    return "inverted box"


def damage_unknown_class(voc):
    xml = voc / "Annotations" / f"{first(voc)}.xml"
    text = xml.read_text()
    start = text.index("<name>") + len("<name>")
    xml.write_text(text[:start] + "unicorn" + text[text.index("</name>") :])
    return None  # classes come from the data here; a fixed class list is tested below


def damage_duplicate_id(voc):
    split = voc / "ImageSets" / "Main" / "trainval.txt"
    split.write_text(split.read_text() + first(voc) + "\n")
    return "is listed twice"


def damage_escaping_id(voc):
    split = voc / "ImageSets" / "Main" / "trainval.txt"
    split.write_text("../../outside\n" + split.read_text())
    return "not a plain file name"


def damage_malformed_xml(voc):
    (voc / "Annotations" / f"{first(voc)}.xml").write_text("<annotation><size><width>96")
    return "malformed XML"


def damage_missing_image(voc):
    (voc / "JPEGImages" / f"{first(voc)}.jpg").unlink()
    return "is listed in"


@pytest.mark.parametrize(
    "damage",
    [
        damage_truncated_jpeg,
        damage_corrupt_jpeg,
        damage_size,
        damage_outside,
        damage_inverted,
        damage_duplicate_id,
        damage_escaping_id,
        damage_malformed_xml,
        damage_missing_image,
    ],
)
def test_refused_with_one_line_naming_the_file(damage, voc_copy, tmp_path, capsys):
    needle = damage(voc_copy)
    code, _, err = run_proposals(voc_copy, tmp_path, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0]
    assert str(voc_copy) in lines[0] or "trainval.txt" in lines[0]
    assert not (tmp_path / "runs" / "tiny" / "proposals" / "trainval" / "manifest.json").exists()


def test_unknown_class_with_a_fixed_class_list(voc_copy, tmp_path, capsys):
    damage_unknown_class(voc_copy)
    pf = write_pipelines(tmp_path / "p.yaml", voc_copy)
    pf.write_text(pf.read_text().replace("root: ", "classes: [circle, square, triangle, star, cross]\n      root: ", 1))
    with pytest.raises(SystemExit) as e:
        main(["proposals", "tiny", "--pipelines-file", str(pf), "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "'unicorn' is not in the pipeline's class list" in err


def test_image_without_objects_is_fine(voc_copy, tmp_path, capsys):
    image_id = first(voc_copy)
    xml = voc_copy / "Annotations" / f"{image_id}.xml"
    text = xml.read_text()
    xml.write_text(text[: text.index("<object>")] + "</annotation>\n")
    code, out, err = run_proposals(voc_copy, tmp_path, capsys)
    assert code == 0, err
    assert "recall" in out


def test_unusual_but_valid_images_decode_as_stored_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.jpg")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.dstack([rgb, np.full((40, 60), 100, np.uint8)])).save(tmp_path / "alpha.png")
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees": VOC boxes refer to the stored pixels, so it is ignored
    rotated.save(tmp_path / "exif.jpg", exif=exif)
    for name in ("gray.jpg", "cmyk.jpg", "alpha.png", "exif.jpg"):
        image = decode_image(tmp_path / name)
        assert image.shape == (40, 60, 3) and image.dtype == np.uint8, name
    # The PNG's colours survive, alpha dropped (BGR order inside the project).
    np.testing.assert_array_equal(decode_image(tmp_path / "alpha.png")[..., ::-1], rgb)
