"""Per-image regions: ground truth first, overlaps per class; fine-tuning labels against hand cases and a loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rcnn.data.datasets import ImageAnnotation
from rcnn.training.regions import finetune_labels, image_regions, regression_rows

CLASSES = tuple(f"c{i}" for i in range(20))


def annotation() -> ImageAnnotation:
    return ImageAnnotation(
        image_id="x",
        path=Path("x.jpg"),
        width=100,
        height=100,
        boxes=np.array([[0, 0, 10, 10], [50, 50, 70, 70], [80, 80, 90, 90]], np.float32),
        labels=("cat", "dog", "cat"),
        difficult=np.array([False, False, True]),
    )


def objects(boxes, classes, difficult=None) -> ImageAnnotation:
    """An image with ``boxes`` of the given class indices into :data:`CLASSES`."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)
    return ImageAnnotation("i", Path("i.jpg"), 100, 100, boxes, tuple(CLASSES[c] for c in classes), difficult)


def labels_of(ann: ImageAnnotation, proposals, **kwargs) -> list[int]:
    regions = image_regions(ann, np.asarray(proposals, np.float32).reshape(-1, 4), CLASSES)
    return finetune_labels(regions, **kwargs).tolist()


def test_ground_truth_rows_first_and_difficult_left_out():
    props = np.array([[0, 0, 10, 5], [50, 50, 70, 68], [80, 80, 90, 90], [30, 30, 40, 40]], np.float32)
    r = image_regions(annotation(), props, ("cat", "dog"))
    assert len(r.boxes) == 2 + 4  # the difficult cat is not a ground-truth row
    assert r.gt_classes.tolist() == [0, 1, -1, -1, -1, -1]
    np.testing.assert_allclose(r.overlaps[2], [0.5, 0.0])  # half of the first cat
    np.testing.assert_allclose(r.overlaps[3], [0.0, 0.9])  # 20x18 inside 20x20
    # A proposal on the difficult object overlaps it fully, so it is never clean background.
    np.testing.assert_allclose(r.overlaps[4], [1.0, 0.0])
    assert r.best_gt.tolist() == [0, 1, 0, 1, 2, 0]
    labels = finetune_labels(r, fg_threshold=0.5, bg_low=0.1)
    assert labels.tolist() == [1, 2, 1, 2, 1, -1]
    with_difficult = image_regions(annotation(), props, ("cat", "dog"), use_difficult=True)
    assert with_difficult.gt_classes.tolist()[:3] == [0, 1, 0]


def test_image_without_objects():
    ann = ImageAnnotation("y", Path("y.jpg"), 10, 10, np.zeros((0, 4), np.float32), (), np.zeros(0, bool))
    r = image_regions(ann, np.array([[0, 0, 5, 5]], np.float32), ("cat",))
    assert r.overlaps.tolist() == [[0.0]] and r.best_gt.tolist() == [-1]
    assert finetune_labels(r).tolist() == [0]


# --- finetune_labels: hand cases ----------------------------------------------------------------

GT = objects([[0, 0, 10, 10]], [4])


def test_iou_exactly_half_is_foreground():
    # [0, 0, 10, 20] contains the gt: IoU = 100 / 200. The gt row comes first.
    assert labels_of(GT, [[0, 0, 10, 20]]) == [5, 5]


def test_just_below_half_is_background_and_below_bg_low_is_unused():
    proposals = [
        [0, 0, 10, 20.5],  # IoU 100 / 205 = 0.488
        [0, 0, 10, 100],  # IoU 0.1 exactly: kept as background with bg_low 0.1
        [0, 0, 10, 101],  # IoU 0.099
        [50, 50, 60, 60],  # IoU 0
    ]
    regions = image_regions(GT, np.array(proposals, np.float32), CLASSES)
    np.testing.assert_allclose(regions.max_overlap[1:], [100 / 205, 0.1, 100 / 1010, 0.0], rtol=1e-6)
    assert finetune_labels(regions, bg_low=0.1).tolist() == [5, 0, 0, -1, -1]
    assert finetune_labels(regions).tolist() == [5, 0, 0, 0, 0]
    # A stricter foreground threshold: the gt row alone (IoU 1) is still foreground.
    assert finetune_labels(regions, fg_threshold=1.0).tolist() == [5, 0, 0, 0, 0]


def test_best_overlapping_gt_decides_the_class():
    ann = objects([[0, 0, 10, 10], [4, 0, 14, 10]], [7, 2])
    # [3, 0, 13, 10] overlaps gt 0 by 7/13 and gt 1 by 9/11; [1, 0, 11, 10] the other way round.
    assert labels_of(ann, [[3, 0, 13, 10], [1, 0, 11, 10]]) == [8, 3, 3, 8]


def test_a_tie_between_classes_goes_to_the_lower_class_index():
    # [5, 0, 15, 10] overlaps both gts by 50 / 150 = 1/3, whichever comes first in the annotation.
    for boxes, classes in (([[0, 0, 10, 10], [10, 0, 20, 10]], [5, 3]), ([[10, 0, 20, 10], [0, 0, 10, 10]], [3, 5])):
        assert labels_of(objects(boxes, classes), [[5, 0, 15, 10]], fg_threshold=0.3)[-1] == 4


def test_ground_truth_rows_are_their_own_positives():
    ann = objects([[0, 0, 10, 10], [20, 20, 40, 30], [0, 0, 10, 10.5]], [0, 19, 0])
    assert labels_of(ann, [[100, 100, 110, 110]]) == [1, 20, 1, 0]
    assert labels_of(ann, [], fg_threshold=1.0) == [1, 20, 1]


def test_without_ground_truth_everything_is_background_unless_bg_low_is_above_zero():
    empty = objects([], [])
    proposals = [[0, 0, 10, 10], [5, 5, 50, 50]]
    assert labels_of(empty, proposals) == [0, 0]
    assert labels_of(empty, proposals, bg_low=0.1) == [-1, -1]


def test_no_rows():
    labels = finetune_labels(image_regions(objects([], []), np.zeros((0, 4), np.float32), CLASSES))
    assert labels.shape == (0,) and labels.dtype == np.int64


def test_rejects_inconsistent_thresholds():
    regions = image_regions(GT, np.zeros((0, 4), np.float32), CLASSES)
    with pytest.raises(ValueError, match="bg_low"):
        finetune_labels(regions, fg_threshold=0.5, bg_low=0.6)
    with pytest.raises(ValueError, match="bg_low"):
        finetune_labels(regions, bg_low=-0.1)


# --- finetune_labels against a loop -------------------------------------------------------------


def slow_iou(a, b) -> float:
    a, b = [float(v) for v in a], [float(v) for v in b]
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def slow_labels(ann, proposals, use_difficult, fg_threshold, bg_low) -> tuple[list[int], list[float]]:
    """Labels and best IoUs of the ground-truth rows then the proposals, one pair of boxes at a time."""
    rows = [box for box, hard in zip(ann.boxes, ann.difficult) if use_difficult or not hard] + list(proposals)
    labels, best = [], []
    for row in rows:
        best_iou, best_class = np.float32(0.0), 0
        # Classes in order and a strict '>': the lowest class index wins a tie.
        for c, name in enumerate(CLASSES):
            for box, label in zip(ann.boxes, ann.labels):  # difficult objects count for overlap
                iou = np.float32(slow_iou(row, box))
                if label == name and iou > best_iou:
                    best_iou, best_class = iou, c
        if best_iou >= np.float32(fg_threshold):
            labels.append(best_class + 1)
        elif best_iou >= np.float32(bg_low):
            labels.append(0)
        else:
            labels.append(-1)
        best.append(float(best_iou))
    return labels, best


def test_labels_match_a_loop_over_boxes():
    rng = np.random.default_rng(0)
    seen: list[int] = []
    on_threshold = 0
    for _ in range(300):
        n_gt = int(rng.integers(0, 5))
        xy = np.sort(rng.integers(0, 24, (n_gt, 2, 2)), axis=1)  # small integer boxes: exact IoUs, ties
        gt_boxes = np.stack([xy[:, 0, 0], xy[:, 0, 1], xy[:, 1, 0], xy[:, 1, 1]], axis=1).reshape(-1, 4)
        gt_classes = rng.integers(0, 3, n_gt)
        if n_gt and rng.random() < 0.3:  # the same box twice with two classes: every overlap with it is a tie
            gt_boxes, gt_classes = np.concatenate([gt_boxes, gt_boxes[:1]]), np.append(gt_classes, (gt_classes[0] + 1) % 3)
        ann = objects(gt_boxes, gt_classes, rng.random(len(gt_boxes)) < 0.3)
        xy = np.sort(rng.integers(0, 24, (int(rng.integers(0, 30)), 2, 2)), axis=1)
        proposals = np.stack([xy[:, 0, 0], xy[:, 0, 1], xy[:, 1, 0], xy[:, 1, 1]], axis=1).reshape(-1, 4)
        if n_gt:  # proposals near the objects, so that foreground and the thresholds are reached
            near = gt_boxes[rng.integers(0, len(gt_boxes), 10)] + rng.integers(-3, 4, (10, 4))
            proposals = np.concatenate([proposals, near])
        fg_threshold = float(rng.choice([0.3, 0.5, 0.7]))
        bg_low = float(rng.choice([b for b in (0.0, 0.1, 0.3) if b <= fg_threshold]))
        use_difficult = bool(rng.random() < 0.5)
        regions = image_regions(ann, proposals.astype(np.float32), CLASSES, use_difficult)
        expected, best = slow_labels(ann, proposals, use_difficult, fg_threshold, bg_low)
        assert finetune_labels(regions, fg_threshold, bg_low).tolist() == expected
        seen += expected
        on_threshold += sum(b in (np.float32(fg_threshold), np.float32(bg_low)) and b > 0 for b in best)
    assert {-1, 0}.issubset(seen) and {1, 2, 3}.issubset(seen)
    assert on_threshold > 0  # rows whose IoU is exactly a threshold were compared


def test_regression_rows_hand_case():
    """Box regression's rows (R-CNN appendix C): IoU >= min_overlap with the best object, in its class, and that
    object not difficult (unless use_difficult); ground-truth rows count, each with IoU 1."""
    ann = objects([[0, 0, 10, 10], [50, 50, 70, 70], [80, 80, 90, 90]], [3, 5, 3], difficult=[False, False, True])
    proposals = [
        [0, 0, 10, 8],  # IoU 0.8 with object 0 (class 3)
        [0, 0, 10, 5],  # IoU 0.5 with object 0: below 0.6
        [50, 50, 70, 64],  # IoU 0.7 with object 1 (class 5)
        [80, 80, 90, 89],  # IoU 0.9 with object 2, which is difficult
        [30, 30, 40, 40],  # touches nothing
    ]
    regions = image_regions(ann, np.asarray(proposals, np.float32), CLASSES)  # rows 0, 1: the two clean objects
    got = regression_rows(ann, regions.best_gt, regions.overlaps, CLASSES, 0.6)
    assert got.rows.tolist() == [0, 1, 2, 4]
    assert got.classes.tolist() == [3, 5, 3, 5]
    np.testing.assert_allclose(got.overlaps, [1.0, 1.0, 0.8, 0.7], rtol=1e-6)
    with_difficult = image_regions(ann, np.asarray(proposals, np.float32), CLASSES, use_difficult=True)
    got = regression_rows(ann, with_difficult.best_gt, with_difficult.overlaps, CLASSES, 0.6, use_difficult=True)
    assert got.rows.tolist() == [0, 1, 2, 3, 5, 6]  # the difficult object's row (2) and its proposal (6) join
    assert regression_rows(ann, regions.best_gt, regions.overlaps, CLASSES, 0.5).rows.tolist() == [0, 1, 2, 3, 4]
    empty = objects([], [])
    none = image_regions(empty, np.asarray(proposals, np.float32), CLASSES)
    assert regression_rows(empty, none.best_gt, none.overlaps, CLASSES, 0.6).rows.tolist() == []
