"""False positives sorted by type (Hoiem et al. 2012, R-CNN's Figure 4), against a hand-built image."""

from __future__ import annotations

import numpy as np
import pytest

from rcnn.data.datasets import ImageAnnotation
from rcnn.evaluation.errors import TYPES, false_positive_types, type_shares
from rcnn.evaluation.voc import Detections


def test_each_false_positive_is_localisation_confusion_or_background():
    # One image: a cat, a dog and a difficult cat far away.
    boxes = np.array([[0, 0, 100, 100], [200, 0, 300, 100], [0, 300, 50, 350]], np.float32)
    ann = ImageAnnotation("a", None, 500, 400, boxes, ("cat", "dog", "cat"), np.array([False, False, True]))
    ranked = [
        (0.95, [0, 300, 50, 350]),  # on the difficult cat: neither a hit nor a false positive
        (0.9, [0, 0, 100, 100]),  # the cat: a hit
        (0.8, [2, 0, 100, 100]),  # the cat again: a duplicate, localisation
        (0.7, [0, 0, 100, 30]),  # IoU 0.3 with the cat: localisation
        (0.6, [200, 0, 300, 100]),  # on the dog: confusion
        (0.5, [400, 200, 450, 250]),  # on nothing: background
        (0.4, [0, 0, 100, 5]),  # IoU 0.05 with the cat and nothing else: background
    ]
    dets = Detections(("a",) * len(ranked), np.array([s for s, _ in ranked]), np.array([b for _, b in ranked], np.float32))
    errors = false_positive_types({"cat": dets}, [ann], ("cat", "dog"))
    assert [TYPES[t] for t in errors["cat"].types] == ["localisation"] * 2 + ["confusion"] + ["background"] * 2
    assert errors["cat"].objects == 1 and len(errors["dog"].types) == 0 and errors["dog"].objects == 1
    assert errors["cat"].counts(3).tolist() == [2, 1, 0]
    # Pooled over classes, the first `multiple` times each class's objects (at least one).
    assert type_shares(errors, 1).tolist() == [1.0, 0.0, 0.0]
    assert type_shares(errors, 5) == pytest.approx([2 / 5, 1 / 5, 2 / 5])
    assert type_shares({"dog": errors["dog"]}, 1) is None  # no false positives at all
