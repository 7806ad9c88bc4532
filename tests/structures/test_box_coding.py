"""R-CNN box transform against a hand-computed case, its own inverse and torchvision's BoxCoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import BoxCoder

from rcnn.structures.box_coding import DELTA_CLAMP, decode, encode

# P: w = 20, h = 40, centre (20, 40).  G: w = 40, h = 80, centre (35, 50).
P = np.array([[10, 20, 30, 60]], np.float32)
G = np.array([[15, 10, 55, 90]], np.float32)
T = np.array([[15 / 20, 10 / 40, math.log(2), math.log(2)]], np.float32)


def random_boxes(rng, n, min_size=2.0, max_size=100.0):
    xy = rng.uniform(-50, 500, size=(n, 2))
    wh = rng.uniform(min_size, max_size, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def test_encode_hand_computed():
    deltas = encode(P, G)
    assert deltas.dtype == np.float32 and deltas.shape == (1, 4)
    np.testing.assert_allclose(deltas, T, rtol=1e-6)


def test_decode_hand_computed():
    boxes = decode(P, T)
    assert boxes.dtype == np.float32
    np.testing.assert_allclose(boxes, G, atol=1e-4)


def test_zero_deltas_and_empty_input():
    np.testing.assert_array_equal(encode(P, P), np.zeros((1, 4), np.float32))
    np.testing.assert_array_equal(decode(P, np.zeros((1, 4))), P)
    assert encode(np.zeros((0, 4)), np.zeros((0, 4))).shape == (0, 4)
    assert decode(np.zeros((0, 4)), np.zeros((0, 4))).shape == (0, 4)


# Sizes within [4, 200] keep every size ratio below exp(DELTA_CLAMP) = 62.5, where decode is exact.
coord = st.floats(-1000, 1000, allow_nan=False, width=32)
size = st.floats(4, 200, allow_nan=False, width=32)
box = st.tuples(coord, coord, size, size).map(lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(box, box), min_size=1, max_size=8))
def test_round_trip(pairs):
    proposals = np.array([p for p, _ in pairs], np.float32)
    gt = np.array([g for _, g in pairs], np.float32)
    # float32 boxes at |x| <= 1200 carry ~1e-4 of rounding.
    np.testing.assert_allclose(decode(proposals, encode(proposals, gt)), gt, atol=2e-3, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_matches_torchvision_box_coder(seed):
    # torchvision uses the same +0 convention (w = x2 - x1, centre x1 + w / 2) and the
    # same log(1000 / 16) clamp, so with unit weights both directions agree exactly.
    rng = np.random.default_rng(seed)
    proposals = random_boxes(rng, 200)
    gt = random_boxes(rng, 200)
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    p64 = torch.from_numpy(proposals.astype(np.float64))
    expected = coder.encode_single(torch.from_numpy(gt.astype(np.float64)), p64).numpy()
    np.testing.assert_allclose(encode(proposals, gt), expected, rtol=1e-5, atol=1e-5)

    deltas = rng.normal(0, 1, size=(200, 4))
    deltas[:10, 2:] = rng.uniform(5, 50, size=(10, 2))  # beyond the clamp
    expected_boxes = coder.decode_single(torch.from_numpy(deltas), p64).numpy().reshape(-1, 4)
    np.testing.assert_allclose(decode(proposals, deltas), expected_boxes, rtol=1e-5, atol=1e-3)


def test_decode_clamps_scale_deltas():
    assert math.isclose(DELTA_CLAMP, math.log(62.5))
    boxes = decode(P, np.array([[0, 0, 1e4, 800.0]]))  # exp(1e4) would overflow to inf
    assert np.isfinite(boxes).all()
    w, h = boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]
    assert w == pytest.approx(20 * 62.5) and h == pytest.approx(40 * 62.5)
    # Large negative deltas shrink toward a point but stay finite and centred.
    tiny = decode(P, np.array([[0, 0, -1e4, -1e4]]))
    np.testing.assert_allclose(tiny, [[20, 40, 20, 40]])


@pytest.mark.parametrize(
    "proposals, gt",
    [
        ([[10, 10, 10, 20]], [[0, 0, 5, 5]]),  # zero-width proposal
        ([[10, 10, 20, 5]], [[0, 0, 5, 5]]),  # negative height
        ([[0, 0, 5, 5]], [[3, 3, 3, 9]]),  # zero-width ground truth: log(0)
        ([[0, 0, np.nan, 5]], [[0, 0, 5, 5]]),
    ],
)
def test_encode_rejects_degenerate_boxes(proposals, gt):
    with pytest.raises(ValueError):
        encode(np.array(proposals, np.float32), np.array(gt, np.float32))


def test_decode_rejects_degenerate_proposals_and_bad_deltas():
    with pytest.raises(ValueError, match="width or height"):
        decode(np.array([[5, 5, 5, 9]], np.float32), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        decode(P, np.array([[0, np.inf, 0, 0]]))
    with pytest.raises(ValueError, match="same shape"):
        decode(P, np.zeros((2, 4)))
