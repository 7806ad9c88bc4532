"""SPP-net pooling: hand-worked window mapping, pyramid pooling against a slow loop, scale selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import slow_spp
from torch import nn
from torchvision.ops import roi_pool

from rcnn.modeling.models import build_model
from rcnn.modeling.spp import PYRAMID_LEVELS, _roi_pool_inexact, bins_order, spp_dim, spp_features, spp_pool
from rcnn.modeling.spp_geometry import MULTI_SCALES, image_scales, map_windows, select_scale

# ----------------------------------------------------------------------------- window mapping


def test_map_windows_hand_cases():
    # S = 16 on a 40 x 40 map (a 640 x 640 image). Per axis: left = floor(x1/16) + 1, right = ceil((x2-1)/16) - 1.
    boxes = [
        # x: floor(0/16)+1 = 1, ceil(223/16)-1 = 14-1 = 13.  Same for y.
        [0, 0, 224, 224],
        # x: floor(16/16)+1 = 2, ceil(239/16)-1 = 15-1 = 14.  y: floor(32/16)+1 = 3, ceil(99/16)-1 = 7-1 = 6.
        [16, 32, 240, 100],
        # x2 = 226: last pixel 225, ceil(225/16)-1 = 14 (cell 14's centre, pixel 224, is inside).
        # y2 = 225: last pixel 224, ceil(224/16)-1 = 13 (cell 14's centre is the corner pixel: excluded).
        [0, 0, 226, 225],
        # x1 = 15: floor(15/16)+1 = 1 (cell 1's centre, pixel 16, is inside); x1 = 17: floor(17/16)+1 = 2.
        [15, 17, 224, 224],
        # Non-integer (scaled) boxes: floor(31.5/16)+1 = 2, ceil(63.25/16)-1 = 4-1 = 3; y: 1, ceil(47/16)-1 = 2.
        [31.5, 0.5, 64.25, 48],
    ]
    expected = [[1, 1, 13, 13], [2, 3, 14, 6], [1, 1, 14, 13], [1, 2, 13, 13], [2, 1, 3, 2]]
    out = map_windows(np.array(boxes, dtype=np.float32), 16, 40, 40)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, expected)


def test_map_windows_borders_and_large_windows():
    # S = 16, 40 x 40 map.
    boxes = [
        # The whole 640 x 640 image: floor(0/16)+1 = 1, ceil(639/16)-1 = 40-1 = 39.
        [0, 0, 640, 640],
        # Larger than the image: floor(-100/16)+1 = -7+1 = -6 -> clamped to 0; ceil(799/16)-1 = 49 -> 39.
        [-100, -100, 800, 800],
        # Wholly right of the image: x 44..49 -> clamped to 39..39; y: 1, ceil(49/16)-1 = 3.
        [700, 0, 800, 50],
        # Wholly above the image: y: floor(-100/16)+1 = -6, ceil(-21/16)-1 = -2 -> 0..0.
        [100, -100, 200, -20],
    ]
    expected = [[1, 1, 39, 39], [0, 0, 39, 39], [39, 1, 39, 3], [7, 0, 12, 0]]
    np.testing.assert_array_equal(map_windows(np.array(boxes, dtype=np.float32), 16, 40, 40), expected)


def test_map_windows_feature_map_smaller_than_image_over_stride():
    # A trunk without full padding gives fewer cells than image / S; the map's size is what clamps.
    # x: 1 .. ceil(639/16)-1 = 39 -> 24; y: 1 .. 39 -> 19.
    np.testing.assert_array_equal(map_windows(np.array([[0, 0, 640, 640]], np.float32), 16, 20, 25), [[1, 1, 24, 19]])


def test_map_windows_tiny_and_degenerate_windows_collapse_to_nearest_cell():
    boxes = [
        # 10 px: left floor(20/16)+1 = 2 > right ceil(29/16)-1 = 1. Centre pixel (20+29)/2 = 24.5;
        # 24.5/16 = 1.53 -> cell 2 (centre pixel 32 is 7.5 px away, cell 1's is 8.5).
        [20, 20, 30, 30],
        # Empty box at 48: left 4, right ceil(47/16)-1 = 2; centre 47.5/16 = 2.97 -> 3.
        [48, 48, 48, 48],
        # Inverted box: left floor(40/16)+1 = 3, right ceil(9/16)-1 = 0; centre (40+9)/2 = 24.5 -> 2.
        [40, 40, 10, 10],
        # 1 px at the image corner: left 1, right ceil(0/16)-1 = -1; centre pixel 0 -> cell 0.
        [0, 0, 1, 1],
        # Exactly 2S = 32 px starting on a centre: left floor(32/16)+1 = 3, right ceil(63/16)-1 = 3.
        [32, 32, 64, 64],
        # Halfway between two centres rounds up: pixel 8 only, left 1, right ceil(8/16)-1 = 0; 8/16 = 0.5 -> 1.
        [8, 8, 9, 9],
    ]
    expected = [[2, 2, 2, 2], [3, 3, 3, 3], [2, 2, 2, 2], [0, 0, 0, 0], [3, 3, 3, 3], [1, 1, 1, 1]]
    np.testing.assert_array_equal(map_windows(np.array(boxes, dtype=np.float32), 16, 40, 40), expected)


def test_map_windows_empty_input_and_tensor_boxes():
    assert map_windows(np.zeros((0, 4), np.float32), 16, 5, 5).shape == (0, 4)
    out = map_windows(torch.tensor([[0.0, 0.0, 224.0, 224.0]]), 16, 40, 40)
    np.testing.assert_array_equal(out, [[1, 1, 13, 13]])


def _padded_stack() -> tuple[nn.Module, int]:
    """Odd filters padded by floor(p/2), as the paper assumes; total stride 8.

    Average rather than max pooling, so that every pixel of a receptive field gets a gradient.
    """
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 1, 3, 2, 1), nn.Conv2d(1, 1, 5, 2, 2), nn.AvgPool2d(3, 2, 1), nn.Conv2d(1, 1, 3, 1, 1)]
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            nn.init.constant_(layer.weight, 1.0)
    return nn.Sequential(*layers), 8


def test_receptive_field_centres_are_pixel_index_stride_times_cell():
    # The premise of the mapping: with floor(p/2) padding, cell j's receptive field is centred on pixel
    # index S*j, i.e. continuous x = S*j + 1/2. Measured from the gradient's support on interior cells.
    net, stride = _padded_stack()
    image = torch.zeros(1, 1, 1, 256, requires_grad=True)
    out = net(image)
    for j in range(5, out.shape[-1] - 5):
        (grad,) = torch.autograd.grad(out[0, 0, 0, j], image, retain_graph=True)
        cols = torch.nonzero(grad[0, 0, 0]).flatten()
        assert (cols.min() + cols.max()).item() / 2 == stride * j


@pytest.mark.parametrize("offset", [0.0, 3.0, 7.5, 17.0])
def test_map_windows_keeps_cells_whose_centres_lie_strictly_inside(offset):
    # Oracle: cells whose receptive-field centre (continuous S*j + offset + 1/2) lies strictly between
    # the centres of the window's corner pixels (x1 + 1/2 and x2 - 1/2).
    rng = np.random.default_rng(0)
    stride, cells = 8, 30
    checked = 0
    for _ in range(300):
        x1, x2 = np.sort(rng.integers(0, stride * cells + 1, size=2))
        y1, y2 = np.sort(rng.integers(0, stride * cells + 1, size=2))
        centres = stride * np.arange(cells) + offset + 0.5
        inside_x = np.flatnonzero((centres > x1 + 0.5) & (centres < x2 - 0.5))
        inside_y = np.flatnonzero((centres > y1 + 0.5) & (centres < y2 - 0.5))
        if len(inside_x) == 0 or len(inside_y) == 0:
            continue
        out = map_windows(np.array([[x1, y1, x2, y2]], np.float32), stride, cells, cells, offset)[0]
        assert out.tolist() == [inside_x[0], inside_y[0], inside_x[-1], inside_y[-1]]
        checked += 1
    assert checked > 200


def test_map_windows_offset_hand_case():
    # The tiny backbone centres cell j on pixel 8j + 3: the window over pixels 0..63 holds the
    # centres 3, 11, ..., 59 (cells 0..7). The paper's offset-free formula gives cells 1..7.
    box = np.array([[0, 0, 64, 64]], np.float32)
    assert map_windows(box, 8, 20, 20, offset=3.0).tolist() == [[0, 0, 7, 7]]
    assert map_windows(box, 8, 20, 20).tolist() == [[1, 1, 7, 7]]
    # a window too narrow for any centre collapses onto the cell centred nearest its own centre
    assert map_windows(np.array([[12, 12, 15, 15]], np.float32), 8, 20, 20, offset=3.0).tolist() == [[1, 1, 1, 1]]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-2000, 2000, allow_nan=False, width=32), min_size=4, max_size=4),
    st.sampled_from([4, 8, 16, 32]),
    st.integers(1, 50),
    st.integers(1, 50),
)
def test_map_windows_always_gives_a_cell_rectangle_inside_the_map(box, stride, fh, fw):
    x1, y1, x2, y2 = map_windows(np.array([box], np.float32), stride, fh, fw)[0]
    assert 0 <= x1 <= x2 < fw
    assert 0 <= y1 <= y2 < fh


# ----------------------------------------------------------------------------- pyramid pooling


def random_rects(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    x = np.sort(rng.integers(0, width, size=(n, 2)), axis=1)
    y = np.sort(rng.integers(0, height, size=(n, 2)), axis=1)
    special = [
        [0, 0, 0, 0],  # 1 x 1
        [width - 1, height - 1, width - 1, height - 1],
        [0, 0, width - 1, height - 1],  # the whole map
        [2, 1, 3, 2],  # 2 x 2, fewer cells than the 6 x 6 and 3 x 3 bins
        [0, 3, width - 1, 3],  # one row
        [1, 0, 5, height - 1],  # 5 wide: uneven, overlapping bins
    ]
    return np.concatenate([np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1), special]).astype(np.int64)


ALGORITHMS = ("table", "roi_pool")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("seed", range(4))
def test_spp_pool_matches_slow_loop(seed, algorithm):
    rng = np.random.default_rng(seed)
    channels, height, width = 3, int(rng.integers(6, 20)), int(rng.integers(6, 20))
    fmap = torch.from_numpy(rng.standard_normal((channels, height, width)).astype(np.float32))
    rects = random_rects(rng, 12, height, width)
    out = spp_pool(fmap, rects, algorithm=algorithm)
    assert out.shape == (len(rects), spp_dim(channels))
    assert out.dtype == torch.float32
    assert np.array_equal(out.numpy(), slow_spp(fmap.numpy(), rects, PYRAMID_LEVELS))


def test_bins_order_hand_case():
    # 2 channels, levels (2, 1). Channel-major: level 2 is c0 bins 0-3, then c1 bins 0-3 (positions
    # 0-7); level 1 is c0, c1 (8, 9). Bin-major: bin 0 c0, bin 0 c1, bin 1 c0, ...
    assert bins_order(2, (2, 1)).tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 9]
    order = bins_order(5, PYRAMID_LEVELS)
    assert sorted(order.tolist()) == list(range(spp_dim(5)))  # a permutation


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_spp_pool_bins_layout_is_the_channel_layout_rearranged(algorithm, dtype):
    rng = np.random.default_rng(11)
    fmap = torch.from_numpy(rng.standard_normal((4, 13, 17)).astype(np.float32)).to(dtype)
    rects = random_rects(rng, 30, 13, 17)
    for levels in (PYRAMID_LEVELS, (4, 3, 1), (7,)):  # derived levels, direct ones, roi_pool's exact fix-up
        channels = spp_pool(fmap, rects, levels, algorithm=algorithm)
        bins = spp_pool(fmap, rects, levels, algorithm=algorithm, layout="bins")
        assert torch.equal(bins, channels[:, bins_order(4, levels)])
        into = torch.empty_like(bins)
        assert spp_pool(fmap, rects, levels, algorithm=algorithm, layout="bins", out=into) is into and torch.equal(into, bins)
    # a channels-last map (as the conv-map cache holds them) pools to the same numbers
    last = fmap.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    assert torch.equal(
        spp_pool(last, rects, algorithm=algorithm, layout="bins"), spp_pool(fmap, rects, algorithm=algorithm, layout="bins")
    )
    with pytest.raises(ValueError, match="layout"):
        spp_pool(fmap, rects, layout="rows")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_spp_pool_writes_into_a_given_block_of_rows(algorithm):
    rng = np.random.default_rng(7)
    fmap = torch.from_numpy(rng.standard_normal((3, 15, 11)).astype(np.float32)).half()
    rects = random_rects(rng, 20, 15, 11)
    n = len(rects)
    whole = torch.full((n + 10, spp_dim(3)), -1.0)
    block = whole[4 : 4 + n]
    assert spp_pool(fmap, rects, algorithm=algorithm, out=block) is block
    expected = slow_spp(fmap.float().numpy(), rects, PYRAMID_LEVELS)
    assert np.array_equal(whole[4 : 4 + n].numpy(), expected)
    assert (whole[:4] == -1).all() and (whole[4 + n :] == -1).all()  # the rest untouched
    with pytest.raises(ValueError, match="out must be"):
        spp_pool(fmap, rects, algorithm=algorithm, out=whole)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("levels", [(1, 4, 2), (5, 4, 2, 1), (3, 6), (7,), (1,)])
def test_spp_pool_other_levels_orders_and_batched_input(levels, algorithm):
    rng = np.random.default_rng(7)
    fmap = torch.from_numpy(rng.standard_normal((2, 9, 11)).astype(np.float32))
    rects = random_rects(rng, 8, 9, 11)
    expected = slow_spp(fmap.numpy(), rects, levels)
    assert np.array_equal(spp_pool(fmap, rects, levels, algorithm=algorithm).numpy(), expected)
    assert np.array_equal(spp_pool(fmap[None], torch.from_numpy(rects), levels, algorithm=algorithm).numpy(), expected)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    levels=st.lists(st.integers(1, 8), min_size=1, max_size=4, unique=True),
    maps=st.integers(1, 3),
)
def test_table_algorithm_equals_roi_pool_reference(seed, height, width, levels, maps):
    rng = np.random.default_rng(seed)
    fmap = torch.from_numpy(rng.standard_normal((maps, 3, height, width)).astype(np.float32))
    rects = random_rects(rng, 10, height, width) if height >= 6 and width >= 6 else np.zeros((0, 4), np.int64)
    x = np.sort(rng.integers(0, width, size=(10, 2)), axis=1)
    y = np.sort(rng.integers(0, height, size=(10, 2)), axis=1)
    rects = np.concatenate([rects, np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)]).astype(np.int64)
    owner = rng.integers(0, maps, size=len(rects))
    table = spp_pool(fmap, rects, levels, owner, algorithm="table")
    reference = spp_pool(fmap, rects, levels, owner, algorithm="roi_pool")
    assert torch.equal(table, reference)


def test_table_algorithm_falls_back_when_the_table_would_be_too_big(monkeypatch):
    import rcnn.modeling.spp as spp

    rng = np.random.default_rng(2)
    fmap = torch.from_numpy(rng.standard_normal((3, 12, 12)).astype(np.float32))
    rects = random_rects(rng, 6, 12, 12)
    expected = slow_spp(fmap.numpy(), rects, PYRAMID_LEVELS)
    calls, reference = [], spp._roi_pool_levels
    monkeypatch.setattr(spp, "_TABLE_MAX_VALUES", 0)
    monkeypatch.setattr(spp, "_roi_pool_levels", lambda *a: calls.append(1) or reference(*a))
    assert np.array_equal(spp_pool(fmap, rects).numpy(), expected)
    assert calls
    # float16 maps (the conv-map cache's type) take the same way round
    half = spp_pool(fmap.half(), rects)
    assert half.dtype == torch.float16 and np.array_equal(half.numpy(), expected.astype(np.float16))
    assert len(calls) == 2


def test_table_algorithm_gathers_in_chunks(monkeypatch):
    import rcnn.modeling.spp as spp

    rng = np.random.default_rng(4)
    fmap = torch.from_numpy(rng.standard_normal((3, 10, 14)).astype(np.float32))
    rects = random_rects(rng, 20, 10, 14)
    monkeypatch.setattr(spp, "_TABLE_CHUNK_VALUES", 3 * 36 * 7)  # 7 windows per chunk
    assert np.array_equal(spp_pool(fmap, rects).numpy(), slow_spp(fmap.numpy(), rects, PYRAMID_LEVELS))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spp_pool_is_exact_where_roi_pool_bins_overshoot(dtype, algorithm):
    # roi_pool's last 7-bin of a 57-cell window (float32; 29 cells in float64) ends one cell past the
    # window; a large value just below it exposes the difference.
    h = 57 if dtype == torch.float32 else 29
    rng = np.random.default_rng(1)
    fmap = torch.from_numpy(rng.standard_normal((2, h + 3, 10))).to(dtype)
    fmap[:, h + 1, :] = 100.0
    rects = np.array([[0, 1, 9, h], [1, 1, 8, 4], [0, 0, 9, h + 2]], dtype=np.int64)
    assert _roi_pool_inexact(rects, 7, dtype).tolist() == [True, False, False]
    raw = roi_pool(fmap[None], torch.tensor([[0, *rects[0]]], dtype=dtype), (7, 7), 1.0)
    assert raw.max() == 100.0  # the bug this guards against
    levels = (7, 6, 1)
    out = spp_pool(fmap, rects, levels, algorithm=algorithm)
    assert np.array_equal(out.numpy(), slow_spp(fmap.numpy(), rects, levels))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_spp_pool_half_precision_pools_in_float32(algorithm):
    rng = np.random.default_rng(3)
    fmap = torch.from_numpy(rng.standard_normal((2, 8, 8)).astype(np.float32)).half()
    rects = random_rects(rng, 4, 8, 8)
    out = spp_pool(fmap, rects, algorithm=algorithm)
    assert out.dtype == torch.float16
    assert np.array_equal(out.float().numpy(), slow_spp(fmap.float().numpy(), rects, PYRAMID_LEVELS))


def test_spp_pool_empty_and_invalid_rects():
    fmap = torch.zeros(4, 5, 6)
    assert spp_pool(fmap, np.zeros((0, 4), np.int64)).shape == (0, 4 * 50)
    for bad in ([0, 0, 6, 4], [0, 0, 5, 5], [-1, 0, 2, 2], [3, 0, 2, 2], [0, 3, 2, 2]):
        with pytest.raises(ValueError, match="inside"):
            spp_pool(fmap, np.array([bad]))
    with pytest.raises(ValueError, match="feature_map"):
        spp_pool(torch.zeros(4, 5), np.array([[0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="batch_index"):
        spp_pool(torch.zeros(2, 4, 5, 6), np.array([[0, 0, 1, 1]]), batch_index=[2])
    with pytest.raises(ValueError, match="levels"):
        spp_pool(fmap, np.array([[0, 0, 1, 1]]), levels=(6, 0))
    with pytest.raises(ValueError, match="algorithm"):
        spp_pool(fmap, np.array([[0, 0, 1, 1]]), algorithm="fast")


def test_spp_dim():
    # The paper's 50-bin pyramid on ZF-5's 256 conv5 channels is 12,800-d.
    assert spp_dim(256) == 12800
    assert spp_dim(512, (6, 3, 2, 1)) == 512 * 50
    assert spp_dim(3, (7,)) == 147


def test_pooling_backpropagates_to_one_cell_per_value():
    rng = np.random.default_rng(5)
    fmap = torch.from_numpy(rng.standard_normal((3, 10, 12)).astype(np.float32)).requires_grad_()
    rects = random_rects(rng, 5, 10, 12)
    out = spp_pool(fmap, rects, (7, 3, 1))
    assert out.shape == (len(rects), spp_dim(3, (7, 3, 1))) == (len(rects), 3 * 59)
    out.sum().backward()
    # Each pooled value routes a gradient of 1 to exactly one cell (its argmax).
    assert fmap.grad.sum().item() == out.numel()


# ----------------------------------------------------------------------------- scales


def test_image_scales_shorter_side_and_cap():
    assert image_scales(375, 500) == [688 / 375]
    assert image_scales(500, 375, MULTI_SCALES) == [s / 375 for s in MULTI_SCALES]
    # Shorter side 100 -> 600 would make the longer side 2400 > 1000: capped at 1000 / 400 = 2.5.
    assert image_scales(100, 400, (600, 200), max_side=1000) == [2.5, 2.0]
    with pytest.raises(ValueError):
        image_scales(0, 10)
    with pytest.raises(ValueError):
        image_scales(10, 10, ())


def test_select_scale_hand_cases():
    factors = [0.5, 1.0, 2.0]
    boxes = np.array(
        [
            [10, 10, 234, 234],  # 224 x 224 at factor 1: exactly 224^2
            [0, 0, 112, 112],  # 112 x 112 reaches 224 x 224 at factor 2
            [0, 0, 448, 448],  # 448 x 448 at factor 0.5
            [0, 0, 300, 300],  # areas 150^2, 300^2, 600^2: |22500-50176| < |90000-50176|, so 0.5
            [0, 0, 1000, 20],  # 20000 px: |20000 - 50176| = 30176 > |80000 - 50176| = 29824, so 2
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(select_scale(boxes, factors), [1, 2, 0, 0, 2])
    # Unsorted factors: indices refer to the given order.
    np.testing.assert_array_equal(select_scale(boxes, [2.0, 0.5, 1.0]), [2, 0, 1, 1, 0])


def test_select_scale_ties_go_to_the_smaller_factor():
    # target 10: a 5 x 8 window has area 40 -> 40 at factor 1 and 160 at factor 2, both 60 from 100.
    box = np.array([[0, 0, 5, 8]], np.float32)
    assert select_scale(box, [1.0, 2.0], target=10).tolist() == [0]
    assert select_scale(box, [2.0, 1.0], target=10).tolist() == [1]
    # Empty windows tie at every scale.
    assert select_scale(np.array([[5, 5, 5, 9]], np.float32), [2.0, 0.5, 1.0]).tolist() == [1]


def test_select_scale_paper_multi_scale_example():
    # A 375 x 500 VOC image; factors 480/375 = 1.28 ... 1200/375 = 3.2.
    factors = image_scales(375, 500, MULTI_SCALES)
    boxes = np.array([[0, 0, 500, 375], [0, 0, 70, 70], [0, 0, 224 / 1.834, 224 / 1.834]], np.float32)
    # Whole image: already larger than 224^2 at 1.28. 70 px: 224/70 = 3.2 exactly -> 1200. The last one is
    # 224 px at 688/375 = 1.8347.
    np.testing.assert_array_equal(select_scale(boxes, factors), [0, 4, 2])
    assert select_scale(np.zeros((0, 4), np.float32), factors).shape == (0,)


# ----------------------------------------------------------------------------- convenience


def test_spp_features_runs_trunk_once_and_pools():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 5, 3, 2, 1))
    image = torch.randn(3, 40, 52)
    boxes = np.array([[0, 0, 52, 40], [10, 4, 30, 20], [50, 38, 51, 39]], np.float32)
    with torch.no_grad():
        out = spp_features(trunk, image, boxes, stride=4, levels=(3, 1))
        fmap = trunk(image[None])
    assert fmap.shape[-2:] == (10, 13)
    assert torch.equal(out, spp_pool(fmap, map_windows(boxes, 4, 10, 13), (3, 1)))


def test_spp_features_with_the_tiny_backbone():
    model = build_model("tiny", num_classes=3).eval()
    boxes = np.array([[0, 0, 64, 64], [8, 8, 40, 24]], np.float32)
    with torch.no_grad():
        out = spp_features(model.trunk, torch.randn(3, 64, 80), boxes, model.spec.stride)
    assert out.shape == (2, spp_dim(model.spec.trunk_channels))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_batched_maps_pool_like_one_map_at_a_time(algorithm):
    # Two maps of different sizes, zero-padded into one batch: each rectangle pools only its own map.
    rng = np.random.default_rng(7)
    a, b = (
        torch.from_numpy(rng.normal(size=(3, 9, 7)).astype(np.float32)),
        torch.from_numpy(rng.normal(size=(3, 5, 11)).astype(np.float32)),
    )
    batch = torch.zeros(2, 3, 9, 11)
    batch[0, :, :9, :7] = a
    batch[1, :, :5, :11] = b
    rects_a = np.array([[0, 0, 6, 8], [2, 3, 4, 4]])
    rects_b = np.array([[0, 0, 10, 4], [5, 1, 5, 1]])
    out = spp_pool(batch, np.concatenate([rects_a, rects_b]), batch_index=[0, 0, 1, 1], algorithm=algorithm)
    torch.testing.assert_close(out[:2], spp_pool(a, rects_a, algorithm=algorithm), rtol=0, atol=0)
    torch.testing.assert_close(out[2:], spp_pool(b, rects_b, algorithm=algorithm), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["channels", "bins"])
def test_few_windows_per_map_pool_the_finest_level_and_take_the_others_from_it(monkeypatch, layout):
    import rcnn.modeling.spp as spp

    rng = np.random.default_rng(7)
    maps = 24
    fmap = torch.from_numpy(rng.standard_normal((maps, 3, 11, 13)).astype(np.float32))
    rects = random_rects(rng, maps, 11, 13)[:maps]
    owner = np.arange(maps)
    sizes, real = [], spp.roi_pool
    monkeypatch.setattr(spp, "roi_pool", lambda *a, **k: sizes.append(a[2]) or real(*a, **k))
    out = spp_pool(fmap, rects, PYRAMID_LEVELS, owner, layout=layout)  # one window per map: roi_pool's way
    assert sizes == [(6, 6)]  # 3, 2 and 1 come from the 6 x 6 bins
    reference = spp_pool(fmap, rects, PYRAMID_LEVELS, owner, algorithm="roi_pool", layout=layout)
    assert sizes[1:] == [(6, 6), (3, 3), (2, 2), (1, 1)]  # the reference pools every level itself
    assert torch.equal(out, reference)
    expected = np.stack([slow_spp(fmap[i].numpy(), rects[i : i + 1], PYRAMID_LEVELS)[0] for i in range(maps)])
    if layout == "bins":
        expected = expected[:, bins_order(3, PYRAMID_LEVELS)]
    assert np.array_equal(out.numpy(), expected)
    # gradients reach the map through the derived levels as through the pooled ones
    grads = []
    for algorithm in ("auto", "roi_pool"):
        x = fmap.clone().requires_grad_(True)
        spp_pool(x, rects, PYRAMID_LEVELS, owner, algorithm=algorithm, layout=layout).sum().backward()
        grads.append(x.grad)
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


def test_spp_region_features_of_chosen_rows_are_the_full_layers_rows():
    from rcnn.methods.spp_regions import image_maps, spp_region_features
    from rcnn.modeling.inference import for_inference
    from rcnn.modeling.models import build_model

    net = for_inference(build_model("tiny", 3, 32, spp_levels=(2, 1)).eval(), whole_images=True)
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    xy = rng.uniform(0, 60, (80, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 40, (80, 2))], axis=1).astype(np.float32)
    maps = image_maps(net, image, [1.0, 0.5])
    full = spp_region_features(net, maps, [1.0, 0.5], boxes, ("pool5", "fc7"))
    chosen = np.array([79, 0, 5, 5, 40])  # out of order, one twice
    some = spp_region_features(net, maps, [1.0, 0.5], boxes, ("pool5", "fc7"), rows={"fc7": chosen})
    assert np.array_equal(some["fc7"], full["fc7"][chosen]) and np.array_equal(some["pool5"], full["pool5"])
