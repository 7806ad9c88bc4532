"""`rcnn data from-coco`: COCO box annotations written as a VOC-layout dataset that reads back the same boxes."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
from conftest import one_error_line, run_cli, write_pipelines

from rcnn.data.datasets import VOCDataset


def coco_of(root, split: str, classes: list[str]) -> dict:
    """A VOC split as a COCO annotation file would hold it: continuous [x, y, width, height] boxes, crowd for difficult."""
    images, annotations = [], []
    for n, ann in enumerate(VOCDataset(root, split).annotations(), start=1):
        images.append({"id": n, "file_name": ann.path.name, "width": ann.width, "height": ann.height})
        for (x1, y1, x2, y2), name, hard in zip(ann.boxes.tolist(), ann.labels, ann.difficult.tolist()):
            bbox = [x1, y1, x2 - x1, y2 - y1]
            annotations.append({"id": len(annotations) + 1, "image_id": n, "category_id": classes.index(name) + 1, "bbox": bbox})
            annotations[-1]["iscrowd"] = int(hard)
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def round_trip(tiny_voc, tmp_path, name: str, capsys) -> tuple[list[str], int, str, str]:
    """Both splits of the tiny dataset as COCO files, converted back into ``tmp_path / name``: the classes, and
    the command's exit status, stdout and stderr."""
    classes = sorted({c for split in ("trainval", "test") for c in VOCDataset(tiny_voc, split).classes()})
    argv = ["data", "from-coco", str(tmp_path / name)]
    for split in ("trainval", "test"):
        (tmp_path / f"{split}.json").write_text(json.dumps(coco_of(tiny_voc, split, classes)))
        argv += ["--split", f"{split}={tmp_path / f'{split}.json'}", "--images", f"{split}={tiny_voc / 'JPEGImages'}"]
    return classes, *run_cli(argv, capsys)


def test_voc_to_coco_and_back_gives_the_same_annotations_and_images(tiny_voc, tmp_path, capsys):
    classes, code, out, err = round_trip(tiny_voc, tmp_path, "back", capsys)
    assert code == 0 and err == "", err
    n = {split: len(VOCDataset(tiny_voc, split)) for split in ("trainval", "test")}
    assert f"trainval {n['trainval']} images" in out and f"test {n['test']} images" in out
    assert f"({n['trainval'] + n['test']} images hard-linked, 0 copied)" in out
    assert f"classes ({len(classes)}): {', '.join(classes)}" in out
    for split in ("trainval", "test"):
        original, back = VOCDataset(tiny_voc, split), VOCDataset(tmp_path / "back", split)
        back.check(tuple(classes))
        assert back.ids == original.ids
        for a, b in zip(original.annotations(), back.annotations()):
            assert (b.width, b.height, b.labels) == (a.width, a.height, a.labels)
            np.testing.assert_array_equal(b.boxes, a.boxes)
            np.testing.assert_array_equal(b.difficult, a.difficult)
            assert b.path.read_bytes() == a.path.read_bytes() and os.path.samefile(b.path, a.path)  # hard-linked


def test_boxes_are_kept_exactly_clipped_or_left_out_and_counted(tmp_path, capsys):
    export = tmp_path / "export"
    (export / "imgs" / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        cv2.imwrite(str(export / "imgs" / name), np.full((30, 40, 3), 128, np.uint8))
    boxes = {
        1: ([2.5, 3.25, 10, 5], 0),  # kept as it is
        2: ([35, 20, 10, 20], 0),  # past the right and bottom edges: clipped
        3: ([1, 1, 0.5, 4], 0),  # half a pixel wide: left out
        4: ([50, 50, 5, 5], 0),  # wholly outside: left out
        5: ([0, 0, 40, 30], 1),  # a crowd region: difficult
    }
    coco = {
        "images": [
            {"id": 7, "file_name": "imgs/a.png", "width": 40, "height": 30},
            {"id": "8", "file_name": "sub\\b.png", "width": 40.0, "height": 30},  # a string id; a path written on Windows
        ],
        "annotations": [
            {"id": k, "image_id": 7, "category_id": 3, "bbox": bbox, "iscrowd": crowd} for k, (bbox, crowd) in boxes.items()
        ],
        "categories": [{"id": 3, "name": "blood cell"}, {"id": 4, "name": "unused"}],
    }
    (export / "train.json").write_text(json.dumps(coco))
    argv = [
        "data",
        "from-coco",
        str(tmp_path / "voc"),
        "--split",
        f"train={export / 'train.json'}",
        "--images",
        f"train={export / 'imgs'}",
    ]
    code, out, err = run_cli(argv, capsys)
    assert code == 0 and err == "", err
    assert "train: 1 crowd regions marked difficult, 1 boxes clipped to their image, 2 boxes under 1 pixel left out, " in out
    assert (
        "1 images without objects (background only)" in out
        and "classes (1): blood cell\n  categories without objects (not classes a pipeline learns): unused" in out
    )
    dataset = VOCDataset(tmp_path / "voc", "train")
    assert dataset.ids == ["a", "b"]  # the file order; ids are file names without extension
    a, b = dataset.annotations()
    assert a.path.name == "a.png" and (a.width, a.height) == (40, 30) and a.labels == ("blood cell",) * 3
    np.testing.assert_array_equal(a.boxes, np.array([[2.5, 3.25, 12.5, 8.25], [35, 20, 40, 30], [0, 0, 40, 30]], np.float32))
    assert a.difficult.tolist() == [False, False, True]
    assert len(b.boxes) == 0 and b.labels == ()
    dataset.check()  # every image is there and decodes to its annotated size
    assert dataset.decode_problem("a") is None


def test_bad_coco_input_is_refused_in_one_line_and_nothing_is_written(tiny_voc, tmp_path, capsys):
    classes = sorted(VOCDataset(tiny_voc, "trainval").classes())
    good = coco_of(tiny_voc, "trainval", classes)
    images = str(tiny_voc / "JPEGImages")
    dst = tmp_path / "out"

    def refused(coco, *extra, text=None):
        path = tmp_path / "bad.json"
        path.write_text(text if text is not None else json.dumps(coco))
        argv = ["data", "from-coco", str(dst), "--split", f"trainval={path}", "--images", f"trainval={images}", *extra]
        code, _, err = run_cli(argv, capsys)
        assert code in (1, 2) and not dst.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]
        return one_error_line(err)

    assert "malformed JSON (Expecting value at line 1, column 1)" in refused(None, text="nope")
    assert "not a COCO detection file: it has no 'annotations' list" in refused({"images": [], "categories": []})
    missing = dict(good, images=[dict(good["images"][0], file_name="gone.jpg"), *good["images"][1:]])
    line = refused(missing)
    assert "gone.jpg' of " in line and line.endswith(
        "is missing; give the folder its file_name entries are relative to with --images trainval=DIR; nothing was written"
    )
    slash = dict(good, categories=[dict(good["categories"][0], name="a/b"), *good["categories"][1:]])
    assert "has name 'a/b', which cannot be a class name (it contains '/')" in refused(slash)
    twice = dict(good, categories=[*good["categories"], dict(good["categories"][0], id=99)])
    assert f"two categories are named '{classes[0]}'" in refused(twice)
    stray = dict(good, annotations=[dict(good["annotations"][0], category_id=42)])
    assert "has category 42, which 'categories' does not list" in refused(stray)
    orphan = dict(good, annotations=[dict(good["annotations"][0], image_id=42)])
    assert "is of image 42, which 'images' does not list" in refused(orphan)
    nobox = dict(good, annotations=[dict(good["annotations"][0], bbox=[1, 2, -3, 4])])
    assert "has no valid 'bbox' [x, y, width, height] (got [1, 2, -3, 4])" in refused(nobox)
    flat = dict(good, images=[dict(good["images"][0], width=0), *good["images"][1:]])
    assert "has size 0x" in refused(flat)
    # One file name twice (the same id): ids must be unique, across splits too.
    again = dict(good, images=[*good["images"], dict(good["images"][0], id=99)])
    assert f"image id '{good['images'][0]['file_name'][:-4]}' of split 'trainval'" in refused(again)
    (tmp_path / "test.json").write_text(json.dumps(good))
    both = refused(good, "--split", f"test={tmp_path / 'test.json'}", "--images", f"test={images}")
    assert "is also that of split 'trainval'" in both and "must be unique across the dataset" in both
    # Arguments, and a destination in use.
    assert "'trainval' is not NAME=JSON, e.g. trainval=train.json" in refused(good, "--split", "trainval")
    assert "split 'test' has no --split test=JSON" in refused(good, "--images", "test=somewhere")
    # Split names become ImageSets/Main/NAME.txt: one file there, nowhere else.
    for name, problem in (("a/b", "it contains '/'"), ("..", "'..' means a folder"), (".hidden", "it starts with '.'")):
        line = refused(good, "--split", f"{name}={tmp_path / 'test.json'}")
        assert f"split name {name!r} cannot be a file name ({problem}" in line, line
    # Ids with whitespace, which split files cannot hold; iscrowd other than 0 or 1.
    spaced = dict(good, images=[dict(good["images"][0], file_name="photo 1.jpg"), *good["images"][1:]])
    assert "image 'photo 1.jpg' has a name that cannot be an image id (it contains whitespace" in refused(spaced)
    text = dict(good, annotations=[dict(good["annotations"][0], iscrowd="0")])
    assert "has 'iscrowd' '0'; COCO's is 0 or 1" in refused(text)
    dst.mkdir()
    (dst / "mine.txt").write_text("mine")
    code, _, err = run_cli(["data", "from-coco", str(dst), "--split", f"trainval={tmp_path / 'test.json'}"], capsys)
    assert code == 1 and one_error_line(err) == f"rcnn: error: '{dst}' already exists and is not an empty folder; name a new one"
    assert [p.name for p in dst.iterdir()] == ["mine.txt"]


def test_a_dataset_converted_from_coco_trains_the_same_detector_as_its_voc_original(tiny_voc, tmp_path, capsys):
    assert round_trip(tiny_voc, tmp_path, "converted", capsys)[1] == 0
    results = []
    for name, root in (("voc", tiny_voc), ("coco", tmp_path / "converted")):
        pipelines = write_pipelines(tmp_path / f"{name}.yaml", root)
        code, _, err = run_cli(
            ["run", "tiny", "--pipelines-file", str(pipelines), "--runs-dir", str(tmp_path / name), "--quiet"], capsys
        )
        assert code == 0, err
        results.append(json.loads((tmp_path / name / "tiny" / "evaluate" / "test" / "results.json").read_text()))
    for key in ("mAP", "mAP_bbox", "per_class", "per_class_bbox"):
        assert results[1][key] == results[0][key], key  # the same boxes and pixels: the same numbers, to the bit
