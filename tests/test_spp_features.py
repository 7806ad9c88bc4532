"""Pooling the windows of several images at their chosen scales, checked window by window against the slow loop."""

from __future__ import annotations

import numpy as np
import torch
from test_spp import slow_spp

from rcnn.spp import map_windows, select_scale
from rcnn.spp_features import MANY_WINDOWS, pool_images


def random_boxes(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    xy = rng.uniform(0, size - 8, size=(n, 2))
    wh = rng.uniform(4, size / 2, size=(n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, size)], axis=1).astype(np.float32)


def test_pool_images_matches_one_window_at_a_time():
    rng = np.random.default_rng(0)
    stride, levels, target, factors = 4, (6, 3, 2, 1), 12.0, [0.5, 1.0]
    items, expected = [], []
    # One image with many windows (pooled on its own) and two with a few (pooled in one batch).
    for n in (MANY_WINDOWS * 3, 2, 3):
        maps = [
            torch.from_numpy(rng.standard_normal((3, int(64 * f) // stride, int(64 * f) // stride)).astype(np.float32))
            for f in factors
        ]
        boxes = random_boxes(rng, n, 64)
        items.append((maps, factors, boxes))
        for box, k in zip(boxes, select_scale(boxes, factors, target)):
            m = maps[k]
            rect = map_windows(box[None] * factors[k], stride, m.shape[1], m.shape[2])
            expected.append(slow_spp(m.numpy(), rect, levels)[0])
    got = pool_images(items, stride, levels, target)
    assert got.shape == (len(expected), 3 * 50)
    assert np.array_equal(got.numpy(), np.stack(expected))
    # both scales were used, so the batch mixed maps of different sizes
    scales = np.concatenate([select_scale(b, factors, target) for _, _, b in items])
    assert set(scales.tolist()) == {0, 1}


def test_pool_images_without_windows():
    maps = [torch.zeros(3, 8, 8)]
    assert pool_images([(maps, [1.0], np.zeros((0, 4), np.float32))], 4, (2, 1)).shape == (0, 15)
