"""Box arithmetic in the project's single convention.

Every box in the code is float32 ``(x1, y1, x2, y2)`` in continuous pixel
coordinates: the left edge of the image is ``x = 0`` and a box's width is
``x2 - x1``. PASCAL VOC files use 1-based inclusive pixel indices; the two
conversion functions below are the only place that convention is translated.
With ``x1 = xmin - 1`` and ``x2 = xmax`` the devkit's inclusive ``+1`` areas and
intersections equal the continuous ones exactly, so IoU needs no special case.
"""

from __future__ import annotations

import numpy as np


def as_boxes(boxes) -> np.ndarray:
    """Return ``boxes`` as a contiguous float32 array of shape ``[N, 4]``."""
    arr = np.ascontiguousarray(boxes, dtype=np.float32)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {arr.shape}")
    return arr


def from_voc_pixels(voc: np.ndarray) -> np.ndarray:
    """VOC 1-based inclusive ``(xmin, ymin, xmax, ymax)`` -> continuous ``(x1, y1, x2, y2)``."""
    voc = np.asarray(voc, dtype=np.float64).reshape(-1, 4)
    out = voc.copy()
    out[:, :2] -= 1.0
    return out.astype(np.float32)


def to_voc_pixels(boxes: np.ndarray) -> np.ndarray:
    """Continuous ``(x1, y1, x2, y2)`` -> VOC 1-based inclusive ``(xmin, ymin, xmax, ymax)`` (float64)."""
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, :2] += 1.0
    return out


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Areas of ``boxes [N, 4]`` (x1, y1, x2, y2); degenerate boxes have area 0."""
    b = np.asarray(boxes).reshape(-1, 4)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU ``[N, M]`` of ``a [N, 4]`` and ``b [M, 4]`` in (x1, y1, x2, y2).

    Computed with :func:`torchvision.ops.box_iou` in the inputs' precision
    (float64 inputs give float64 IoU). Pairs whose union is empty get IoU 0.
    """
    a = np.asarray(a).reshape(-1, 4)
    b = np.asarray(b).reshape(-1, 4)
    dtype = np.float64 if (a.dtype == np.float64 or b.dtype == np.float64) else np.float32
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=dtype)
    # Imported here so that worker processes which never need IoU (selective
    # search) do not pay torch's start-up time.
    import torch
    import torchvision

    iou = torchvision.ops.box_iou(torch.from_numpy(a.astype(dtype)), torch.from_numpy(b.astype(dtype)))
    return np.nan_to_num(iou.numpy(), nan=0.0)


def mirror_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """The same ``(x1, y1, x2, y2)`` boxes in the image flipped left to right: ``x -> width - x``."""
    b = as_boxes(boxes)
    return np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], axis=1).astype(np.float32)


def clip_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Clip ``boxes [N, 4]`` (x1, y1, x2, y2) to the image ``[0, width] x [0, height]``."""
    b = as_boxes(boxes).copy()
    b[:, 0::2] = np.clip(b[:, 0::2], 0, width)
    b[:, 1::2] = np.clip(b[:, 1::2], 0, height)
    return b


def xywh_to_xyxy(rects: np.ndarray) -> np.ndarray:
    """``(x, y, w, h)`` rectangles (OpenCV's) -> float32 ``(x1, y1, x2, y2)``."""
    r = np.asarray(rects, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([r[:, :2], r[:, :2] + r[:, 2:]], axis=1)
