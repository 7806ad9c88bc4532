"""Selective search region proposals (Uijlings et al., IJCV 2013) through OpenCV ximgproc.

``fast`` rebuilds the configuration R-CNN used (its ``selective_search_boxes.m``
ran Uijlings' fast mode): HSV and Lab colour spaces, Felzenszwalb graph
segmentations with k = 50 and 100 (sigma 0.8, minimum segment size k), and the
strategies colour+texture+size+fill and texture+size+fill. OpenCV's own presets
(``opencv-fast``: k = 150/300, ``opencv-quality``) and a one-strategy ``single``
mode are also offered.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import zlib

import cv2
import numpy as np

from rcnn.errors import UserError
from rcnn.structures.boxes import xywh_to_xyxy

MODES = ("fast", "opencv-fast", "opencv-quality", "single")


def _segmentation():
    """OpenCV's ``cv2.ximgproc.segmentation``, or a one-line error naming the package to install."""
    try:
        return cv2.ximgproc.segmentation
    except AttributeError:
        raise UserError(
            f"selective search needs OpenCV's contrib modules (cv2.ximgproc), which this OpenCV {cv2.__version__} lacks: "
            "pip uninstall opencv-python opencv-python-headless && pip install --force-reinstall opencv-contrib-python-headless"
        ) from None


# OpenCV's selective search ranks regions with the C library's rand() (level x
# rand(), see selectivesearchsegmentation.cpp), not cv::RNG, so cv2.setRNGSeed
# alone leaves the order random; seeding libc's generator makes it repeatable.
_libc = ctypes.CDLL(ctypes.util.find_library("c"))


def _uijlings_fast(ss, image: np.ndarray) -> None:
    ss.clearImages()
    ss.clearGraphSegmentations()
    ss.clearStrategies()
    ss.addImage(cv2.cvtColor(image, cv2.COLOR_BGR2HSV))
    ss.addImage(cv2.cvtColor(image, cv2.COLOR_BGR2Lab))
    _seg = _segmentation()
    for k in (50, 100):
        ss.addGraphSegmentation(_seg.createGraphSegmentation(sigma=0.8, k=float(k), min_size=k))
    colour = _seg.createSelectiveSearchSegmentationStrategyColor
    texture = _seg.createSelectiveSearchSegmentationStrategyTexture
    size = _seg.createSelectiveSearchSegmentationStrategySize
    fill = _seg.createSelectiveSearchSegmentationStrategyFill
    ss.addStrategy(_seg.createSelectiveSearchSegmentationStrategyMultiple(colour(), texture(), size(), fill()))
    ss.addStrategy(_seg.createSelectiveSearchSegmentationStrategyMultiple(texture(), size(), fill()))


def configure(ss, image: np.ndarray, mode: str) -> None:
    """Set up an OpenCV ``SelectiveSearchSegmentation`` object for ``image`` (BGR) in ``mode``."""
    ss.setBaseImage(image)
    if mode == "fast":
        _uijlings_fast(ss, image)
    elif mode == "opencv-fast":
        ss.switchToSelectiveSearchFast()
    elif mode == "opencv-quality":
        ss.switchToSelectiveSearchQuality()
    elif mode == "single":
        ss.switchToSingleStrategy()
    else:
        raise ValueError(f"unknown selective search mode {mode!r}; choose from {', '.join(MODES)}")


def image_seed(seed: int, image_id: str) -> int:
    """Per-image RNG seed, independent of the order in which workers take images."""
    return (zlib.crc32(image_id.encode()) ^ seed) & 0x7FFFFFFF


def search_size(height: int, width: int, resize_width: int | None = None, max_pixels: int | None = None) -> tuple[int, int]:
    """``(height, width)`` the search runs at for an image of ``height x width``.

    ``resize_width`` sets the width (the height follows the aspect ratio); an image
    still over ``max_pixels`` pixels is then scaled down, keeping its aspect ratio,
    to at most that many.
    """
    h, w = height, width
    if resize_width is not None and resize_width != w:
        h, w = max(1, round(h * resize_width / w)), resize_width
    if max_pixels is not None and h * w > max_pixels:
        # Each side times f = sqrt(max_pixels / (h w)), rounded down so that the product stays within
        # the limit, in integers: floor(h f) = isqrt(h * max_pixels // w). In floats, 6579 f for
        # max_pixels = 512 ** 2 comes out just under 512 and would round down to 511.
        h, w = max(1, math.isqrt(h * max_pixels // w)), max(1, math.isqrt(w * max_pixels // h))
    return h, w


def selective_search(
    image: np.ndarray,
    mode: str = "fast",
    resize_width: int | None = None,
    min_size: float = 20.0,
    max_proposals: int | None = None,
    seed: int = 0,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Proposals for one BGR image ``[H, W, 3]``.

    The search runs at :func:`search_size` (``resize_width``, then at most
    ``max_pixels`` pixels). Returns float32 boxes ``[N, 4]`` in (x1, y1, x2, y2)
    continuous pixels of the original image, ranked with regions high in the
    hierarchy first (as Uijlings et al. rank them), without duplicates, each side
    at least ``min_size`` pixels, at most ``max_proposals`` of them.
    """
    h, w = image.shape[:2]
    sh, sw = search_size(h, w, resize_width, max_pixels)
    if (sh, sw) != (h, w):
        image = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_LINEAR)
    ss = _segmentation().createSelectiveSearchSegmentation()
    configure(ss, image, mode)
    cv2.setRNGSeed(seed)
    _libc.srand(seed)
    # OpenCV sorts regions by rand() x level, ascending: the smallest segments first, the inverse
    # of Uijlings et al., who put regions near the top of the hierarchy first. Reversing restores
    # that preference, which is what a cap keeps (on voc07-mini test, 200 boxes recall 0.76 of the
    # objects at IoU 0.5 in this order and 0.39 in OpenCV's).
    rects = ss.process()[::-1]
    boxes = xywh_to_xyxy(rects)
    if (sh, sw) != (h, w):
        # Each axis by its own factor: the rounded search size keeps the aspect ratio only to a pixel.
        boxes[:, 0::2] *= np.float32(w / sw)
        boxes[:, 1::2] *= np.float32(h / sh)
        np.clip(boxes[:, 0::2], 0, w, out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0, h, out=boxes[:, 1::2])
    return rank_filter(boxes, min_size, max_proposals)


def rank_filter(boxes: np.ndarray, min_size: float, max_proposals: int | None) -> np.ndarray:
    """Drop small boxes and duplicates (keeping the first, best-ranked copy), then cap."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    boxes = boxes[keep]
    _, first = np.unique(boxes, axis=0, return_index=True)
    boxes = boxes[np.sort(first)]
    if max_proposals is not None:
        boxes = boxes[:max_proposals]
    return np.ascontiguousarray(boxes)
