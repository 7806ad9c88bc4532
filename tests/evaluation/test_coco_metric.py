"""COCO's AP (pycocotools' COCOeval) of detections on VOC-layout ground truth, against hand-computed cases."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import run_cli

from rcnn.data.datasets import ImageAnnotation, VOCDataset
from rcnn.errors import UserError
from rcnn.evaluation.coco_metric import coco_evaluate, format_coco_table
from rcnn.evaluation.voc import Detections


def annotation(image_id, boxes, labels, difficult=None, size=(200, 100)) -> ImageAnnotation:
    difficult = [False] * len(labels) if difficult is None else difficult
    box_array = np.array(boxes, np.float32).reshape(-1, 4)
    return ImageAnnotation(image_id, None, size[0], size[1], box_array, tuple(labels), np.array(difficult, bool))


def dets(*rows) -> Detections:
    """Rows of (image id, score, x1, y1, x2, y2)."""
    return Detections(tuple(r[0] for r in rows), np.array([r[1] for r in rows]), np.array([r[2:] for r in rows], np.float32))


def test_one_detection_at_iou_0_72_is_a_hit_at_five_of_the_ten_thresholds():
    # Ground truth 0..100 x 0..50; the detection 0..72 x 0..50 overlaps it by 72/100: a hit at IoU 0.50 .. 0.70.
    gt = [annotation("a", [[0, 0, 100, 50]], ["cat"])]
    result = coco_evaluate({"cat": dets(("a", 0.9, 0, 0, 72, 50))}, gt, ("cat",))
    assert result.per_class["cat"] == pytest.approx({"AP": 0.5, "AP50": 1.0, "AP75": 0.0})
    assert [result.stats[key] for key in ("AP", "AP50", "AP75")] == pytest.approx([0.5, 1.0, 0.0])
    assert result.objects == {"cat": 1} and result.detections == {"cat": 1}


def test_precision_is_interpolated_at_101_recall_points_and_difficult_objects_count_neither_way():
    # Two objects; a hit, a miss, a hit: precision 1 up to recall 0.5 (51 of the 101 points), 2/3 after (50 points).
    # A detection on the object marked difficult, scored highest, is neither a hit nor a false positive.
    gt = [annotation("a", [[0, 0, 50, 50], [100, 0, 150, 50], [60, 60, 90, 90]], ["dog"] * 3, [False, False, True])]
    found = dets(("a", 0.95, 60, 60, 90, 90), ("a", 0.9, 0, 0, 50, 50), ("a", 0.8, 160, 60, 190, 90), ("a", 0.7, 100, 0, 150, 50))
    result = coco_evaluate({"dog": found}, gt, ("dog", "bird"))
    expected = (51 + 50 * 2 / 3) / 101
    assert result.per_class["dog"] == pytest.approx({"AP": expected, "AP50": expected, "AP75": expected})
    assert np.isnan(result.per_class["bird"]["AP"])  # no objects: n/a, and out of the mean
    assert result.mAP == pytest.approx(expected) and result.objects == {"dog": 2, "bird": 0}
    table = format_coco_table(result)
    assert f"{expected:.4f}" in table and "n/a" in table and "(COCO AP, IoU 0.50:0.05:0.95)" in table
    payload = result.to_json()
    assert payload["metric"] == "coco" and payload["per_class"]["bird"] is None
    assert payload["per_class_AP50"]["dog"] == pytest.approx(expected) and payload["stats"]["AP"] == pytest.approx(expected)


def test_only_the_100_best_detections_of_an_image_count():
    # 101 detections of one image: 100 misses scored above the one hit, which COCO's cap leaves out.
    gt = [annotation("a", [[0, 0, 10, 10]], ["cat"], size=(400, 400))]
    misses = [("a", 1.0 - k / 1000, 100 + k, 100, 110 + k, 110) for k in range(100)]
    assert coco_evaluate({"cat": dets(*misses, ("a", 0.5, 0, 0, 10, 10))}, gt, ("cat",)).mAP == 0.0
    assert coco_evaluate({"cat": dets(*misses[:99], ("a", 0.5, 0, 0, 10, 10))}, gt, ("cat",)).mAP == pytest.approx(0.01)


def test_without_pycocotools_the_metric_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(UserError, match="needs pycocotools: python -m pip install pycocotools"):
        coco_evaluate({}, [annotation("a", [[0, 0, 10, 10]], ["cat"])], ("cat",))


def test_evaluate_devkit_files_with_the_coco_metric(tiny_voc, tmp_path, capsys):
    # Every object of the split found exactly (AP 1), written as devkit files (1-based inclusive pixels).
    dataset = VOCDataset(tiny_voc, "test")
    lines: dict[str, list[str]] = {}
    for ann in dataset.annotations():
        for (x1, y1, x2, y2), name in zip(ann.boxes.tolist(), ann.labels):
            lines.setdefault(name, []).append(f"{ann.image_id} 0.9 {x1 + 1:g} {y1 + 1:g} {x2:g} {y2:g}")
    for name, rows in lines.items():
        (tmp_path / f"comp4_det_test_{name}.txt").write_text("\n".join(rows) + "\n")
    argv = ["evaluate", "--data", str(tiny_voc), "--detections", str(tmp_path), "--metric", "coco"]
    code, out, err = run_cli([*argv, "--json", str(tmp_path / "coco.json")], capsys)
    assert code == 0, err
    assert "  mAP               1.0000  1.0000  1.0000   (COCO AP, IoU 0.50:0.05:0.95)" in out
    payload = json.loads((tmp_path / "coco.json").read_text())
    assert payload["mAP"] == 1.0 and set(payload["per_class"]) == set(lines)


def test_with_no_object_to_score_the_mean_is_nan_not_cocos_minus_one():
    gt = [annotation("a", [[0, 0, 10, 10]], ["cat"], difficult=[True])]  # a crowd region only
    result = coco_evaluate({"cat": dets(("a", 0.9, 0, 0, 10, 10))}, gt, ("cat",))
    assert result.stats["AP"] == -1 and np.isnan(result.mAP) and result.to_json()["mAP"] is None
    assert "  mAP                  n/a     n/a     n/a" in format_coco_table(result)
