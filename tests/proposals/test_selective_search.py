"""Selective search wrapper: the Uijlings configuration, ranking, filtering and seeding."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rcnn.config import ProposalsConfig
from rcnn.data.datasets import VOCDataset, load_image
from rcnn.proposals.selective_search import image_seed, rank_filter, search_size, selective_search


@pytest.fixture(scope="module")
def image(tiny_voc):
    ds = VOCDataset(tiny_voc, "trainval")
    return load_image(ds.annotation(ds.ids[0]))


def test_rank_filter_keeps_first_copy_in_order():
    boxes = np.array([[0, 0, 30, 30], [5, 5, 8, 40], [0, 0, 30, 30], [1, 1, 40, 40], [2, 2, 50, 50]], np.float32)
    out = rank_filter(boxes, min_size=10, max_proposals=None)
    np.testing.assert_array_equal(out, boxes[[0, 3, 4]])
    np.testing.assert_array_equal(rank_filter(boxes, 10, 2), boxes[[0, 3]])


@pytest.mark.parametrize("mode", ["fast", "single", "opencv-fast"])
def test_same_seed_same_boxes_in_the_same_order(image, mode):
    a = selective_search(image, mode, seed=11)
    b = selective_search(image, mode, seed=11)
    assert a.dtype == np.float32 and a.shape[1] == 4 and len(a) > 10
    np.testing.assert_array_equal(a, b)
    h, w = image.shape[:2]
    assert (a[:, 0] >= 0).all() and (a[:, 2] <= w).all() and (a[:, 3] <= h).all()
    assert ((a[:, 2] - a[:, 0]) >= 20).all()


def test_seed_changes_only_the_ranking(image):
    a = selective_search(image, "fast", seed=1)
    b = selective_search(image, "fast", seed=2)
    assert not np.array_equal(a, b)
    assert {tuple(r) for r in a} == {tuple(r) for r in b}


def test_fast_finds_more_boxes_than_single(image):
    assert len(selective_search(image, "fast", min_size=1)) > len(selective_search(image, "single", min_size=1))


def test_resize_maps_boxes_back(image):
    h, w = image.shape[:2]
    boxes = selective_search(image, "single", resize_width=2 * w, min_size=1)
    assert boxes[:, 2].max() <= w and boxes[:, 3].max() <= h
    assert boxes[:, 2].max() > 0.9 * w  # the whole-image region is still there, in original pixels


@pytest.mark.parametrize(
    "height, width, resize_width, max_pixels, expected",
    [
        (375, 500, None, 1_000_000, (375, 500)),  # VOC: under the limit, as is
        (6000, 6000, None, 1_000_000, (1000, 1000)),
        (3000, 4000, None, 1_000_000, (866, 1154)),  # factor sqrt(1/12): 866.03 x 1154.70, rounded down
        (375, 500, 1000, None, (750, 1000)),  # resize_width alone
        (375, 500, 1000, 100_000, (273, 365)),  # 750 x 1000 first, then factor sqrt(2/15): 273.86 x 365.15
    ],
)
def test_search_size_hand_cases(height, width, resize_width, max_pixels, expected):
    assert search_size(height, width, resize_width, max_pixels) == expected


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20000), st.integers(1, 20000), st.integers(1, 10**7))
def test_search_size_is_the_largest_size_within_the_limit(h, w, max_pixels):
    assume(h * w > max_pixels and min(h, w) * max_pixels >= max(h, w))  # over the limit, neither side below 1 px
    sh, sw = search_size(h, w, None, max_pixels)
    assert sh * sw <= max_pixels < (sh + 1) * (sw + 1)
    # One factor f for both sides, each rounded down: sw * h - sh * w = w * frac(h f) - h * frac(w f).
    assert -h < sw * h - sh * w < w


def test_default_limit_leaves_voc_and_the_demo_alone():
    limit = ProposalsConfig().max_pixels
    for h, w in [(375, 500), (500, 500), (500, 333), (256, 256)]:
        assert search_size(h, w, None, limit) == (h, w)


def test_image_over_max_pixels_is_searched_shrunk_with_boxes_in_original_pixels(image):
    h, w = image.shape[:2]
    got = selective_search(image, "single", min_size=4, seed=3, max_pixels=(h // 2) * (w // 2))
    # Oracle: the search on a half-size copy, its boxes doubled by hand, then filtered as usual.
    small = cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_LINEAR)
    expected = rank_filter(selective_search(small, "single", min_size=0, seed=3) * 2, 4, None)
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, selective_search(image, "single", min_size=4, seed=3))


def test_image_seed_is_order_independent():
    assert image_seed(0, "000001") == image_seed(0, "000001")
    assert image_seed(0, "000001") != image_seed(0, "000002")
    assert image_seed(1, "000001") != image_seed(0, "000001")


def test_unknown_mode(image):
    with pytest.raises(ValueError, match="unknown selective search mode"):
        selective_search(image, "slow")


def test_ranking_puts_regions_high_in_the_hierarchy_first(image):
    # Large regions (merged late, near the top of the hierarchy) come first, as in Uijlings et al.;
    # a cap must keep them rather than the tiny initial segments OpenCV lists first.
    boxes = selective_search(image, "fast", min_size=1)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    tenth = max(1, len(areas) // 10)
    assert areas[:tenth].mean() > 3 * areas[-tenth:].mean()


def test_opencv_without_contrib_modules_gives_a_one_line_error(monkeypatch):
    import cv2

    from rcnn.errors import UserError

    monkeypatch.delattr(cv2, "ximgproc")
    with pytest.raises(UserError, match="opencv-contrib-python-headless"):
        selective_search(np.zeros((40, 40, 3), np.uint8))
