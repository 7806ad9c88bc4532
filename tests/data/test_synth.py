"""Tests for the synthetic VOC-layout dataset generator."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_cli

from rcnn.data import synth
from rcnn.data.synth import SYNTH_CLASSES, SynthObject, generate_dataset, render_image
from rcnn.errors import UserError

N_IMAGES = 30
SIZE = 128


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_split(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def _parse(xml_path: Path) -> ET.Element:
    return ET.parse(xml_path).getroot()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "voc"
    summary = generate_dataset(root, n_images=N_IMAGES, seed=3, size=SIZE, progress=False)
    return root, summary


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = _files(Path(generate_dataset(tmp_path / "a", 4, seed=7, size=96, progress=False)["root"]))
    b = _files(Path(generate_dataset(tmp_path / "b", 4, seed=7, size=96, progress=False)["root"]))
    c = _files(Path(generate_dataset(tmp_path / "c", 4, seed=8, size=96, progress=False)["root"]))
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.startswith("JPEGImages"))


def test_image_does_not_depend_on_number_generated(tmp_path):
    generate_dataset(tmp_path / "few", 2, size=64, progress=False)
    generate_dataset(tmp_path / "many", 5, size=64, progress=False)
    few, many = _files(tmp_path / "few"), _files(tmp_path / "many")
    for name in ("000001", "000002"):
        assert few[f"JPEGImages/{name}.jpg"] == many[f"JPEGImages/{name}.jpg"]
        assert few[f"Annotations/{name}.xml"] == many[f"Annotations/{name}.xml"]


def test_layout_and_splits(dataset):
    root, summary = dataset
    ids = [f"{i:06d}" for i in range(1, N_IMAGES + 1)]
    assert sorted(p.stem for p in (root / "JPEGImages").glob("*.jpg")) == ids
    assert sorted(p.stem for p in (root / "Annotations").glob("*.xml")) == ids
    trainval, test = _read_split(root, "trainval"), _read_split(root, "test")
    assert not set(trainval) & set(test)
    assert sorted(trainval + test) == ids
    assert len(test) == round(N_IMAGES / 3)
    assert summary["splits"] == {"trainval": len(trainval), "test": len(test)}
    assert not list(root.parent.glob("voc.tmp-*"))
    image = cv2.imread(str(root / "JPEGImages" / "000001.jpg"))
    assert image.shape == (SIZE, SIZE, 3)


def test_annotations_are_valid_voc(dataset):
    root, summary = dataset
    counts = dict.fromkeys(SYNTH_CLASSES, 0)
    for xml_path in sorted((root / "Annotations").glob("*.xml")):
        ann = _parse(xml_path)
        assert ann.findtext("filename") == f"{xml_path.stem}.jpg"
        assert [int(ann.findtext(f"size/{k}")) for k in ("width", "height", "depth")] == [SIZE, SIZE, 3]
        assert ann.findtext("segmented") == "0"
        objects = ann.findall("object")
        assert 1 <= len(objects) <= 6
        for obj in objects:
            assert obj.findtext("name") in SYNTH_CLASSES
            assert obj.findtext("pose") == "Unspecified"
            assert obj.findtext("truncated") in ("0", "1")
            assert obj.findtext("difficult") in ("0", "1")
            xmin, ymin, xmax, ymax = (int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            assert 1 <= xmin <= xmax <= SIZE
            assert 1 <= ymin <= ymax <= SIZE
            if obj.findtext("truncated") == "1":
                assert min(xmin, ymin) == 1 or max(xmax, ymax) == SIZE
            counts[obj.findtext("name")] += 1
    assert counts == summary["objects"]
    assert all(n > 0 for n in counts.values())


def test_voc_boxes_are_one_based_inclusive():
    # An object on 0-based columns 3..9 and rows 5..6 is (x1, y1, x2, y2) = (3, 5, 10, 7).
    mask = np.zeros((64, 64), bool)
    mask[5:7, 3:10] = True
    obj = SynthObject("square", synth.mask_box(mask), False, True, mask)
    np.testing.assert_array_equal(obj.box, [3, 5, 10, 7])
    bnd = ET.fromstring(synth.voc_annotation("000042", 64, [obj])).find("object/bndbox")
    assert [int(bnd.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")] == [4, 6, 10, 7]


def test_coverage_of_rectangle_matches_hand_computed_areas():
    rect = np.array([[10.25, 4.0], [20.75, 4.0], [20.75, 8.5], [10.25, 8.5]])
    cover = synth.polygon_coverage(rect, 32)
    assert cover[5, 10] == pytest.approx(0.75) and cover[5, 20] == pytest.approx(0.75)
    assert cover[8, 15] == pytest.approx(0.5) and cover[6, 11:20].min() == 1.0
    assert cover.sum() == pytest.approx(10.5 * 4.5)
    np.testing.assert_array_equal(synth.mask_box(cover >= 0.5), [10, 4, 21, 9])


def _inside(poly: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Even-odd ray casting: which points (x, y) lie inside polygon ``poly [K, 2]``."""
    inside = np.zeros(x.shape, bool)
    for (xa, ya), (xb, yb) in zip(poly, np.roll(poly, -1, axis=0)):
        crosses = (ya > y) != (yb > y)
        x_cross = xa + (y - ya) * (xb - xa) / np.where(yb == ya, 1.0, yb - ya)
        inside ^= crosses & (x < x_cross)
    return inside


@pytest.mark.parametrize("name", SYNTH_CLASSES)
def test_coverage_matches_brute_force_sampling(name):
    poly = synth.shape_polygon(name, radius=20, angle=0.3, aspect=1.2) + [31.7, 30.2]
    cover = synth.polygon_coverage(poly, 64)
    n = 12  # oracle samples per pixel side
    y, x = np.mgrid[0 : 64 * n, 0 : 64 * n]
    oracle = _inside(poly, (x + 0.5) / n, (y + 0.5) / n).reshape(64, n, 64, n).mean(axis=(1, 3))
    error = np.abs(cover - oracle)
    assert error.max() < 0.3 and error.mean() < 0.005
    assert cover.sum() == pytest.approx(oracle.sum(), rel=0.01)
    # Masks may disagree only on pixels the shape covers by roughly half.
    disagree = (cover >= 0.5) != (oracle >= 0.5)
    assert np.all(np.abs(oracle[disagree] - 0.5) < 0.25)


def test_shapes_fit_their_radius():
    for name in SYNTH_CLASSES:
        pts = synth.shape_polygon(name, radius=10.0, angle=1.0)
        assert np.linalg.norm(pts, axis=1).max() == pytest.approx(10.0)


def test_render_image_boxes_are_tight_around_masks():
    rng = np.random.default_rng(11)
    for _ in range(20):
        image, objects = render_image(rng, 96)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        assert 1 <= len(objects) <= 6
        for obj in objects:
            rows, cols = np.nonzero(obj.mask)
            np.testing.assert_array_equal(obj.box, [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])


def test_objects_stay_mostly_visible():
    rng = np.random.default_rng(5)
    for _ in range(20):
        _, objects = render_image(rng, 128)
        for i, obj in enumerate(objects):
            later = np.zeros_like(obj.mask)
            for other in objects[i + 1 :]:
                later |= other.mask
            assert (obj.mask & ~later).sum() >= 0.55 * obj.mask.sum()


def test_class_is_not_predictable_from_colour():
    rng = np.random.default_rng(0)
    colours, labels = [], []
    for _ in range(60):
        image, objects = render_image(rng, 96)
        for i, obj in enumerate(objects):
            visible = obj.mask.copy()
            for other in objects[i + 1 :]:
                visible &= ~other.mask
            colours.append(image[visible].mean(axis=0))
            labels.append(SYNTH_CLASSES.index(obj.name))
    colours, labels = np.array(colours), np.array(labels)
    half = len(labels) // 2
    means = np.array([colours[:half][labels[:half] == k].mean(axis=0) for k in range(len(SYNTH_CLASSES))])
    # Nearest class-mean colour classifier, fitted on one half and scored on the other.
    guess = np.argmin(np.linalg.norm(colours[half:, None] - means[None], axis=2), axis=1)
    accuracy = (guess == labels[half:]).mean()
    assert accuracy < 0.4, f"colour predicts class with accuracy {accuracy:.2f} (chance 0.2)"


def test_refuses_non_empty_root(tmp_path):
    root = tmp_path / "taken"
    root.mkdir()
    (root / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty folder"):
        generate_dataset(root, 2, size=64, progress=False)
    assert [p.name for p in root.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_accepts_existing_empty_root(tmp_path):
    (tmp_path / "empty").mkdir()
    generate_dataset(tmp_path / "empty", 2, size=64, progress=False)
    assert (tmp_path / "empty" / "ImageSets" / "Main" / "test.txt").read_text().split() != []


def test_failed_run_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def failing(rng, size):
        calls.append(size)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return render_image(rng, size)

    monkeypatch.setattr(synth, "render_image", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "ds", 4, size=64, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    # Under a file (or in /proc) it was a FileNotFoundError / NotADirectoryError traceback.
    (tmp_path / "file").write_text("mine")
    code, out, err = run_cli(["data", "synth", str(tmp_path / "file" / "ds"), "--images", "2", "--size", "64", "--quiet"], capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"rcnn: error: cannot write dataset folder {tmp_path / 'file' / 'ds'}: Not a directory"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"n_images": 1}, "--images"),
        ({"size": 32}, "--size"),
        ({"test_fraction": 0.0}, "--test-fraction"),
        ({"test_fraction": 1.0}, "--test-fraction"),
        ({"seed": -1}, "--seed"),
    ],
)
def test_argument_validation(tmp_path, kwargs, option):
    with pytest.raises(UserError, match=option):
        generate_dataset(tmp_path / "ds", **{"n_images": 3, "size": 64, "progress": False, **kwargs})
    assert not (tmp_path / "ds").exists()


def test_two_first_runs_at_once_share_the_data_one_of_them_generated(tmp_path, monkeypatch, capsys):
    # The second to finish found the folder made meanwhile: "cannot write dataset folder …: Directory not empty".
    from rcnn.commands.shared import make_context
    from rcnn.data import synth
    from rcnn.stages.prepare import ensure_data

    overrides = ("data.synthetic.images=6", "data.synthetic.size=64")
    ctx = make_context("demo", str(tmp_path / "runs"), overrides, None, quiet=True)
    logs = []
    ctx.log = logs.append
    real, calls = synth._write_dataset, []

    def other_process_first(out, *args):
        calls.append(out)
        if len(calls) == 1:
            synth.generate_dataset(ctx.data_root, 6, 0, 64, progress=False)  # the other run, finishing first
        return real(out, *args)

    monkeypatch.setattr(synth, "_write_dataset", other_process_first)
    ensure_data(ctx)
    assert "was generated meanwhile by another rcnn process; using it" in logs[-1]
    assert len(ctx.dataset("trainval")) + len(ctx.dataset("test")) == 6
    assert [p.name for p in ctx.data_root.parent.iterdir()] == [ctx.data_root.name]  # no temporary folder left
