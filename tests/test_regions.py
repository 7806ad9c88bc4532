"""Per-image regions: ground truth first, overlaps per class, fine-tuning labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rcnn.datasets import ImageAnnotation
from rcnn.regions import finetune_labels, image_regions


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
