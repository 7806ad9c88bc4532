"""Pooling the windows of several images at their chosen scales, checked window by window against the slow loop."""

from __future__ import annotations

import numpy as np
import torch
from oracles import random_boxes, slow_spp

from rcnn.methods.spp_regions import MANY_WINDOWS, pool_images, spp_region_features
from rcnn.modeling.models import build_model
from rcnn.modeling.spp import bins_order, spp_pool
from rcnn.modeling.spp_geometry import map_windows, select_scale


def test_pool_images_matches_one_window_at_a_time():
    rng = np.random.default_rng(0)
    stride, levels, target, factors, offset = 4, (6, 3, 2, 1), 12.0, [0.5, 1.0], 1.5
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
            rect = map_windows(box[None] * factors[k], stride, m.shape[1], m.shape[2], offset)
            expected.append(slow_spp(m.numpy(), rect, levels)[0])
    got = pool_images(items, stride, levels, target, offset)
    assert got.shape == (len(expected), 3 * 50)
    # the slow loop flattens channel-major; the pipeline's pyramids are bin-major
    assert np.array_equal(got.numpy(), np.stack(expected)[:, bins_order(3, levels)])
    # both scales were used, so the batch mixed maps of different sizes
    scales = np.concatenate([select_scale(b, factors, target) for _, _, b in items])
    assert set(scales.tolist()) == {0, 1}


def test_pool_images_without_windows():
    maps = [torch.zeros(3, 8, 8)]
    assert pool_images([(maps, [1.0], np.zeros((0, 4), np.float32))], 4, (2, 1)).shape == (0, 15)


def test_spp_region_features_pools_repeated_windows_once_and_matches_the_slow_loop():
    rng = np.random.default_rng(3)
    model = build_model("tiny", 3, 64, 32, spp_levels=(3, 2, 1)).eval()
    stride, factors, target = model.spec.stride, [0.5, 1.0], 24.0
    # cached maps are channels last, [H, W, C]
    maps = [rng.standard_normal((int(96 * f) // stride, int(96 * f) // stride, 96)).astype(np.float16) for f in factors]
    boxes = random_boxes(rng, 3 * MANY_WINDOWS, 96)
    # repeats: five boxes twice, and one moved by a quarter pixel (mostly the same cells)
    boxes = np.concatenate([boxes, boxes[:5], boxes[5:6] + 0.25]).astype(np.float32)
    feats = spp_region_features(model, maps, factors, boxes, ("pool5", "fc7"), target)

    expected = []
    for box, k in zip(boxes, select_scale(boxes, factors, target)):
        m = maps[k].transpose(2, 0, 1).astype(np.float32)
        rect = map_windows(box[None] * factors[k], stride, m.shape[1], m.shape[2], model.spec.offset)
        expected.append(slow_spp(m, rect, (3, 2, 1))[0])
    expected = np.stack(expected)[:, bins_order(96, (3, 2, 1))]
    assert feats["pool5"].dtype == np.float16
    assert np.array_equal(feats["pool5"], expected.astype(np.float16))  # float16 maxima are exact
    with torch.no_grad():
        fc7 = model.head(torch.from_numpy(expected), ("fc7",))["fc7"].numpy()
    np.testing.assert_allclose(feats["fc7"].astype(np.float32), fc7, rtol=2e-3, atol=2e-3)
    assert np.array_equal(feats["fc7"][-6:-1], feats["fc7"][:5])


def test_float16_maps_pool_to_the_same_maxima_as_float32():
    rng = np.random.default_rng(4)
    fmap = rng.standard_normal((5, 20, 24)).astype(np.float16)
    rects = map_windows(random_boxes(rng, 40, 160), 8, 20, 24)
    half = spp_pool(torch.from_numpy(fmap), rects, (6, 3, 2, 1), algorithm="table")
    full = spp_pool(torch.from_numpy(fmap.astype(np.float32)), rects, (6, 3, 2, 1), algorithm="table")
    assert half.dtype == torch.float16
    assert torch.equal(half.float(), full)


def test_maps_left_on_the_device_give_the_features_of_maps_sent_to_the_host():
    from rcnn.methods.spp_regions import PooledRegionFeatures, image_maps
    from rcnn.modeling.inference import for_inference

    rng = np.random.default_rng(4)
    model = for_inference(build_model("tiny", 4, 32, spp_levels=(2, 1)).eval(), whole_images=True)
    image = rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)
    factors = [0.8, 1.3]
    host, kept = image_maps(model, image, factors), image_maps(model, image, factors, to_host=False)
    assert all(isinstance(m, np.ndarray) for m in host) and all(isinstance(m, torch.Tensor) for m in kept)
    for a, b in zip(host, kept):
        assert a.dtype == np.float16 and np.array_equal(a, b.numpy())
    boxes = random_boxes(rng, 40, 90)
    detector = PooledRegionFeatures(model, scales=(72, 117), max_side=None, target=32)
    got = detector(image, boxes, ("pool5", "fc7"))
    factors = [72 / 90, 117 / 90]  # shorter side 90 px to 72 and 117
    want = spp_region_features(model, image_maps(model, image, factors), factors, boxes, ("pool5", "fc7"), 32)
    for layer in ("pool5", "fc7"):
        assert np.array_equal(got[layer], want[layer])
