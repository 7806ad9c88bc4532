"""The regions of one image that later stages learn from: ground-truth boxes plus proposals.

As in R-CNN's feature cache, ground-truth rows come first and every row carries
its overlap with the best ground truth of each class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rcnn.data.datasets import ImageAnnotation
from rcnn.structures.boxes import box_iou


@dataclass(frozen=True)
class ImageRegions:
    """Rows of one image.

    boxes: float32 ``[N, 4]`` (x1, y1, x2, y2); the first ``G`` rows are ground truth.
    gt_classes: int64 ``[N]``, the class index (0-based) of ground-truth rows, -1 for proposals.
    overlaps: float32 ``[N, C]``, IoU of each row with the best ground truth of each class.
    best_gt: int64 ``[N]``, index into the image's annotation of the best-overlapping
        ground truth (any class), -1 when the image has none.
    """

    boxes: np.ndarray
    gt_classes: np.ndarray
    overlaps: np.ndarray
    best_gt: np.ndarray

    @property
    def max_overlap(self) -> np.ndarray:
        """float32 ``[N]``: the best IoU of each row with any ground truth."""
        if self.overlaps.shape[1] == 0:
            return np.zeros(len(self.boxes), np.float32)
        return self.overlaps.max(axis=1)


def image_regions(
    ann: ImageAnnotation, proposals: np.ndarray, classes: tuple[str, ...], use_difficult: bool = False
) -> ImageRegions:
    """Ground-truth rows (difficult ones only if ``use_difficult``) followed by the proposals.

    Overlaps are measured against every ground truth, difficult ones included, so that a
    proposal on a difficult object is never taken as clean background.
    """
    labels = ann.label_indices(classes)
    keep_gt = np.ones(len(labels), bool) if use_difficult else ~ann.difficult
    gt_rows = ann.boxes[keep_gt]
    boxes = np.concatenate([gt_rows, np.asarray(proposals, np.float32).reshape(-1, 4)]).astype(np.float32)
    gt_classes = np.concatenate([labels[keep_gt], np.full(len(boxes) - len(gt_rows), -1, np.int64)])
    overlaps = np.zeros((len(boxes), len(classes)), np.float32)
    best_gt = np.full(len(boxes), -1, np.int64)
    if len(ann.boxes) and len(boxes):
        iou = box_iou(boxes, ann.boxes).astype(np.float32)  # [N, G]
        best_gt = iou.argmax(axis=1).astype(np.int64)
        for c in np.unique(labels):
            overlaps[:, c] = iou[:, labels == c].max(axis=1)
    return ImageRegions(boxes, gt_classes, overlaps, best_gt)


def finetune_labels(regions: ImageRegions, fg_threshold: float = 0.5, bg_low: float = 0.0) -> np.ndarray:
    """Fine-tuning labels of an image's rows (R-CNN section 2.3; SPP-net and Fast R-CNN's ``bg_low``).

    A row whose best IoU with any ground truth is ``>= fg_threshold`` gets ``1 + c``, ``c`` the class
    (0-based) with the highest IoU; ties between classes go to the lower class index. A row with best IoU
    in ``[bg_low, fg_threshold)`` is background (0); below ``bg_low`` it is unused (-1): R-CNN takes
    every other proposal as background (``bg_low = 0``), SPP-net and Fast R-CNN skip the easy ones
    (``bg_low = 0.1``). The IoU is the rows' float32 ``overlaps``, compared with the thresholds in
    float32, so an IoU of exactly 0.5 or 0.1 is on the inclusive side. Ground-truth rows have IoU 1 with
    themselves and so are positives of their own class; an image without objects has IoU 0 everywhere,
    so its rows are background while ``bg_low == 0`` and unused otherwise.

    Args:
        regions: the rows of one image, from :func:`image_regions`.
        fg_threshold: IoU from which a row is foreground (0.5 in R-CNN fine-tuning).
        bg_low: IoU below which a row is unused (0.0 in R-CNN, 0.1 in SPP-net).

    Returns:
        int64 ``[N]`` in ``{-1, 0, 1..C}``.

    Raises:
        ValueError: unless ``0 <= bg_low <= fg_threshold``.
    """
    if not 0.0 <= bg_low <= fg_threshold:
        raise ValueError(f"need 0 <= bg_low ({bg_low}) <= fg_threshold ({fg_threshold})")
    best = regions.max_overlap
    cls = regions.overlaps.argmax(axis=1) if regions.overlaps.shape[1] else np.zeros(len(best), np.int64)
    labels = np.where(best >= fg_threshold, cls + 1, 0).astype(np.int64)
    labels[best < bg_low] = -1
    return labels


@dataclass(frozen=True)
class RegressionRows:
    """The rows of one image that box regression learns from (R-CNN appendix C).

    rows: int64 ``[K]``, indices into the image's rows (ground-truth rows included), ascending.
    classes: int64 ``[K]``, the class (0-based) of each row's best ground truth.
    overlaps: float32 ``[K]``, each row's IoU with the best ground truth of that class.
    """

    rows: np.ndarray
    classes: np.ndarray
    overlaps: np.ndarray


def regression_rows(
    ann: ImageAnnotation,
    best_gt: np.ndarray,
    overlaps: np.ndarray,
    classes: tuple[str, ...],
    min_overlap: float,
    use_difficult: bool = False,
) -> RegressionRows:
    """Rows whose best ground truth is usable (not difficult unless ``use_difficult``) and overlaps them by
    at least ``min_overlap`` (R-CNN: 0.6) in its class: what stage `train-bbox` trains on and what stage
    `features` caches box regression's layer for (``features.bbox_rows: regression``), decided here once.

    Args:
        ann: the image's annotation (its objects' classes and difficult flags).
        best_gt: int64 ``[N]``, each row's best-overlapping object in ``ann`` (-1: none), as
            :func:`image_regions` gives it.
        overlaps: float32 ``[N, C]``, each row's IoU with the best object of each class.
    """
    labels = ann.label_indices(classes)
    gt = np.maximum(best_gt, 0)
    usable = best_gt >= 0
    if not use_difficult:
        usable &= ~ann.difficult[gt] if len(ann.difficult) else False
    cls = np.where(usable, labels[gt] if len(labels) else -1, -1)
    iou = np.where(cls >= 0, overlaps[np.arange(len(overlaps)), np.maximum(cls, 0)], 0.0)
    rows = np.flatnonzero((cls >= 0) & (iou >= min_overlap))
    return RegressionRows(rows.astype(np.int64), cls[rows].astype(np.int64), iou[rows])
