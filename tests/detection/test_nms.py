"""NMS wrappers against a slow, obviously-correct greedy loop."""

from __future__ import annotations

import numpy as np
import pytest

from rcnn.detection.nms import batched_nms, nms


def iou_pair(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def greedy_nms(boxes, scores, iou_threshold, labels=None) -> list[int]:
    boxes = np.asarray(boxes, dtype=np.float64).tolist()
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])  # stable: ties by index
    keep: list[int] = []
    for i in order:
        if all(iou_pair(boxes[i], boxes[k]) <= iou_threshold for k in keep if labels is None or labels[k] == labels[i]):
            keep.append(i)
    return keep


def random_boxes(rng, n):
    xy = rng.uniform(0, 60, size=(n, 2))
    wh = rng.uniform(1, 40, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


@pytest.mark.parametrize("seed", range(30))
def test_nms_matches_greedy_loop(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    boxes = random_boxes(rng, n)
    # Half the cases draw scores from few values, so tie-breaking is exercised too.
    scores = rng.integers(0, 5, size=n).astype(np.float64) if seed % 2 else rng.random(n)
    for threshold in (0.3, 0.5, 0.7):
        keep = nms(boxes, scores, threshold)
        assert keep.dtype == np.int64
        assert keep.tolist() == greedy_nms(boxes, scores, threshold)


@pytest.mark.parametrize("seed", range(20))
def test_batched_nms_matches_greedy_loop_per_label(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 80))
    boxes = random_boxes(rng, n)
    scores = rng.integers(0, 5, size=n).astype(np.float64) if seed % 2 else rng.random(n)
    labels = rng.integers(0, 3, size=n)
    keep = batched_nms(boxes, scores, labels, 0.5)
    assert keep.dtype == np.int64
    assert keep.tolist() == greedy_nms(boxes, scores, 0.5, labels=labels.tolist())


def test_hand_case():
    # IoU(0, 1) = 50 / 100 = 0.5 exactly (box 1 is half of box 0): not above 0.5, so box 1 survives at 0.5;
    # box 2 overlaps box 0 with IoU 81/100 and goes.
    boxes = np.array([[0, 0, 10, 10], [0, 0, 5, 10], [0, 0, 9, 9]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.85])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.4).tolist() == [0]
    assert batched_nms(boxes, scores, np.array([0, 0, 1]), 0.4).tolist() == [0, 2]


def test_empty_input():
    empty = np.zeros((0, 4), np.float32)
    assert nms(empty, np.zeros(0), 0.5).shape == (0,)
    assert batched_nms(empty, np.zeros(0), np.zeros(0, np.int64), 0.5).shape == (0,)
    assert nms(empty, np.zeros(0), 0.5).dtype == np.int64


def test_length_mismatch():
    with pytest.raises(ValueError):
        nms(np.zeros((2, 4)), np.zeros(3), 0.5)
    with pytest.raises(ValueError):
        batched_nms(np.zeros((2, 4)), np.zeros(2), np.zeros(3), 0.5)
