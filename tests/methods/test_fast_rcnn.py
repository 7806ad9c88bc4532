"""Fast R-CNN's parts: image-centric mini-batches, box targets and their normalisation, RoI pooling, the multi-task
loss, the test-time outputs, and its checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_pool

from rcnn.data.datasets import ImageAnnotation
from rcnn.methods.fast_regions import (
    FALLBACK_STDS,
    FastRegions,
    fast_outputs_later,
    image_input,
    pooled_regions,
    regression_targets,
    rois_at,
    scored_boxes,
    target_statistics,
)
from rcnn.modeling.checkpoints import load_checkpoint, save_checkpoint
from rcnn.modeling.models import add_box_head, build_model
from rcnn.structures.box_coding import decode
from rcnn.training.sampling import ImageBatchSampler


def labels_of(*images: list[int]) -> list[np.ndarray]:
    return [np.asarray(x, np.int64) for x in images]


def test_batches_take_two_images_and_a_quarter_foreground_from_each():
    rng = np.random.default_rng(0)
    per_image = [rng.choice([-1, 0, 0, 0, 1, 2], size=200) for _ in range(7)]
    s = ImageBatchSampler.from_image_labels(per_image, batch_size=16, fg_fraction=0.25, images_per_batch=2)
    batches = list(s.epoch_batches(3, n_batches=14))
    assert len(batches) == 14
    seen = []
    for b in batches:
        img, _ = s.locate(b)
        assert len(np.unique(img)) == 2 and len(b) == 16 and len(np.unique(b)) == 16
        for i in np.unique(img):
            mine = b[img == i]
            assert (s.labels[mine] > 0).sum() == 2 and (s.labels[mine] == 0).sum() == 6  # 8 per image, a quarter fg
        assert (s.labels[b] >= 0).all()
        seen.append(np.unique(img))
    # Shuffled passes: the first 7 batches' 14 image slots hold every image twice, no image thrice.
    counts = np.bincount(np.concatenate(seen[:7]), minlength=7)
    assert counts.tolist() == [2] * 7
    again = list(s.epoch_batches(3, n_batches=14))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


def test_an_image_short_of_background_gives_fewer_regions_and_unusable_images_are_never_drawn():
    labels = labels_of([1, 1, 1, 0], [-1, -1, -1], [2, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    s = ImageBatchSampler.from_image_labels(labels, batch_size=16, fg_fraction=0.25, images_per_batch=2)
    assert s.usable_images.tolist() == [0, 2]
    for b in s.epoch_batches(0, n_batches=6):
        img, reg = s.locate(b)
        assert set(img.tolist()) == {0, 2}
        first = b[img == 0]
        # 2 of the 3 foreground (a quarter of 8), then the one background there is.
        assert (s.labels[first] > 0).sum() == 2 and (s.labels[first] == 0).sum() == 1
        third = b[img == 2]
        assert (s.labels[third] > 0).sum() == 1 and (s.labels[third] == 0).sum() == 7


def test_targets_move_each_foreground_region_onto_its_best_object():
    gt = np.array([[10, 10, 50, 40], [60, 20, 90, 80]], np.float32)
    boxes = np.concatenate([gt, [[12, 8, 48, 44], [58, 25, 95, 75], [0, 0, 5, 5]]]).astype(np.float32)
    labels = np.array([1, 2, 1, 2, 0])
    t = regression_targets(boxes, gt, labels)
    assert np.allclose(t[:2], 0, atol=1e-6)  # ground truth onto itself
    assert np.allclose(decode(boxes[2:4], t[2:4]), gt, atol=1e-4)
    assert (t[4] == 0).all()  # background: no target


def test_target_statistics_are_per_class_with_a_fallback_for_classes_with_too_few_rows():
    rng = np.random.default_rng(1)
    targets = [rng.normal(size=(30, 4)).astype(np.float32), rng.normal(size=(20, 4)).astype(np.float32)]
    labels = [rng.choice([-1, 0, 1], size=30), np.r_[[2], rng.choice([0, 1], size=19)]]
    mean, std = target_statistics(targets, labels, num_classes=3)
    t, lab = np.concatenate(targets), np.concatenate(labels)
    assert np.allclose(mean[4:8], t[lab == 1].mean(0), atol=1e-6) and np.allclose(std[4:8], t[lab == 1].std(0), atol=1e-6)
    assert (mean[:4] == 0).all() and np.allclose(std[:4], FALLBACK_STDS)  # background
    assert (mean[8:] == 0).all() and np.allclose(std[8:], FALLBACK_STDS)  # one row of class 2 only


def test_rois_are_the_first_and_last_pixel_scaled_as_fast_rcnns_roi_pooling_reads_them():
    rois = rois_at(np.array([[0, 0, 32, 16], [10, 4, 11, 5]], np.float32), 2.0)
    assert rois.tolist() == [[0, 0, 0, 62, 30], [0, 20, 8, 20, 8]]


def small_model(num_classes: int = 3):
    torch.manual_seed(0)
    return add_box_head(build_model("tiny", num_classes, 32))


def annotation(width: int = 64, height: int = 48) -> ImageAnnotation:
    boxes = np.array([[8, 8, 40, 40]], np.float32)
    return ImageAnnotation("a", None, width, height, boxes, ("c1",), np.zeros(1, bool))


class Images:
    """Stands in for the decoded-image cache: one fixed RGB image."""

    def __init__(self, image):
        self.image = image

    def __getitem__(self, i):
        return self.image


def regions_for(model, mirror=False, frozen=0, scales=(48,)):
    ann = annotation()
    boxes = [np.array([[8, 8, 40, 40], [10, 6, 44, 38], [0, 20, 30, 47], [30, 0, 63, 30]], np.float32)]
    labels = [np.array([1, 1, 0, 0])]
    regions = FastRegions([ann], boxes, labels, model, scales=scales, max_side=None, mirror=mirror, seed=0, frozen_convs=frozen)
    regions.images = Images(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    return regions, labels


def test_the_loss_is_log_loss_plus_smooth_l1_of_the_true_class_deltas_over_the_batch():
    model = small_model()
    model.eval()  # no dropout: the two forward passes below must agree
    regions, labels = regions_for(model)
    regions.normalise_targets(labels)
    with torch.no_grad():
        model.bbox_mean.copy_(torch.linspace(-0.1, 0.1, 12))
        model.bbox_std.copy_(torch.linspace(0.1, 0.3, 12))
        model.bbox_pred.bias.copy_(torch.linspace(-1, 1, 12))
    img, reg = np.zeros(4, np.int64), np.array([2, 0, 3, 1])
    target = torch.from_numpy(labels[0][reg])
    logits = regions.logits(img, reg, None)
    loss = regions.loss(logits, target)
    # By hand: the deltas of each foreground row's own class, against its normalised target.
    deltas, _ = regions._last
    t = torch.from_numpy(regions.targets[0][reg])
    box = 0.0
    for k in np.flatnonzero(labels[0][reg] > 0):
        cols = slice(4 * target[k], 4 * target[k] + 4)
        norm = (t[k] - model.bbox_mean[cols]) / model.bbox_std[cols]
        box += F.smooth_l1_loss(deltas[k, cols], norm, reduction="sum", beta=1.0)
    expected = F.cross_entropy(logits, target) + box / 4
    assert torch.allclose(loss, expected, atol=1e-6)
    # Rows in batch order: the same logits as each row run alone.
    alone = regions.logits(np.zeros(1, np.int64), np.array([3]), None)
    assert torch.allclose(alone[0], logits[2], atol=1e-5)


def test_background_only_batches_have_no_box_loss():
    model = small_model()
    regions, labels = regions_for(model)
    img, reg = np.zeros(2, np.int64), np.array([2, 3])
    target = torch.zeros(2, dtype=torch.int64)
    logits = regions.logits(img, reg, None)
    assert torch.equal(regions.loss(logits, target), F.cross_entropy(logits, target))


def test_a_mirrored_image_mirrors_its_regions_and_their_horizontal_targets():
    model = small_model()
    model.eval()
    regions, _ = regions_for(model, mirror=True)
    img, reg = np.zeros(4, np.int64), np.arange(4)
    flipped = [it for it in range(20) if np.random.default_rng([0, it]).random(1)[0] < 0.5][0]
    regions.logits(img, reg, flipped)
    _, target = regions._last
    plain = regions.targets[0]
    assert np.allclose(target[:, 0].numpy(), -plain[:, 0]) and np.allclose(target[:, 1:].numpy(), plain[:, 1:])


def test_frozen_convs_get_no_gradient_and_the_rest_learns():
    model = small_model()
    regions, labels = regions_for(model, frozen=1)
    first, second = [m for m in model.trunk.modules() if isinstance(m, torch.nn.Conv2d)][:2]
    assert all(id(p) not in {id(q) for q in regions.trainable()} for p in first.parameters())
    logits = regions.logits(np.zeros(4, np.int64), np.arange(4), 0)
    regions.loss(logits, torch.from_numpy(labels[0])).backward()
    assert first.weight.grad is None
    assert second.weight.grad is not None and model.bbox_pred.weight.grad.abs().sum() > 0


def test_test_outputs_are_log_probabilities_and_un_normalised_deltas_of_each_roi():
    model = small_model()
    with torch.no_grad():
        model.bbox_pred.weight.zero_()
        model.bbox_pred.bias.copy_(torch.linspace(-1, 1, 12))
        model.bbox_mean.copy_(torch.full((12,), 0.05))
        model.bbox_std.copy_(torch.full((12,), 0.2))
    model.eval()
    image = np.random.default_rng(2).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    boxes = np.array([[8, 8, 40, 40], [0, 0, 64, 48]], np.float32)
    out = fast_outputs_later(model, image, boxes, [1.0]).arrays()
    assert np.allclose(np.exp(out["cls_logprob"].astype(np.float32)).sum(1), 1, atol=2e-3)
    assert np.allclose(out["bbox_deltas"], np.linspace(-1, 1, 12) * 0.2 + 0.05, atol=1e-3)
    # fc6 reads Fast R-CNN's RoI max pooling of the trunk's map, as torchvision's roi_pool computes it.
    conv = model.trunk(image_input(model, image, 1.0))
    grid = model.spec.pool5_grid
    pooled = roi_pool(conv, torch.from_numpy(rois_at(boxes, 1.0)), (grid, grid), 1 / model.spec.stride)
    logits = model.classifier(model.head(pooled)["fc7"])
    assert np.allclose(out["cls_logprob"], torch.log_softmax(logits, 1).detach().numpy(), atol=2e-3)
    scores, refine = scored_boxes(out, boxes)
    assert scores.shape == (2, 2) and np.allclose(refine(1), decode(boxes, out["bbox_deltas"][:, 8:12]))


def test_checkpoints_keep_the_box_layer_and_its_target_statistics(tmp_path):
    model = small_model()
    with torch.no_grad():
        model.bbox_std.copy_(torch.arange(12.0))
    save_checkpoint(tmp_path / "model.pt", model, {"classes": ["a", "b"]})
    loaded, _ = load_checkpoint(tmp_path / "model.pt")
    assert torch.equal(loaded.bbox_std, model.bbox_std) and torch.equal(loaded.bbox_pred.weight, model.bbox_pred.weight)
    plain = build_model("tiny", 3, 32)
    save_checkpoint(tmp_path / "plain.pt", plain, {"classes": ["a", "b"]})
    assert not hasattr(load_checkpoint(tmp_path / "plain.pt")[0], "bbox_pred")


@pytest.mark.parametrize("bad", ["fast.images_per_batch=0", "fast.scales=[8]", "fast.box_loss_weight=-1"])
def test_bad_fast_settings_are_refused(bad, pipelines_file):
    from rcnn.config import PipelineFile
    from rcnn.errors import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0].split(".")[1]):
        PipelineFile(pipelines_file).load("tiny", overrides=[bad, "method=fast"])


def test_the_input_scale_brings_fc6s_input_to_the_asked_rms():
    model = small_model()
    regions, labels = regions_for(model)
    sampler = ImageBatchSampler.from_image_labels(labels, batch_size=4, fg_fraction=0.5, images_per_batch=1)
    scale = regions.input_scale(sampler, seed=0, rms=2.0, n_batches=1)
    # By hand: the mean norm of the RoI-pooled vectors of the batch drawn with the same seed.
    from rcnn.methods.fast_regions import image_input

    batch = next(iter(sampler.epoch_batches(0, n_batches=1)))
    _, reg = sampler.locate(batch)
    with torch.no_grad():
        conv = model.trunk(image_input(model, regions.images[0], 1.0))
        grid = model.spec.pool5_grid
        pooled = roi_pool(conv, torch.from_numpy(rois_at(regions.boxes[0][reg], 1.0)), (grid, grid), 1 / model.spec.stride)
    mean_norm = float(torch.flatten(pooled, 1).norm(dim=1).mean())
    assert scale == pytest.approx(2.0 * model.spec.pool5_dim**0.5 / mean_norm, rel=1e-5)


def test_with_several_scales_each_region_is_pooled_at_the_scale_closest_to_224_pixels():
    model = small_model().eval()
    image = np.random.default_rng(3).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    # At factors 2 and 8 (images 120 x 160 and 480 x 640), against 224 x 224 = 50,176: a 20 x 30 box has area
    # 2,400 at 2 and 38,400 at 8, so 8; the whole image, 80 x 60, has 19,200 at 2 and 307,200 at 8, so 2.
    boxes = np.array([[0, 0, 20, 30], [0, 0, 80, 60], [10, 10, 30, 40]], np.float32)
    factors = [2.0, 8.0]
    expected_level = [1, 0, 1]
    grid = model.spec.pool5_grid
    with torch.no_grad():
        got = pooled_regions(model, image, boxes, factors)
        for row, level in enumerate(expected_level):
            conv = model.trunk(image_input(model, image, factors[level]))
            rois = torch.from_numpy(rois_at(boxes[row : row + 1], factors[level]))
            torch.testing.assert_close(got[row : row + 1], roi_pool(conv, rois, (grid, grid), 1 / model.spec.stride))
        # one scale: every region from that scale's map, as before there were several
        conv = model.trunk(image_input(model, image, 2.0))
        one = roi_pool(conv, torch.from_numpy(rois_at(boxes, 2.0)), (grid, grid), 1 / model.spec.stride)
        torch.testing.assert_close(pooled_regions(model, image, boxes, [2.0]), one)
        # test-time outputs read the same pooled grids
        out = fast_outputs_later(model, image, boxes, factors).arrays()
        logits = model.classifier(model.head(got)["fc7"])
    assert np.allclose(out["cls_logprob"], torch.log_softmax(logits, 1).numpy(), atol=2e-3)


def test_training_draws_one_scale_per_image_and_step_and_a_resumed_run_draws_the_same():
    model = small_model()
    regions, _ = regions_for(model, scales=(24, 48, 96))
    images = np.array([0])
    draws = [regions._drawn(images, it) for it in range(60)]
    assert all(len(d) == 1 and len(d[0]) == 1 for d in draws)
    assert sorted({d[0][0] for d in draws}) == [0.5, 1.0, 2.0]  # each of the three scales, of a 48 px tall image
    assert draws == [regions._drawn(images, it) for it in range(60)]  # keyed by the iteration: the same again
    assert regions._drawn(images, None) == [[0.5, 1.0, 2.0]]  # held out: every scale, the test rule picks
    single, _ = regions_for(model)
    assert single._drawn(images, 5) == [[1.0]]


def test_held_out_regions_are_scored_as_at_test_time():
    model = small_model().eval()
    regions, _ = regions_for(model, scales=(24, 96))
    with torch.no_grad():
        logits = regions.logits(np.zeros(4, np.int64), np.arange(4), iteration=None)
        out = fast_outputs_later(model, regions.images[0], regions.boxes[0], [0.5, 2.0]).arrays()
    assert np.allclose(out["cls_logprob"], torch.log_softmax(logits, 1).numpy(), atol=2e-3)
