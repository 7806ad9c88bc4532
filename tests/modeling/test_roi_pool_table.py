"""Fast R-CNN's RoI pooling from SPP-net's sparse tables (``roi_pool_by_table``): torchvision's ``roi_pool`` is the
reference, bit for bit, for RoIs inside the map, across its far borders, under a cell, and on rounding ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import roi_pool

import rcnn.modeling.spp as spp
from rcnn.modeling.spp import roi_pool_by_table


def _rois(rng: np.random.Generator, count: int, maps: int, height: int, width: int, stride: int) -> np.ndarray:
    """float32 ``[count, 5]`` RoIs in pixels of an image ``stride`` times the map: most inside, some reaching
    past the border (as a box at the image's edge does when the map is rounded down), some tiny, and some on
    the half-cell ties where rounding decides."""
    x1 = rng.uniform(0, width * stride, count)
    y1 = rng.uniform(0, height * stride, count)
    x2 = x1 + rng.exponential(width * stride / 3, count)
    y2 = y1 + rng.exponential(height * stride / 3, count)
    tiny = rng.random(count) < 0.1
    x2[tiny], y2[tiny] = x1[tiny] + rng.uniform(0, stride / 2), y1[tiny]
    boxes = np.stack([x1, y1, x2, y2], 1)
    ties = rng.random(count) < 0.2
    boxes[ties] = (np.round(boxes[ties] / stride) + 0.5) * stride  # coordinate * scale ends in .5
    boxes = np.minimum(boxes, np.array([width, height, width, height]) * stride + stride)
    owner = rng.integers(0, maps, count)
    return np.concatenate([owner[:, None], boxes], 1).astype(np.float32)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    maps=st.integers(1, 2),
    height=st.integers(1, 30),
    width=st.integers(1, 30),
    grid=st.sampled_from([6, 7, 13]),
    stride=st.sampled_from([8, 16]),
)
def test_the_same_numbers_as_roi_pool(seed, maps, height, width, grid, stride):
    rng = np.random.default_rng(seed)
    fmap = torch.from_numpy(rng.standard_normal((maps, 4, height, width)).astype(np.float32))
    rois = torch.from_numpy(_rois(rng, 40, maps, height, width, stride))
    got = roi_pool_by_table(fmap, rois, grid, 1.0 / stride)
    assert torch.equal(got, roi_pool(fmap, rois, (grid, grid), 1.0 / stride))


def test_the_table_pools_the_rois_with_bins_on_the_map_and_roi_pool_the_rest(monkeypatch):
    rng = np.random.default_rng(0)
    fmap = torch.from_numpy(rng.standard_normal((1, 8, 38, 50)).astype(np.float32))
    inside = np.array([[0, 0, 0, 783, 591], [0, 16, 32, 100, 90], [0, 40, 40, 41, 41], [0, 8, 8, 24, 24]], np.float32)
    # Cells 50 and 38 are past the map: roi_pool cuts the last bins there, and so does the table.
    border = np.array([[0, 700, 500, 800, 607], [0, 0, 0, 815, 615]], np.float32)
    outside = np.array([[0, 784, 0, 880, 100]], np.float32)  # cells 49 to 55: its last bins lie wholly past the map
    rois = torch.from_numpy(np.concatenate([inside, border, outside, inside]))
    seen, real = [], spp._table_pool_levels

    def spy(fmap, rects, *args, **kwargs):
        seen.append(len(rects))
        return real(fmap, rects, *args, **kwargs)

    monkeypatch.setattr(spp, "_table_pool_levels", spy)
    got = roi_pool_by_table(fmap, rois, 6, 1 / 16)
    want = roi_pool(fmap, rois, (6, 6), 1 / 16)
    assert seen == [10] and torch.equal(got, want)
    assert torch.equal(got[6, :, :, 5], torch.zeros(8, 6))  # roi_pool's empty bins, past the map
    # (8, 8) * 1/16 = 0.5 rounds away from zero to cell 1, as C's round(); numpy's round would give 0
    assert torch.equal(got[3, :, 0, 0], fmap[0, :, 1:2, 1:2].amax((1, 2)))


@pytest.mark.parametrize("case", ["float16", "gradients", "few rois"])
def test_roi_pool_itself_where_the_table_does_not_pay_or_cannot_differentiate(case, monkeypatch):
    rng = np.random.default_rng(1)
    fmap = torch.from_numpy(rng.standard_normal((1, 4, 20, 20)).astype(np.float32))
    rois = torch.from_numpy(_rois(rng, 3 if case == "few rois" else 12, 1, 20, 20, 16))
    monkeypatch.setattr(spp, "_table_pool_levels", lambda *a, **k: pytest.fail("the table was used"))
    if case == "float16":
        fmap = fmap.half()
    if case == "gradients":
        fmap.requires_grad_(True)
    got = roi_pool_by_table(fmap, rois, 6, 1 / 16)
    assert torch.equal(got, roi_pool(fmap, rois.to(fmap.dtype), (6, 6), 1 / 16)) and got.dtype == fmap.dtype
    if case == "gradients":
        got.sum().backward()
        assert fmap.grad is not None and fmap.grad.sum() > 0
