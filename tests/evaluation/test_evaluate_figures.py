"""The evaluate stage's precision-recall figures: drawn with matplotlib's object API, never pyplot."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from matplotlib.image import imread

from rcnn.data.datasets import ImageAnnotation
from rcnn.evaluation.scoring import ground_truth_by_class
from rcnn.evaluation.voc import Detections, evaluate
from rcnn.stages.evaluate import plot_pr_curves

CLASSES = ("cat", "dog")


def evals():
    ann = ImageAnnotation(
        "a", Path("a.jpg"), 50, 50, np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32), CLASSES, np.zeros(2, bool)
    )
    gt = ground_truth_by_class([ann], CLASSES)
    dets = {
        "cat": Detections.from_dict({"a": (np.array([[0, 0, 10, 10], [30, 30, 45, 45]], np.float32), np.array([0.9, 0.8]))}),
        "dog": Detections.from_dict({"a": (np.array([[0, 0, 10, 10], [21, 20, 40, 40]], np.float32), np.array([0.9, 0.8]))}),
    }
    return {"plain": evaluate(dets, gt), "bbox": evaluate(dets, gt)}


def test_pr_figures_are_drawn_without_pyplot(tmp_path, monkeypatch):
    # With None in sys.modules, any `import matplotlib.pyplot` raises ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = plot_pr_curves(evals(), tmp_path / "pr")
    assert len(out) == len(CLASSES) + 1  # one per class and the AP bars
    for path in out.values():
        assert path.parent == tmp_path / "pr"
        pixels = imread(path)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0  # something was drawn
