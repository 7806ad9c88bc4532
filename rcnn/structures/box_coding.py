"""The R-CNN box transform: proposal-relative deltas ``(tx, ty, tw, th)`` to and from boxes.

Girshick et al., "Rich feature hierarchies...", CVPR 2014, appendix C.
"""

from __future__ import annotations

import math

import numpy as np

from rcnn.structures.boxes import as_boxes

# Largest tw/th decode will exponentiate: a box at most 1000/16 = 62.5 times its
# proposal's size. Fast/Faster R-CNN and torchvision's BoxCoder use the same bound
# (``bbox_xform_clip``); R-CNN itself had none.
DELTA_CLAMP = math.log(1000.0 / 16)


def _centre_size(boxes: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Centre x, centre y, width, height (float64) of ``boxes [N, 4]``; every box must have w, h > 0."""
    b = boxes.astype(np.float64)
    if not np.isfinite(b).all():
        raise ValueError(f"{what} contain non-finite coordinates")
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    bad = np.flatnonzero((w <= 0) | (h <= 0))
    if len(bad):
        # log(0) or x / 0 would slip inf/nan into the deltas and, through them, into
        # the ridge fit; a degenerate box has no meaningful scale, so refuse it.
        i = int(bad[0])
        raise ValueError(f"{len(bad)} {what} have zero or negative width or height, e.g. row {i}: {boxes[i].tolist()}")
    return b[:, 0] + 0.5 * w, b[:, 1] + 0.5 * h, w, h


def _check_pair(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape [N, 4], got {a.shape} and {b.shape}")


def encode(proposals: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Regression targets that move each proposal onto its ground truth.

    With centre ``(Px, Py)`` and size ``(Pw, Ph)`` of a proposal and the same of its
    ground truth: ``tx = (Gx - Px) / Pw``, ``ty = (Gy - Py) / Ph``,
    ``tw = log(Gw / Pw)``, ``th = log(Gh / Ph)``. Sizes and centres follow the
    project's continuous convention, ``w = x2 - x1`` and ``cx = x1 + w / 2``, with no
    ``+1`` anywhere (the released MATLAB code used inclusive pixels, ``w = x2 - x1 + 1``).
    This equals torchvision's ``BoxCoder(weights=(1, 1, 1, 1))``.

    Args:
        proposals: ``[N, 4]`` in ``(x1, y1, x2, y2)``, continuous pixel coordinates.
        gt: ``[N, 4]`` matched ground truth, row for row, same convention.

    Returns:
        float32 ``[N, 4]`` deltas ``(tx, ty, tw, th)``, computed in float64.

    Raises:
        ValueError: on mismatched shapes, non-finite coordinates, or any proposal or
            ground-truth box with width or height <= 0.
    """
    p = as_boxes(proposals)
    g = as_boxes(gt)
    _check_pair(p, g, "proposals and gt")
    px, py, pw, ph = _centre_size(p, "proposals")
    gx, gy, gw, gh = _centre_size(g, "ground-truth boxes")
    deltas = np.stack([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)], axis=1)
    return deltas.astype(np.float32).reshape(-1, 4)


def decode(proposals: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Boxes obtained by applying ``deltas`` to ``proposals``; the inverse of :func:`encode`.

    ``Gx = Pw * tx + Px``, ``Gw = Pw * exp(tw)`` and likewise for y and h, in the
    continuous convention (``w = x2 - x1``, no ``+1``). ``tw`` and ``th`` are first
    clamped from above to :data:`DELTA_CLAMP` = ``log(1000 / 16)`` so that a wild
    regressor output cannot overflow ``exp`` to inf; boxes within that range round-trip.

    Args:
        proposals: ``[N, 4]`` in ``(x1, y1, x2, y2)``, continuous pixel coordinates;
            width and height must be > 0.
        deltas: ``[N, 4]`` ``(tx, ty, tw, th)``, finite.

    Returns:
        float32 ``[N, 4]`` boxes ``(x1, y1, x2, y2)``, not clipped to any image
        (use :func:`rcnn.structures.boxes.clip_boxes`).

    Raises:
        ValueError: on mismatched shapes, non-finite values or degenerate proposals.
    """
    p = as_boxes(proposals)
    d = np.asarray(deltas, dtype=np.float64)
    d = d.reshape(0, 4) if d.size == 0 else d
    _check_pair(p, d, "proposals and deltas")
    if not np.isfinite(d).all():
        raise ValueError("deltas contain non-finite values")
    px, py, pw, ph = _centre_size(p, "proposals")
    cx = d[:, 0] * pw + px
    cy = d[:, 1] * ph + py
    w = np.exp(np.minimum(d[:, 2], DELTA_CLAMP)) * pw
    h = np.exp(np.minimum(d[:, 3], DELTA_CLAMP)) * ph
    boxes = np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=1)
    return boxes.astype(np.float32).reshape(-1, 4)
