"""Recall and MABO on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from rcnn.proposals.recall import best_overlaps, recall_summary


def test_best_overlaps_hand_case():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    props = np.array([[0, 0, 10, 5], [20, 20, 30, 30], [0, 0, 10, 10.0]], np.float32)
    np.testing.assert_allclose(best_overlaps(gt, props), [1.0, 1.0])
    np.testing.assert_allclose(best_overlaps(gt, props[:1]), [0.5, 0.0])
    assert best_overlaps(gt, np.zeros((0, 4))).tolist() == [0.0, 0.0]


def test_summary_per_class_and_difficult_excluded():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32)
    labels = ("a", "b", "b")
    difficult = np.array([False, False, True])
    # a: best IoU 0.5 (half box); b: 0.64 (8x8 inside 10x10 -> 64/100); the difficult b is ignored.
    props = np.array([[0, 0, 10, 5], [21, 21, 29, 29]], np.float32)
    s = recall_summary([(gt, labels, difficult, props)])
    assert s["per_class"]["a"] == pytest.approx({"objects": 1, "recall@0.5": 1.0, "recall@0.7": 0.0, "abo": 0.5})
    assert s["per_class"]["b"] == pytest.approx({"objects": 1, "recall@0.5": 1.0, "recall@0.7": 0.0, "abo": 0.64})
    assert s["overall"]["objects"] == 2
    assert s["overall"]["mabo"] == pytest.approx((0.5 + 0.64) / 2)
    assert s["overall"]["recall@0.5"] == 1.0
