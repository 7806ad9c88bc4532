"""Slow, obviously-correct references and random inputs shared by several test modules."""

from __future__ import annotations

import numpy as np


def slow_spp(fmap: np.ndarray, rects: np.ndarray, levels) -> np.ndarray:
    """One bin at a time: rows [floor(i h / n), ceil((i+1) h / n)) of the rectangle, columns likewise."""
    channels = fmap.shape[0]
    rows = []
    for x1, y1, x2, y2 in rects.tolist():
        h, w = y2 - y1 + 1, x2 - x1 + 1
        parts = []
        for n in levels:
            grid = np.empty((channels, n, n), fmap.dtype)
            for i in range(n):
                r0, r1 = y1 + i * h // n, y1 - (-(i + 1) * h // n)
                for j in range(n):
                    c0, c1 = x1 + j * w // n, x1 - (-(j + 1) * w // n)
                    grid[:, i, j] = fmap[:, r0:r1, c0:c1].max(axis=(1, 2))
            parts.append(grid.reshape(-1))
        rows.append(np.concatenate(parts))
    return np.stack(rows)


def random_boxes(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    xy = rng.uniform(0, size - 8, size=(n, 2))
    wh = rng.uniform(4, size / 2, size=(n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, size)], axis=1).astype(np.float32)
