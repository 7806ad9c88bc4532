"""Proposal quality: recall of ground truth at IoU thresholds and (mean) average best overlap.

Follows Uijlings et al. (IJCV 2013): the best overlap of an object is the highest
IoU any proposal reaches with it; ABO averages it over a class's objects and
MABO averages ABO over classes. Difficult objects are left out, as in VOC scoring.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np

from rcnn.structures.boxes import box_iou


def best_overlaps(gt_boxes: np.ndarray, proposals: np.ndarray) -> np.ndarray:
    """Best IoU ``[G]`` of each ground-truth box ``[G, 4]`` with any proposal ``[P, 4]`` (x1, y1, x2, y2)."""
    if len(gt_boxes) == 0:
        return np.zeros(0, dtype=np.float64)
    if len(proposals) == 0:
        return np.zeros(len(gt_boxes), dtype=np.float64)
    return box_iou(np.asarray(gt_boxes, np.float64), np.asarray(proposals, np.float64)).max(axis=1)


def recall_summary(
    images: Iterable[tuple[np.ndarray, tuple[str, ...], np.ndarray, np.ndarray]],
    thresholds: tuple[float, ...] = (0.5, 0.7),
) -> dict:
    """Recall and MABO over images given as ``(gt_boxes, labels, difficult, proposals)``.

    Returns ``{"overall": {...}, "per_class": {name: {...}}}`` where each entry
    holds ``objects``, ``recall@T`` for each threshold and ``abo``; ``overall``
    also holds ``mabo`` (mean of the per-class ABOs).
    """
    per_class: dict[str, list[float]] = defaultdict(list)
    for gt_boxes, labels, difficult, proposals in images:
        overlaps = best_overlaps(gt_boxes, proposals)
        for ov, name, diff in zip(overlaps, labels, difficult):
            if not diff:
                per_class[name].append(float(ov))

    def stats(values: np.ndarray) -> dict:
        out = {"objects": int(len(values))}
        for t in thresholds:
            out[f"recall@{t:g}"] = float((values >= t).mean()) if len(values) else float("nan")
        out["abo"] = float(values.mean()) if len(values) else float("nan")
        return out

    classes = {name: stats(np.array(v)) for name, v in sorted(per_class.items())}
    overall = stats(np.array([v for vs in per_class.values() for v in vs]))
    overall["mabo"] = float(np.mean([c["abo"] for c in classes.values()])) if classes else float("nan")
    return {"overall": overall, "per_class": classes}
