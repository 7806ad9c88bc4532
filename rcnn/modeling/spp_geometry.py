"""SPP-net's geometry: the image scales conv maps are computed at, the scale each window is pooled from,
and how a window in image pixels maps onto conv-map cells (He et al. 2014, appendix A)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rcnn.structures.boxes import as_boxes, box_area

#: The paper's single-scale setting: shorter image side 688.
SINGLE_SCALE: tuple[int, ...] = (688,)


#: The paper's multi-scale setting: shorter image side s in {480, 576, 688, 864, 1200}.
MULTI_SCALES: tuple[int, ...] = (480, 576, 688, 864, 1200)


#: Each window is pooled at the scale where its area is closest to 224 x 224, the networks' training size.
TARGET_SIZE = 224


def map_windows(boxes, stride: int, feature_h: int, feature_w: int, offset: float = 0.0) -> np.ndarray:
    """Map image windows to inclusive rectangles of feature-map cells (the paper's appendix A).

    The paper pads every layer by ``floor(p/2)`` for a ``p x p`` filter, so that the response at
    0-based cell ``x'`` has its receptive field centred on 0-based image *pixel index* ``S x'``
    (``S`` = ``stride``, the product of all strides). A window's left corner pixel ``x`` maps to cell
    ``floor(x / S) + 1`` and its right corner pixel to ``ceil(x / S) - 1``: the kept cells are those
    whose centre lies strictly between the window's two corner pixels.

    In this project's continuous convention pixel index ``i`` spans ``[i, i + 1]``, so cell ``j``'s
    receptive-field centre is at ``S j + 1/2`` and a box ``(x1, x2)`` has corner pixels ``x1`` and
    ``x2 - 1``. Hence, per axis::

        left  = floor(x1 / S) + 1
        right = ceil((x2 - 1) / S) - 1

    i.e. the cells with ``x1 + 1/2 < S j + 1/2 < x2 - 1/2``. For example, with ``S = 16`` the
    window ``x1 = 0, x2 = 224`` maps to cells 1..13 (cell 0's centre sits exactly on the corner pixel
    0 and is excluded by the strict inequality; cell 14's centre is pixel 224, outside the window).
    Non-integer coordinates (boxes scaled to a resized image) use the same formulas.

    Degenerate windows: when no cell centre lies inside (``right < left``: windows narrower than
    about ``S`` pixels, empty or inverted boxes), the window collapses to the single cell whose centre
    is nearest the window's centre, ``floor((x1 + x2 - 1) / (2 S) + 1/2)`` (halves round up). Finally
    both ends are clamped to ``[0, feature_w - 1]`` (``[0, feature_h - 1]`` for y), so windows partly
    or wholly outside the map still give a rectangle of at least 1 x 1 cells inside it.

    Args:
        boxes: ``[N, 4]`` windows in ``(x1, y1, x2, y2)`` continuous pixel coordinates of the image
            the feature map was computed from (numpy array or tensor).
        stride: the trunk's total stride ``S`` (:attr:`rcnn.modeling.models.BackboneSpec.stride`).
        feature_h, feature_w: size of the feature map, in cells.
        offset: where the trunk centres cell 0, as an image pixel index (cell ``j`` on ``S j + offset``;
            :attr:`rcnn.modeling.models.BackboneSpec.offset`). The formulas above are for the paper's padding,
            offset 0; "if the padding is not floor(p/2), we need to add a proper offset": they are
            applied to the window moved by ``-offset``, so the kept cells are still those whose
            centres lie strictly between its corner pixels.

    Returns:
        int64 ``[N, 4]`` inclusive cell rectangles ``(x1, y1, x2, y2)`` with
        ``0 <= x1 <= x2 < feature_w`` and ``0 <= y1 <= y2 < feature_h``.
    """
    if stride < 1 or feature_h < 1 or feature_w < 1:
        raise ValueError(f"stride and feature map size must be positive, got {stride}, {feature_h} x {feature_w}")
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().numpy()
    b = as_boxes(boxes).astype(np.float64)
    if not np.all(np.isfinite(b)):
        raise ValueError("boxes must be finite")
    first_pixel, last_pixel = b[:, :2] - offset, b[:, 2:] - 1.0 - offset
    lo = np.floor(first_pixel / stride) + 1
    hi = np.ceil(last_pixel / stride) - 1
    nearest = np.floor((first_pixel + last_pixel) / (2 * stride) + 0.5)
    empty = hi < lo
    lo = np.where(empty, nearest, lo)
    hi = np.where(empty, nearest, hi)
    limit = np.array([feature_w - 1, feature_h - 1], dtype=np.float64)
    lo = np.clip(lo, 0, limit)
    hi = np.clip(hi, 0, limit)
    return np.concatenate([lo, hi], axis=1).astype(np.int64)


def image_scales(height: int, width: int, scales: Sequence[int] = SINGLE_SCALE, max_side: float | None = None) -> list[float]:
    """Resize factor for each target shorter side: ``s / min(height, width)`` for ``s`` in ``scales``.

    ``max_side`` (not in the paper; Fast R-CNN caps at 1000) lowers a factor so that the longer side
    becomes at most ``max_side``: ``min(s / min(h, w), max_side / max(h, w))``. Scales are those of
    the paper by default: :data:`SINGLE_SCALE` (688), or :data:`MULTI_SCALES`.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be a non-empty sequence of positive sizes, got {scales}")
    factors = [s / min(height, width) for s in scales]
    if max_side is not None:
        factors = [min(f, max_side / max(height, width)) for f in factors]
    return factors


def select_scale(boxes, factors: Sequence[float], target: float = TARGET_SIZE) -> np.ndarray:
    """Index into ``factors`` of the scale at which each window's area is closest to ``target ** 2``.

    The paper's multi-scale rule: minimise ``|area * f^2 - target^2|`` with ``area = (x2 - x1) * (y2 - y1)``
    of ``boxes [N, 4]`` in the original image's ``(x1, y1, x2, y2)`` continuous pixel coordinates.
    Ties go to the smaller factor (less computation, and the paper's scales are ordered that way), so
    empty windows, which tie everywhere, take the smallest scale.

    Returns:
        int64 ``[N]`` indices into ``factors`` (not necessarily sorted).
    """
    f = np.asarray(factors, dtype=np.float64).reshape(-1)
    if len(f) == 0 or not np.all(f > 0):
        raise ValueError(f"factors must be a non-empty sequence of positive numbers, got {factors}")
    area = box_area(as_boxes(boxes).astype(np.float64))
    order = np.argsort(f, kind="stable")
    gap = np.abs(area[:, None] * f[order] ** 2 - float(target) ** 2)
    return order[np.argmin(gap, axis=1)].astype(np.int64)
