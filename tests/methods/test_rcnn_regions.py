"""R-CNN's region features: the device warp (torchvision roi_align, float crops) against the OpenCV warp
(uint8 crops) through the same network, and which warp each device picks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcnn.methods.rcnn_regions import region_features, warp_on_device
from rcnn.modeling.inference import for_inference
from rcnn.modeling.models import ENV_CHANNELS_LAST, build_model, channels_last


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


def test_device_warp_of_the_normalised_image_gives_the_normalised_crops():
    """region_features normalises the image once, before warping (fill included), instead of every crop:
    the network's inputs are the crops of the raw image, normalised, up to float32 rounding."""
    from rcnn.modeling.models import normalise_crops, normalised_fill, pixel_affine
    from rcnn.modeling.warp import warp_regions_torch

    torch.manual_seed(0)
    model = for_inference(build_model("tiny", 3, 32).eval())
    spec = model.spec
    assert np.allclose(normalised_fill(spec), 0.0, atol=1e-6)  # the mean pixel normalises to zero
    rng = np.random.default_rng(5)
    image = blocky_image(rng, 72, 96)
    xy = rng.uniform(-20, 80, (40, 2))  # some reach outside the image: fill
    boxes = np.concatenate([xy, xy + rng.uniform(2, 60, (40, 2))], axis=1).astype(np.float32)
    seen = []
    extract = model.extract
    model.extract = lambda x, layers: seen.append(x.clone()) or extract(x, layers)
    region_features(model, image, boxes, ("fc7",), context_pad=3, batch_size=16, warp="torch")
    fed = torch.cat(seen)
    raw = warp_regions_torch(torch.from_numpy(image).permute(2, 0, 1).float(), boxes, 32, 3, spec.mean_pixel)
    scale, shift = pixel_affine(spec, torch.device("cpu"))
    expected = raw * scale - shift
    assert fed.shape == expected.shape == (40, 3, 32, 32)
    assert (fed - expected).abs().max() < 1e-5 * expected.abs().max()
    outside = raw == torch.tensor(spec.mean_pixel).view(1, 3, 1, 1)
    assert outside.any() and fed[outside].abs().max() < 1e-6  # the fill, normalised
    # The OpenCV crops (uint8), normalised on the device, agree within rounding to a grey level.
    host = normalise_crops(np.ascontiguousarray(raw.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()), spec, "cpu")
    assert (host - fed).abs().max() <= 0.51 * scale.max()


@pytest.mark.parametrize("warp", ["opencv", "torch"])
def test_rows_of_a_layer_are_the_full_layers_rows(warp):
    model = for_inference(build_model("tiny", 3, 32).eval())
    rng = np.random.default_rng(7)
    image = blocky_image(rng, 64, 96)
    xy = rng.uniform(0, 60, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 30, (300, 2))], axis=1).astype(np.float32)
    full = region_features(model, image, boxes, ("pool5", "fc7"), context_pad=3, batch_size=64, warp=warp)
    chosen = np.array([299, 0, 5, 64, 65, 130, 5])  # across chunks of 64, out of order, one twice
    some = region_features(model, image, boxes, ("pool5", "fc7"), 3, 64, warp, rows={"pool5": chosen})
    assert np.array_equal(some["pool5"], full["pool5"][chosen]) and np.array_equal(some["fc7"], full["fc7"])
    none = region_features(model, image, boxes, ("pool5",), 3, 64, warp, rows={"pool5": np.zeros(0, np.int64)})
    assert none["pool5"].shape == (0, full["pool5"].shape[1])


def test_each_device_picks_its_faster_warp():
    assert not warp_on_device("auto", torch.device("cpu"))
    assert warp_on_device("auto", torch.device("cuda"))
    assert warp_on_device("torch", torch.device("cpu")) and not warp_on_device("opencv", torch.device("cuda"))
    with pytest.raises(ValueError, match="warp"):
        warp_on_device("fast", torch.device("cpu"))


def _training_setup(rng):
    from types import SimpleNamespace

    images = [blocky_image(rng, 96, 128), blocky_image(rng, 64, 80), blocky_image(rng, 40, 120)]
    anns = [SimpleNamespace(image_id=f"im{k}", height=im.shape[0], width=im.shape[1]) for k, im in enumerate(images)]
    boxes = [
        np.concatenate([xy := rng.uniform(-5, 60, (20, 2)), xy + rng.uniform(3, 50, (20, 2))], axis=1).astype(np.float32)
        for _ in images
    ]
    # Boxes reaching each image's right and bottom edges, where the slab's repeated border is read.
    for k, im in enumerate(images):
        h, w = im.shape[:2]
        boxes[k][:4] = [[w - 30, h - 20, w, h], [w - 9.7, 2, w + 3, h - 1], [1, h - 6.3, w - 2, h + 0.4], [0, 0, w, h]]
    return images, anns, boxes


def test_training_crops_on_the_device_match_the_host_crops_and_flip_alike():
    from rcnn.methods.rcnn_regions import WarpedRegions

    rng = np.random.default_rng(1)
    images, anns, boxes = _training_setup(rng)
    model = build_model("tiny", 3, 32)
    img_idx = np.array([1, 0, 0, 1, 0, 1, 1, 0, 2, 2, 0, 1, 2, 2])
    reg_idx = np.array([3, 0, 19, 7, 7, 0, 12, 5, 0, 1, 1, 2, 3, 17])
    made = {}
    for name, warp, slab_bytes in (("opencv", "opencv", 8 << 30), ("slab", "torch", 8 << 30), ("per image", "torch", 0)):
        regions = WarpedRegions(anns, boxes, model, 3, mirror=True, seed=5, warp=warp, slab_bytes=slab_bytes)
        regions.images._cache.update(enumerate(images))
        assert regions.use_slab == (slab_bytes > 0)
        made[name] = (regions.inputs(img_idx, reg_idx, None), regions.inputs(img_idx, reg_idx, 11))
    plain = made["opencv"]
    # One grey level of the 0-255 scale, in the network's normalised units (std about 0.23): uint8 rounding.
    level = 1 / (255 * 0.224)
    for device in (made["slab"], made["per image"]):
        for a, b in zip(plain, device):
            assert a.shape == b.shape == (14, 3, 32, 32)
            assert (a - b).abs().max() <= 1.01 * level
    # The slab's one roi_align over several images gives the per-image crops up to float rounding.
    for a, b in zip(made["slab"], made["per image"]):
        assert (a - b).abs().max() < 1e-4
    # All three flip the same crops: the iteration's draw mirrors some, and not all.
    flipped = [(f - u).abs().amax(dim=(1, 2, 3)) > 2 * level for u, f in made.values()]
    assert torch.equal(flipped[0], flipped[1]) and torch.equal(flipped[0], flipped[2]) and 0 < int(flipped[0].sum()) < 14
    device = made["slab"]
    assert (device[1][flipped[1]] - device[0][flipped[1]].flip(-1)).abs().max() < 1e-5


def test_the_slab_refuses_an_image_larger_than_its_annotation():
    from rcnn.errors import UserError
    from rcnn.methods.rcnn_regions import WarpedRegions

    rng = np.random.default_rng(2)
    images, anns, boxes = _training_setup(rng)
    anns[0].width = 100  # the file is 128 px wide, wider than any annotation says
    regions = WarpedRegions(anns, boxes, build_model("tiny", 3, 32), 3, mirror=False, seed=0, warp="torch")
    regions.images._cache.update(enumerate(images))
    with pytest.raises(UserError, match="'im0' is 128x96 pixels, larger than its annotation's 100x96"):
        regions.inputs(np.array([0, 1]), np.array([0, 0]), None)


def test_warping_many_images_at_once_equals_warping_each():
    from rcnn.modeling.warp import IMAGENET_MEAN_RGB, warp_many_torch, warp_plan, warp_planned, warp_regions_torch

    rng = np.random.default_rng(3)
    images, _, boxes = _training_setup(rng)
    tensors = [torch.from_numpy(im).permute(2, 0, 1).float() for im in images]
    height, width = max(t.shape[1] for t in tensors) + 2, max(t.shape[2] for t in tensors) + 3
    batch = torch.full((len(tensors), 3, height, width), 1e4)  # far from any pixel: a read of it shows
    sizes = []
    for k, t in enumerate(tensors):
        h, w = t.shape[1:]
        batch[k, :, :h, :w] = t
        batch[k, :, h, :w] = t[:, h - 1]
        batch[k, :, : h + 1, w] = batch[k, :, : h + 1, w - 1]
        sizes.append((h, w))
    index = np.repeat(np.arange(len(images)), [len(b) for b in boxes])
    many = warp_many_torch(batch, np.array(sizes), index, np.concatenate(boxes), 40, 4)
    each = torch.cat([warp_regions_torch(t, b, 40, 4) for t, b in zip(tensors, boxes)])
    assert many.shape == each.shape == (60, 3, 40, 40)
    assert (many - each).abs().max() < 1e-3  # on the 0-255 scale
    # One plan, sent to the device once, warped in chunks as the features are: the same crops, exactly.
    plan = warp_plan(np.array(sizes), index, np.concatenate(boxes), 40, 4, IMAGENET_MEAN_RGB, batch.device)
    chunks = torch.cat([warp_planned(batch, plan, slice(start, start + 16)) for start in range(0, 60, 16)])
    assert torch.equal(chunks, many)


def test_finetune_stage_on_the_device_warp_is_reproducible(pipelines_file, tmp_path, capsys):
    """`model.warp: torch` on a CPU runs the slab path of the fine-tuning stage end to end; two runs write the same model."""
    import hashlib

    from conftest import run_cli

    models = []
    for k in range(2):
        runs = tmp_path / f"runs{k}"
        common = ["tiny", "--runs-dir", str(runs), "--pipelines-file", str(pipelines_file), "--quiet"]
        for stage in ("proposals", "finetune"):
            code, _, err = run_cli([stage, *common, "--set", "model.warp=torch"], capsys)
            assert code == 0, err
        models.append(hashlib.sha256((runs / "tiny" / "finetune" / "trainval" / "model.pt").read_bytes()).hexdigest())
    assert models[0] == models[1]


def test_each_device_picks_its_layout_and_the_variable_forces_one(monkeypatch):
    monkeypatch.delenv(ENV_CHANNELS_LAST, raising=False)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert channels_last(gpu) and channels_last(gpu, whole_images=True)  # cuDNN's layout for bfloat16
    assert channels_last(cpu, whole_images=True) and not channels_last(cpu)  # SPP-net's trunk, not R-CNN's crops
    monkeypatch.setenv(ENV_CHANNELS_LAST, "0")
    assert not channels_last(gpu) and not channels_last(cpu, whole_images=True)
    monkeypatch.setenv(ENV_CHANNELS_LAST, "1")
    assert channels_last(cpu)


@pytest.mark.parametrize("warp", ["opencv", "torch"])
def test_channels_last_crops_give_the_features_of_the_default_layout(warp, monkeypatch):
    """What a GPU runs (weights channels-last, crops in either warp) against the CPU's default layout."""
    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    image = blocky_image(rng, 120, 160)
    xy = rng.uniform(0, 120, (40, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 60, (40, 2))], axis=1).astype(np.float32)
    feats = {}
    for forced in ("0", "1"):
        monkeypatch.setenv(ENV_CHANNELS_LAST, forced)
        torch.manual_seed(0)
        model = for_inference(build_model("squeezenet1_0", 3, 64).eval())
        assert model.trunk[0].weight.is_contiguous(memory_format=torch.channels_last) == (forced == "1")
        feats[forced] = region_features(model, image, boxes, ("pool5", "fc7"), context_pad=4, warp=warp)
    for layer in ("pool5", "fc7"):
        a, b = feats["0"][layer].astype(np.float32), feats["1"][layer].astype(np.float32)
        # The same sums in another order, rounded to float16: within a few float16 steps of the largest value.
        assert np.abs(a - b).max() <= 2e-3 * np.abs(a).max(), layer


def test_finetune_and_features_run_channels_last(pipelines_file, tmp_path, capsys, monkeypatch):
    """The GPU's layout through the stages (forced on the CPU): fine-tuning saves a checkpoint that loads
    into a plain model, and features come out of it."""
    from conftest import run_cli

    from rcnn.modeling.checkpoints import load_checkpoint

    monkeypatch.setenv(ENV_CHANNELS_LAST, "1")
    runs = tmp_path / "runs"
    argv = ["run", "tiny", "--until", "features", "--runs-dir", str(runs), "--pipelines-file", str(pipelines_file), "--quiet"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    model, _ = load_checkpoint(runs / "tiny" / "finetune" / "trainval" / "model.pt")
    assert not model.trunk[0].weight.is_contiguous(memory_format=torch.channels_last)  # a plain model, values only
    assert (runs / "tiny" / "features" / "test" / "index.json").is_file()
