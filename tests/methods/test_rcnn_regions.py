"""R-CNN's region features: the device warp (torchvision roi_align, float crops) against the OpenCV warp
(uint8 crops) through the same network, and which warp each device picks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcnn.methods.rcnn_regions import region_features, warp_on_device
from rcnn.modeling.inference import for_inference
from rcnn.modeling.models import build_model


def blocky_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An RGB image of 4 x 4 pixel blocks: edges that a half-pixel shift of a sample would change."""
    small = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(small, 4, axis=0), 4, axis=1))


@pytest.mark.parametrize(("backbone", "size"), [("tiny", 32), ("squeezenet1_0", 64)])
def test_device_warp_features_match_the_opencv_warp(backbone, size):
    torch.manual_seed(0)
    model = for_inference(build_model(backbone, 3, size).eval())
    rng = np.random.default_rng(0)
    image = blocky_image(rng, 120, 160)
    xy = rng.uniform(-10, 150, (60, 2))  # some boxes reach outside the image: their context is fill
    boxes = np.concatenate([xy, xy + rng.uniform(2, 90, (60, 2))], axis=1).astype(np.float32)
    layers = ("pool5", "fc7")
    plain = region_features(model, image, boxes, layers, context_pad=4, warp="opencv")
    fast = region_features(model, image, boxes, layers, context_pad=4, warp="torch")
    for layer in layers:
        a, b = plain[layer].astype(np.float32), fast[layer].astype(np.float32)
        assert a.shape == b.shape == (60, a.shape[1])
        # Tolerance: uint8 rounding of OpenCV's crops (up to half a grey level) and its 1/32 px sample
        # positions, then float16 features: within 1 % of the layer's largest value.
        assert np.abs(a - b).max() <= 0.01 * np.abs(a).max(), layer
        rows = np.linalg.norm(a, axis=1) > 0.1 * np.linalg.norm(a, axis=1).max()
        rel = np.linalg.norm(a - b, axis=1)[rows] / np.linalg.norm(a, axis=1)[rows]
        assert np.median(rel) < 0.01, layer
    # Not the same function by accident: a box shifted by two pixels moves the features by far more.
    shifted = region_features(model, image, boxes + 2, layers, context_pad=4, warp="torch")
    assert np.abs(shifted["fc7"].astype(np.float32) - plain["fc7"]).max() > 5 * np.abs(fast["fc7"] - plain["fc7"]).max()


def test_each_device_picks_its_faster_warp():
    assert not warp_on_device("auto", torch.device("cpu"))
    assert warp_on_device("auto", torch.device("cuda"))
    assert warp_on_device("torch", torch.device("cpu")) and not warp_on_device("opencv", torch.device("cuda"))
    with pytest.raises(ValueError, match="warp"):
        warp_on_device("fast", torch.device("cpu"))


def test_training_crops_on_the_device_match_the_host_crops_and_flip_alike():
    from types import SimpleNamespace

    from rcnn.methods.rcnn_regions import WarpedRegions

    rng = np.random.default_rng(1)
    images = [blocky_image(rng, 96, 128), blocky_image(rng, 64, 80)]
    boxes = [
        np.concatenate([xy := rng.uniform(-5, 60, (20, 2)), xy + rng.uniform(3, 50, (20, 2))], axis=1).astype(np.float32)
        for _ in images
    ]
    model = build_model("tiny", 3, 32)
    made = {}
    for warp in ("opencv", "torch"):
        regions = WarpedRegions([SimpleNamespace() for _ in images], boxes, model, 3, mirror=True, seed=5, warp=warp)
        regions.images._cache.update(enumerate(images))
        img_idx = np.array([1, 0, 0, 1, 0, 1, 1, 0])
        reg_idx = np.array([3, 0, 19, 7, 7, 0, 12, 5])
        made[warp] = (regions.inputs(img_idx, reg_idx, None), regions.inputs(img_idx, reg_idx, 11))
    plain, device = made["opencv"], made["torch"]
    # One grey level of the 0-255 scale, in the network's normalised units (std about 0.23): uint8 rounding.
    level = 1 / (255 * 0.224)
    for a, b in zip(plain, device):
        assert a.shape == b.shape == (8, 3, 32, 32)
        assert (a - b).abs().max() <= 1.01 * level
    # Both flip the same crops: the iteration's draw mirrors some, and not all.
    flipped = [(f - u).abs().amax(dim=(1, 2, 3)) > 2 * level for u, f in ((plain[0], plain[1]), (device[0], device[1]))]
    assert torch.equal(flipped[0], flipped[1]) and 0 < int(flipped[0].sum()) < 8
    assert (device[1][flipped[1]] - device[0][flipped[1]].flip(-1)).abs().max() < 1e-5
