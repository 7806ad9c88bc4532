"""R-CNN's test-time caps (rcnn_test.m): the 100 best boxes per class and image, then the best 40 per image on
average over the set, before box regression and NMS; checked against a transcription of its loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from oracles import random_boxes

from rcnn.detection.detector import ClassDetections, per_class_nms, set_thresholds, top_by_score
from rcnn.detection.nms import nms


def rcnn_test_loop(scores_per_image: list[np.ndarray], max_per_image: int, max_per_set: int) -> list[list[np.ndarray]]:
    """rcnn_test.m's pruning, step by step: per image and class, boxes above the running threshold, the best
    ``max_per_image`` of them; the threshold rises to the ``max_per_set``-th best score kept so far; at the end,
    boxes below the final threshold go. Returns, per image and class, the indices of the boxes kept."""
    num_classes = scores_per_image[0].shape[1]
    thresh = [-math.inf] * num_classes
    top_scores: list[list[float]] = [[] for _ in range(num_classes)]
    counts = [0] * num_classes
    kept = []
    for z in scores_per_image:
        per_class = []
        for j in range(num_classes):
            candidates = [i for i in range(len(z)) if z[i, j] > thresh[j]]
            candidates.sort(key=lambda i: -z[i, j])  # MATLAB's sort(..., 'descend') is stable too
            chosen = candidates[:max_per_image]
            per_class.append(chosen)
            counts[j] += len(chosen)
            top_scores[j] = sorted(top_scores[j] + [float(z[i, j]) for i in chosen], reverse=True)
            if counts[j] > max_per_set:
                top_scores[j] = top_scores[j][:max_per_set]
                thresh[j] = top_scores[j][-1]
        kept.append(per_class)
    return [[np.array(sorted(i for i in per_class[j] if z[i, j] >= thresh[j]), int) for j in range(num_classes)]
            for z, per_class in zip(scores_per_image, kept)]  # fmt: skip


@pytest.mark.parametrize("seed", range(5))
def test_top_per_image_then_the_set_threshold_keep_what_rcnn_test_keeps(seed):
    rng = np.random.default_rng(seed)
    images = [rng.normal(size=(int(rng.integers(0, 60)), 3)).astype(np.float32) for _ in range(12)]
    top, per_set = 20, 8 * 12
    expected = rcnn_test_loop(images, top, per_set)
    candidates = [[z[top_by_score(z[:, c], top), c] for c in range(3)] for z in images]
    thresholds = set_thresholds(candidates, 3, per_set)
    for z, want in zip(images, expected):
        for c in range(3):
            chosen = np.arange(len(z))[top_by_score(z[:, c], top)]
            got = chosen[z[chosen, c] >= thresholds[c]]
            np.testing.assert_array_equal(got, want[c])
    assert np.isfinite(thresholds).all()  # 12 images x up to 20 boxes exceed 96: the cap binds


def test_without_enough_candidates_there_is_no_threshold():
    assert set_thresholds([[np.array([0.5, 0.1], np.float32)]], 1, 2).tolist() == [-np.inf]
    assert set_thresholds([[np.array([0.5, 0.1, 0.3], np.float32)]], 1, 2).tolist() == [np.float32(0.3)]


def test_top_by_score_keeps_box_order_and_takes_all_when_not_cut():
    s = np.array([0.1, 0.9, 0.5, 0.9, 0.2], np.float32)
    assert top_by_score(s, 3).tolist() == [1, 2, 3]
    assert top_by_score(s, 2).tolist() == [1, 3]  # the tie at 0.9: both, in box order
    assert top_by_score(s, None) == slice(None) and top_by_score(s, 5) == slice(None)


@pytest.mark.parametrize("seed", range(4))
def test_a_score_threshold_after_nms_equals_one_before_it(seed):
    """Greedy NMS lets a box be suppressed only by a better one, so thresholding its output equals running it on
    the boxes above the threshold, which is where rcnn_test.m applies the set's threshold."""
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 80, 100)
    scores = rng.normal(size=(80, 2)).astype(np.float32)
    found = per_class_nms(scores, boxes, 100, 100, 0.3, 1000, top=50)
    thresholds = np.array([0.2, -0.4], np.float32)
    after = found.at_least(thresholds)
    for c in range(2):
        sel = top_by_score(scores[:, c], 50)
        b, s = boxes[sel], scores[sel, c]
        above = s >= thresholds[c]
        keep = nms(b[above], s[above], 0.3)
        np.testing.assert_array_equal(after.boxes[c], b[above][keep])
        np.testing.assert_array_equal(after.scores[c], s[above][keep])
    assert isinstance(after, ClassDetections) and len(found.candidates[0]) == 50


def test_per_class_nms_without_a_top_is_nms_over_every_box():
    rng = np.random.default_rng(7)
    boxes = random_boxes(rng, 40, 64)
    scores = rng.normal(size=(40, 1)).astype(np.float32)
    found = per_class_nms(scores, boxes, 64, 64, 0.3, 100)
    keep = nms(boxes, scores[:, 0], 0.3)
    np.testing.assert_array_equal(found.boxes[0], boxes[keep])
    assert len(found.candidates[0]) == 40
