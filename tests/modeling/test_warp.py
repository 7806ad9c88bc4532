"""Region warping: hand-worked geometry, rendered rectangles, and a per-pixel bilinear oracle."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcnn.modeling.warp import IMAGENET_MEAN_RGB, warp_geometry, warp_regions, warp_regions_torch

S, PAD = 227, 16
FILL = (10.0, 20.0, 30.0)


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Low-frequency colour image, so half-pixel shifts change values only a little."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def oracle_crop(image: np.ndarray, box, crop_size: int, context_pad: int, fill) -> np.ndarray:
    """Per-pixel reference: map each crop pixel centre into the dilated box and sample bilinearly."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    bw, bh = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    grow = crop_size / (crop_size - 2 * context_pad)
    dx1, dy1 = cx - bw * grow / 2, cy - bh * grow / 2
    centres = (np.arange(crop_size) + 0.5) / crop_size
    xs = dx1 + centres * bw * grow
    ys = dy1 + centres * bh * grow
    img = image.astype(np.float64)
    out = np.empty((crop_size, crop_size, 3))
    for r, y in enumerate(ys):
        for c, x in enumerate(xs):
            if not (0 <= x <= w and 0 <= y <= h):
                out[r, c] = fill
                continue
            u = min(max(x - 0.5, 0.0), w - 1.0)  # pixel centres sit at integer + 0.5
            v = min(max(y - 0.5, 0.0), h - 1.0)
            u0, v0 = min(int(u), w - 2) if w > 1 else 0, min(int(v), h - 2) if h > 1 else 0
            u1, v1 = min(u0 + 1, w - 1), min(v0 + 1, h - 1)
            fu, fv = u - u0, v - v0
            out[r, c] = (
                img[v0, u0] * (1 - fu) * (1 - fv)
                + img[v0, u1] * fu * (1 - fv)
                + img[v1, u0] * (1 - fu) * fv
                + img[v1, u1] * fu * fv
            )
    return out


# --- geometry ---------------------------------------------------------------------------------


def test_paper_box_inside_dilates_to_exactly_the_crop():
    # 195 = 227 - 2 * 16, so the dilated box is 227 px: a 1:1 warp with 16 px of context each side.
    src, dst = warp_geometry(np.array([100, 50, 295, 245], np.float32), 500, 375, S, PAD)
    np.testing.assert_array_equal(src, [84, 34, 311, 261])
    np.testing.assert_array_equal(dst, [0, 0, S, S])


def test_box_at_corner_offsets_dst_by_clipped_amount_times_scale():
    # Width 97.5 dilates to 113.5 (scale 2 into the crop), height 390 to 454 (scale 0.5).
    # Dilated box (-8, -32, 105.5, 422): 8 px clipped * 2 = 16, 32 px clipped * 0.5 = 16.
    src, dst = warp_geometry(np.array([0, 0, 97.5, 390], np.float32), 500, 500, S, PAD)
    np.testing.assert_allclose(src, [0, 0, 105.5, 422], atol=1e-4)
    np.testing.assert_allclose(dst, [16, 16, S, S], atol=1e-4)


def test_box_clipped_on_right_and_bottom():
    # Dilated (12, -32, 125.5, 422) in a 100 x 400 image.
    src, dst = warp_geometry(np.array([20, 0, 117.5, 390], np.float32), 100, 400, S, PAD)
    np.testing.assert_allclose(src, [12, 0, 100, 400], atol=1e-4)
    np.testing.assert_allclose(dst, [0, 16, (100 - 12) * 2, (400 + 32) * 0.5], atol=1e-4)


def test_whole_image_box_leaves_context_band_for_fill():
    src, dst = warp_geometry(np.array([0, 0, 320, 240], np.float32), 320, 240, S, PAD)
    np.testing.assert_allclose(src, [0, 0, 320, 240], atol=1e-4)
    np.testing.assert_allclose(dst, [PAD, PAD, S - PAD, S - PAD], atol=1e-4)


def test_geometry_accepts_a_batch_and_widens_degenerate_boxes():
    boxes = np.array([[100, 50, 295, 245], [10, 10, 10, 10], [30, 30, 20, 20]], np.float32)
    src, dst = warp_geometry(boxes, 500, 375, S, PAD)
    assert src.shape == dst.shape == (3, 4) and src.dtype == np.float32
    grown = 227 / 195
    np.testing.assert_allclose(src[1], [10 - grown / 2, 10 - grown / 2, 10 + grown / 2, 10 + grown / 2], atol=1e-5)
    np.testing.assert_allclose(src[2, 2] - src[2, 0], grown, atol=1e-5)  # inverted box: 1 px about its centre


def test_crop_size_must_exceed_twice_the_pad():
    with pytest.raises(ValueError, match="context_pad"):
        warp_geometry(np.array([0, 0, 10, 10], np.float32), 50, 50, 32, 16)


# --- pixels -----------------------------------------------------------------------------------


def test_context_pad_zero_is_a_plain_resize_of_the_box():
    image = smooth_image(375, 500, seed=1)
    crop = warp_regions(image, np.array([[37, 21, 180, 333]], np.float32), S, 0, FILL)[0].astype(int)
    resized = cv2.resize(image[21:333, 37:180], (S, S), interpolation=cv2.INTER_LINEAR).astype(int)
    # cv2.resize repeats the slice's edge pixels where warp_regions reads the real neighbours, so
    # only the outermost ring may differ by more than fixed-point rounding.
    assert np.abs(crop - resized)[1:-1, 1:-1].max() <= 1
    assert np.abs(crop - resized).mean() < 0.5


def test_whole_image_box_is_resized_inside_a_fill_band():
    image = np.random.default_rng(2).integers(0, 256, size=(240, 320, 3), dtype=np.uint8)
    crop = warp_regions(image, np.array([[0, 0, 320, 240]], np.float32), S, PAD, FILL)[0]
    inner = crop[PAD : S - PAD, PAD : S - PAD].astype(int)
    resized = cv2.resize(image, (S - 2 * PAD, S - 2 * PAD), interpolation=cv2.INTER_LINEAR).astype(int)
    # Sample positions agree; cv2's fixed-point weights and 1/32 px positions differ a little on noise.
    assert np.abs(inner - resized).max() <= 8 and np.abs(inner - resized).mean() < 1.0
    band = np.ones((S, S), bool)
    band[PAD : S - PAD, PAD : S - PAD] = False
    assert np.all(crop[band] == np.array(FILL, np.uint8))


def test_box_inside_the_image_is_a_one_to_one_crop_in_the_paper_case():
    image = np.random.default_rng(3).integers(0, 256, size=(375, 500, 3), dtype=np.uint8)
    crop = warp_regions(image, np.array([[100, 50, 295, 245]], np.float32))[0]
    np.testing.assert_array_equal(crop, image[34:261, 84:311])


BACKGROUND = np.array([40, 160, 60], np.uint8)
RECT = np.array([220, 30, 30], np.uint8)


@pytest.mark.parametrize(
    "rect",
    [
        (150, 100, 250, 300),  # tall, well inside: the context is background all round
        (60, 200, 400, 260),  # wide
        (0, 0, 80, 50),  # at the corner: the context above and left is fill
        (430, 300, 500, 375),  # at the opposite corner
        (200, 150, 203, 152),  # tiny: each image pixel spans ~65-100 crop pixels
    ],
)
def test_rendered_rectangle_fills_the_central_region(rect):
    x1, y1, x2, y2 = rect
    image = np.empty((375, 500, 3), np.uint8)
    image[:] = BACKGROUND
    image[y1:y2, x1:x2] = RECT
    crop = warp_regions(image, np.array([rect], np.float32), S, PAD, FILL)[0].astype(int)
    # Bilinear blending is half-way between two colours exactly at the pixel edge between them, so
    # the nearest colour marks where the edges landed.
    colours = np.array([RECT, BACKGROUND, FILL], int)
    nearest = np.abs(crop[:, :, None, :] - colours).sum(axis=3).argmin(axis=2)
    is_rect = nearest == 0
    rows, cols = np.flatnonzero(is_rect.any(axis=1)), np.flatnonzero(is_rect.any(axis=0))
    # One crop pixel, plus half a step of the 1/32-pixel grid that OpenCV 4's warpAffine rounds
    # sample positions to (2.5 crop pixels where one image pixel spans 97); OpenCV 5 samples exactly.
    ty, tx = (int(1 + (S - 2 * PAD) / size / 64) for size in (y2 - y1, x2 - x1))
    for idx, tolerance in ((rows, ty), (cols, tx)):
        assert abs(idx[0] - PAD) <= tolerance and abs(idx[-1] + 1 - (S - PAD)) <= tolerance
    # Inside, blending only reaches half an image pixel in from the edges (corners round off there).
    mx, my = (int(np.ceil((S - 2 * PAD) / (2 * size))) + 1 for size in (x2 - x1, y2 - y1))
    assert is_rect[PAD + my : S - PAD - my, PAD + mx : S - PAD - mx].all()
    band = np.ones((S, S), bool)
    band[PAD - ty : S - PAD + ty, PAD - tx : S - PAD + tx] = False
    assert not is_rect[band].any()
    touches_edge = x1 == 0 or y1 == 0 or x2 == 500 or y2 == 375
    assert (nearest == 2).any() == touches_edge
    if min(x2 - x1, y2 - y1) >= 10:
        # The crop's corners lie over a pixel from the rectangle: pure background, or exactly the fill.
        for corner in (crop[0, 0], crop[0, -1], crop[-1, 0], crop[-1, -1]):
            assert np.abs(corner - BACKGROUND).max() <= 1 or (corner == FILL).all()


@pytest.mark.parametrize("seed", range(3))
def test_matches_per_pixel_bilinear_oracle(seed):
    image = smooth_image(120, 160, seed=seed)
    rng = np.random.default_rng(10 + seed)
    xy = rng.uniform(-20, 150, size=(8, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.3, 100, size=(8, 2))], axis=1).astype(np.float32)
    crops = warp_regions(image, boxes, 64, 8, FILL).astype(np.float64)
    for crop, box in zip(crops, boxes):
        # uint8 rounding and OpenCV's 1/32 px sample positions are the only differences.
        np.testing.assert_allclose(crop, oracle_crop(image, box, 64, 8, FILL), atol=1.0)


def test_default_fill_is_the_rounded_imagenet_mean():
    image = np.zeros((50, 50, 3), np.uint8)
    crop = warp_regions(image, np.array([[0, 0, 50, 50]], np.float32))[0]
    np.testing.assert_array_equal(crop[0, 0], np.floor(np.array(IMAGENET_MEAN_RGB) + 0.5))


def test_empty_and_outside_boxes():
    image = smooth_image(60, 80)
    assert warp_regions(image, np.zeros((0, 4), np.float32)).shape == (0, S, S, 3)
    crops = warp_regions(image, np.array([[200, 200, 300, 300], [-50, -50, -40, -40]], np.float32), S, PAD, FILL)
    assert np.all(crops == np.array(FILL, np.uint8))


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        warp_regions(np.zeros((10, 10, 3), np.float32), np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="finite"):
        warp_regions(np.zeros((10, 10, 3), np.uint8), np.array([[0, 0, np.nan, 5]], np.float32))


coord = st.floats(-50, 250, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(coord, coord, coord, coord), min_size=1, max_size=5))
def test_any_finite_box_gives_a_crop(boxes):
    image = smooth_image(90, 120)
    crops = warp_regions(image, np.array(boxes, np.float32), 32, 4, FILL)
    assert crops.shape == (len(boxes), 32, 32, 3) and crops.dtype == np.uint8


# --- torch ------------------------------------------------------------------------------------


def test_torch_version_matches_oracle_and_cv2_version():
    image = smooth_image(120, 160, seed=5)
    rng = np.random.default_rng(6)
    xy = rng.uniform(-20, 150, size=(10, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.2, 100, size=(10, 2))], axis=1).astype(np.float32)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float()
    crops = warp_regions_torch(tensor, torch.from_numpy(boxes), 64, 8, FILL)
    assert crops.shape == (10, 3, 64, 64) and crops.dtype == torch.float32
    crops_hwc = crops.permute(0, 2, 3, 1).numpy().astype(np.float64)
    for crop, box in zip(crops_hwc, boxes):
        np.testing.assert_allclose(crop, oracle_crop(image, box, 64, 8, FILL), atol=0.01)
    assert np.abs(crops_hwc - warp_regions(image, boxes, 64, 8, FILL)).max() <= 1.0


def test_accepts_a_flipped_view():
    image = smooth_image(60, 80)
    boxes = np.array([[5, 5, 40, 50]], np.float32)
    flipped = image[:, :, ::-1]
    np.testing.assert_array_equal(warp_regions(flipped, boxes), warp_regions(flipped.copy(), boxes))


def test_bfloat16_images_sample_at_float32_box_corners():
    # The RoIs were cast to the images' dtype: in bfloat16 a corner above 256 px rounds to a multiple of 2 px.
    from rcnn.modeling.warp import warp_many_torch, warp_plan

    image = torch.from_numpy(smooth_image(400, 600, seed=7)).permute(2, 0, 1).float()  # integers: exact in bfloat16
    boxes = np.array([[301.3, 257.7, 377.9, 333.1], [513.4, 1.6, 599.0, 99.2]], np.float32)
    sizes, index = np.array([[400, 600]]), np.zeros(2, np.int64)
    plan = warp_plan(sizes, index, boxes, 32, 4, FILL, image.device)
    src, _ = warp_geometry(boxes[0], 600, 400, 32, 4)  # the first box's dilated box lies inside the image
    assert plan.rois.dtype == torch.float32 and torch.equal(plan.rois[0, 1:], torch.from_numpy(src))
    crops32 = warp_many_torch(image[None], sizes, index, boxes, 32, 4, FILL)
    crops16 = warp_many_torch(image[None].bfloat16(), sizes, index, boxes, 32, 4, FILL)
    assert crops16.dtype == torch.bfloat16 and torch.equal(crops16, crops32.bfloat16())
