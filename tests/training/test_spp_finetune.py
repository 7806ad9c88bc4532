"""SPP-net's fine-tuning inputs: windows pooled from the cached maps, mirrored and at random scales,
checked against the slow loop over bins on maps and boxes flipped by hand."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from oracles import random_boxes, slow_spp

from rcnn.config import PipelineFile
from rcnn.methods.spp_regions import PooledRegions
from rcnn.modeling.spp import bins_order
from rcnn.modeling.spp_geometry import map_windows, select_scale
from rcnn.stages import convmaps
from rcnn.stages.context import Context
from rcnn.stages.convmaps import untrained_model
from rcnn.stages.methods import build_method

SIZE, FACTORS = 96, [0.5, 1.0]


@pytest.fixture
def regions(pipelines_file, tmp_path, monkeypatch):
    """PooledRegions over two 96 px images with made-up maps at two scales, their mirror images' maps
    unrelated to them (so a window read from the wrong maps cannot pass)."""

    def make(*overrides: str) -> tuple[PooledRegions, dict, list[np.ndarray]]:
        cfg = PipelineFile(pipelines_file).load("tiny-spp", ("spp.target_size=24", *overrides))
        ctx = Context(cfg=cfg, runs_dir=tmp_path / "runs", progress=False, log=lambda _: None)
        rng = np.random.default_rng(1)
        ids = ["a", "b"]
        maps = {
            (i, mirror): [rng.standard_normal((int(SIZE * f) // 8, int(SIZE * f) // 8, 96)).astype(np.float16) for f in FACTORS]
            for i in ids
            for mirror in (False, True)
        }
        monkeypatch.setattr(convmaps, "load", lambda ctx, split: None)
        monkeypatch.setattr(convmaps, "image_record", lambda rs, i, mirror=False: (maps[i, mirror], np.float32(FACTORS)))
        boxes = [random_boxes(rng, 60, SIZE) for _ in ids]
        anns = [SimpleNamespace(image_id=i, width=SIZE) for i in ids]
        labels = [np.zeros(len(b), np.int64) for b in boxes]  # SPP-net reads none of them
        return build_method(cfg).training_regions(ctx, anns, boxes, untrained_model(ctx, spp=True), labels), maps, boxes

    return make


def expected_pyramid(maps: dict, image_id: str, box: np.ndarray, mirror: bool, scale: int | None, offset: float) -> np.ndarray:
    if mirror:  # by hand: the box as it lies in the flipped image
        box = np.array([SIZE - box[2], box[1], SIZE - box[0], box[3]], np.float32)
    k = int(select_scale(box[None], FACTORS, 24.0)[0]) if scale is None else scale
    fmap = maps[image_id, mirror][k].transpose(2, 0, 1).astype(np.float32)
    rect = map_windows(box[None] * np.float32(FACTORS[k]), 8, fmap.shape[1], fmap.shape[2], offset)
    return slow_spp(fmap, rect, (6, 3, 2, 1))[0][bins_order(96, (6, 3, 2, 1))]


def test_windows_pool_from_the_mirror_image_and_at_a_drawn_scale(regions):
    pooled_regions, maps, boxes = regions("finetune.mirror=true", "spp.random_scale=true")
    offset = pooled_regions.model.spec.offset
    rng = np.random.default_rng(2)
    # a batch that interleaves the two images, repeats a window and mixes every case
    img = np.array([0, 1, 0, 1, 1, 0, 0, 1, 0, 1])
    reg = np.array([0, 3, 5, 3, 7, 0, 11, 2, 9, 4])
    mirror = np.array([False, True, True, False, True, False, True, False, False, True])
    draw = rng.random(len(img))
    for m, d in ((None, None), (mirror, None), (None, draw), (mirror, draw)):
        got = pooled_regions.pooled(img, reg, m, d).numpy()
        expected = np.stack(
            [
                expected_pyramid(
                    maps,
                    "ab"[i],
                    boxes[i][r],
                    bool(m[row]) if m is not None else False,
                    None if d is None else int(d[row] * 2),
                    offset,
                )
                for row, (i, r) in enumerate(zip(img, reg))
            ]
        )
        assert np.array_equal(got, expected)
    # the draws did reach both scales and both mirror cases, so the comparisons above covered them
    assert set((draw * 2).astype(int).tolist()) == {0, 1} and mirror.any() and not mirror.all()

    # every window of both images, mirrored: the flip must be exact to the pixel (x -> W - x), not
    # just near, or some of these 480 window edges would land on other cells
    img, reg = np.repeat([0, 1], 60), np.tile(np.arange(60), 2)
    for d in (np.zeros(120), np.full(120, 0.99)):
        got = pooled_regions.pooled(img, reg, np.ones(120, bool), d).numpy()
        expected = [expected_pyramid(maps, "ab"[i], boxes[i][r], True, int(d[0] * 2), offset) for i, r in zip(img, reg)]
        assert np.array_equal(got, np.stack(expected))


def test_training_batches_draw_mirrors_and_scales_reproducibly(regions, monkeypatch):
    pooled_regions, _, _ = regions("finetune.mirror=true", "spp.random_scale=true")
    seen = []
    real = pooled_regions.pooled

    def spy(img, reg, mirror=None, draw=None):
        seen.append((mirror, draw))
        return real(img, reg, mirror, draw)

    monkeypatch.setattr(pooled_regions, "pooled", spy)
    pooled_regions.model.eval()  # no dropout: outputs depend on the pooled windows alone
    img, reg = np.repeat([0, 1], 200), np.tile(np.arange(12), 34)[:400]
    with torch.no_grad():
        first = pooled_regions.logits(img, reg, iteration=7)
        again = pooled_regions.logits(img, reg, iteration=7)  # a resumed run redraws the same
        other = pooled_regions.logits(img, reg, iteration=8)
        pooled_regions.logits(img, reg, iteration=None)  # validation: the images as they are, closest scale
    assert torch.equal(first, again) and not torch.equal(first, other)
    (m7, d7), (m7b, d7b), (m8, _), (m_val, d_val) = seen
    assert np.array_equal(m7, m7b) and np.array_equal(d7, d7b) and not np.array_equal(m7, m8)
    assert 0.4 < m7.mean() < 0.6 and 0.4 < (d7 < 0.5).mean() < 0.6
    assert m_val is None and d_val is None


def test_without_mirror_or_random_scale_training_windows_are_read_as_at_test_time(regions, monkeypatch):
    pooled_regions, _, _ = regions("finetune.mirror=false")  # random_scale is off by default
    seen = []

    def spy(img, reg, mirror=None, draw=None):
        seen.append((mirror, draw))
        return torch.zeros((len(img), pooled_regions.model.spec.pool5_dim))

    monkeypatch.setattr(pooled_regions, "pooled", spy)
    pooled_regions.logits(np.array([0, 0, 1, 1]), np.array([0, 1, 2, 3]), iteration=3)
    assert seen == [(None, None)]


def test_maps_kept_on_the_device_stay_within_their_byte_limit(regions):
    # Capped by count alone (4000 images), five scales of VOC images would not fit a 24 GB card.
    pooled_regions, maps, _ = regions("finetune.mirror=true")
    one = sum(m.nbytes for m in maps["a", False])
    pooled_regions.cache_limit = one + one // 2  # room for one image's maps, not two
    img, reg = np.array([0, 1, 0]), np.array([0, 1, 2])
    before = pooled_regions.pooled(img, reg).numpy()
    assert len(pooled_regions._cache) == 1  # the other image was read, then dropped to stay within the limit
    np.testing.assert_array_equal(pooled_regions.pooled(img, reg).numpy(), before)  # read again: the same windows
    pooled_regions.cache_limit = None
    pooled_regions.pooled(np.array([0, 1]), np.array([0, 1]), np.array([True, True]))
    assert len(pooled_regions._cache) == 3  # without a limit (a CPU), every image read is kept
