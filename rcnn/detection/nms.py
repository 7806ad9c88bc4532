"""Non-maximum suppression: numpy-in, numpy-out wrappers over :mod:`torchvision.ops`."""

from __future__ import annotations

import numpy as np
import torch
import torchvision

from rcnn.structures.boxes import as_boxes


def _ranked(boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Stable decreasing-score order, and the boxes and distinct rank scores in that order.

    torchvision's sort is not documented as stable, so ties are broken here, by input
    index, and torchvision only ever sees distinct scores. float64 keeps the boxes of the
    float32 convention exact and rank scores distinct.
    """
    boxes = as_boxes(boxes)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"got {len(boxes)} boxes but {len(scores)} scores")
    order = np.argsort(-scores, kind="stable")
    ranked_boxes = torch.from_numpy(boxes[order].astype(np.float64))
    rank_scores = -torch.arange(len(order), dtype=torch.float64)
    return order, ranked_boxes, rank_scores


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS: keep the best box, drop the boxes with IoU > ``iou_threshold`` to it, repeat.

    Args:
        boxes: ``[N, 4]`` in ``(x1, y1, x2, y2)``, continuous pixel coordinates, with
            ``x1 <= x2`` and ``y1 <= y2``.
        scores: ``[N]``; ties are ranked by index.
        iou_threshold: overlap above which the lower-scored box is suppressed.

    Returns:
        int64 ``[M]`` indices into ``boxes`` of the kept boxes, by decreasing score.
    """
    order, ranked_boxes, rank_scores = _ranked(boxes, scores)
    keep = torchvision.ops.nms(ranked_boxes, rank_scores, float(iou_threshold)).numpy()
    return order[np.sort(keep)].astype(np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float) -> np.ndarray:
    """:func:`nms` run separately for each label; boxes of different labels never suppress each other.

    Args:
        boxes: ``[N, 4]`` in ``(x1, y1, x2, y2)``, continuous pixel coordinates.
        scores: ``[N]``; ties are ranked by index.
        labels: ``[N]`` integer class of each box.
        iou_threshold: overlap above which the lower-scored box of a label is suppressed.

    Returns:
        int64 ``[M]`` indices into ``boxes`` of the kept boxes, by decreasing score over all labels.
    """
    labels = np.asarray(labels).reshape(-1)
    order, ranked_boxes, rank_scores = _ranked(boxes, scores)
    if len(labels) != len(order):
        raise ValueError(f"got {len(order)} boxes but {len(labels)} labels")
    ranked_labels = torch.from_numpy(labels[order].astype(np.int64))
    keep = torchvision.ops.batched_nms(ranked_boxes, rank_scores, ranked_labels, float(iou_threshold)).numpy()
    return order[np.sort(keep)].astype(np.int64)
