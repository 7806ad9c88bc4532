"""Fast R-CNN's regions (Girshick, ICCV 2015): the conv trunk once per whole image, every region RoI-pooled from
its map to the grid fc6 reads, and two sibling outputs, class scores and class-specific box deltas, trained
jointly with the whole network (bar its first conv layers).

In fine-tuning :class:`FastRegions` gives the training loop its class scores and its loss (section 2.3:
log loss plus a smooth L1 box loss on the foreground); at test time :func:`fast_outputs_later` gives each
region's class log-probabilities and box deltas (section 3). Nothing here reads a configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from torchvision.ops import roi_pool

from rcnn.data.datasets import ImageAnnotation
from rcnn.methods.rcnn_regions import RegionImages
from rcnn.methods.spp_regions import image_input
from rcnn.modeling.inference import for_inference, inference_autocast
from rcnn.modeling.models import DetectorNet
from rcnn.modeling.spp import roi_pool_by_table
from rcnn.modeling.spp_geometry import TARGET_SIZE, image_scales, select_scale
from rcnn.modeling.transfer import HostCopy, to_device
from rcnn.structures.box_coding import decode, encode
from rcnn.structures.boxes import box_iou, mirror_boxes

#: What the network gives per region at test time, and what stage `features` caches for this method:
#: ``cls_logprob`` ``[N, C + 1]`` (log-softmax: float16 keeps scores near 1 apart, which probabilities would
#: round together) and ``bbox_deltas`` ``[N, 4 (C + 1)]`` (class-specific, un-normalised).
OUTPUTS = ("cls_logprob", "bbox_deltas")

#: Leading conv layers that stay fixed (section 4.5): models S and M (AlexNet-sized) fine-tune conv2 and up,
#: VGG16 conv3_1 and up. SqueezeNet is taken as S-sized; the demo's tiny net learns everywhere.
FROZEN_CONVS = {"alexnet": 1, "squeezenet1_0": 1, "vgg16": 4, "tiny": 0}

#: Standard deviations a class's targets fall back to where it has fewer than two training boxes: the fixed
#: ones of Girshick's py-faster-rcnn (``BBOX_NORMALIZE_STDS``).
FALLBACK_STDS = (0.1, 0.1, 0.2, 0.2)


def rois_at(boxes: np.ndarray, factor: float) -> np.ndarray:
    """RoIs of ``boxes`` ``[N, 4]`` (continuous ``x1, y1, x2, y2``) in an image resized by ``factor``, as Fast
    R-CNN's RoI pooling reads them: pixel indices of the first and last pixel covered (``x2 - 1``), scaled
    (the layer rounds them to conv cells at ``1 / stride``). float32 ``[N, 5]``, batch index 0 first."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    inclusive = np.stack([b[:, 0], b[:, 1], np.maximum(b[:, 2] - 1, b[:, 0]), np.maximum(b[:, 3] - 1, b[:, 1])], 1)
    return np.concatenate([np.zeros((len(b), 1), np.float32), inclusive * np.float32(factor)], 1).astype(np.float32)


def pool_rois(model: DetectorNet, conv: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    """``rois`` ``[K, 5]`` max-pooled from the conv maps ``conv`` ``[B, C, H, W]`` to pool5's grid, ``[K, C, g, g]``:
    ``torchvision.ops.roi_pool``, Fast R-CNN's RoI pooling layer, at the trunk's stride. On a CPU, without
    gradients, the same numbers come from SPP-net's sparse tables where they can
    (:func:`rcnn.modeling.spp.roi_pool_by_table`; ``benchmarks/bench_spp_pool.py`` times both)."""
    grid, scale = model.spec.pool5_grid, 1.0 / model.spec.stride
    if conv.device.type == "cpu":
        return roi_pool_by_table(conv, rois, grid, scale)
    return roi_pool(conv, rois.to(conv.dtype), (grid, grid), scale)


def pooled_regions(model: DetectorNet, image_rgb: np.ndarray, boxes: np.ndarray, factors: Sequence[float], flip: bool = False):
    """The RoI-pooled grids ``[N, C, g, g]`` of ``boxes`` ``[N, 4]`` (continuous ``x1, y1, x2, y2`` in the image as
    given, mirrored already where ``flip``) of one RGB image: the trunk once per scale in use, each box pooled at
    ``factors[k]``, the one where its area is closest to 224 x 224 (section 5.2, ``_project_im_rois`` of the
    released test code; :func:`rcnn.modeling.spp_geometry.select_scale`), or at the only one."""
    levels = select_scale(boxes, factors, TARGET_SIZE) if len(factors) > 1 else np.zeros(len(boxes), np.int64)
    device = next(model.parameters()).device
    parts, order = [], []
    for level in np.unique(levels) if len(boxes) else [0]:
        rows = np.flatnonzero(levels == level)
        with record_function("rcnn.trunk"):
            conv = model.trunk(image_input(model, image_rgb, factors[level], flip))
        parts.append(pool_rois(model, conv, to_device(rois_at(boxes[rows], factors[level]), device)))
        order.append(rows)
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts)[to_device(np.argsort(np.concatenate(order)), device)]


def head_outputs(model: DetectorNet, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits ``[K, C + 1]`` and normalised box deltas ``[K, 4 (C + 1)]`` of RoI-pooled grids ``pooled``
    ``[K, C, g, g]``: fc6, fc7, dropout, then the two sibling layers."""
    fc7 = model.dropout(model.head(pooled)["fc7"])
    return model.classifier(fc7), model.bbox_pred(fc7)


def regression_targets(regions_boxes: np.ndarray, gt_boxes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float32 ``[N, 4]``: each foreground row's deltas onto its best-overlapping object (any class, as Fast
    R-CNN's roidb assigns them), zeros elsewhere. ``labels`` are the rows' fine-tuning labels; a foreground row
    reaches ``BBOX_THRESH`` (0.5) because it reaches the foreground IoU."""
    out = np.zeros((len(regions_boxes), 4), np.float32)
    fg = np.flatnonzero(labels > 0)
    if len(fg) and len(gt_boxes):
        best = box_iou(regions_boxes[fg], gt_boxes).argmax(1)
        out[fg] = encode(regions_boxes[fg], gt_boxes[best])
    return out


def target_statistics(
    targets: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per class and coordinate, the mean and standard deviation of the foreground rows' targets, flattened to
    ``[4 num_classes]`` as ``bbox_pred``'s outputs (Fast R-CNN's roidb: "subtract empirical mean, divide by
    empirical stddev"). Background's, and any class with fewer than two rows, are 0 and :data:`FALLBACK_STDS`."""
    t = np.concatenate([np.asarray(x, np.float64).reshape(-1, 4) for x in targets]) if targets else np.zeros((0, 4))
    lab = np.concatenate([np.asarray(x).reshape(-1) for x in labels]) if labels else np.zeros(0, np.int64)
    mean = np.zeros((num_classes, 4))
    std = np.tile(np.asarray(FALLBACK_STDS, np.float64), (num_classes, 1))
    for c in range(1, num_classes):
        rows = t[lab == c]
        if len(rows) >= 2:
            mean[c], std[c] = rows.mean(0), np.maximum(rows.std(0), 1e-6)
    return mean.reshape(-1).astype(np.float32), std.reshape(-1).astype(np.float32)


class FastRegions:
    """Fast R-CNN's training inputs (see :mod:`rcnn.training.finetune`): regions ``boxes[i]`` (float32
    ``[N_i, 4]``, ground truth first) of image ``anns[i]``, RoI-pooled from the conv map of the whole image,
    resized so its shorter side is one of ``scales`` (longer at most ``max_side``), drawn at random per image and
    step where there are several (section 2.3's image pyramids, as a data augmentation), and, with ``mirror``,
    flipped with probability 1/2 per image and step. Held-out regions (:meth:`logits` without an iteration) are
    pooled as at test time, each at the scale where it is closest to 224 x 224. Mini-batches come from
    :class:`rcnn.training.sampling.ImageBatchSampler`: a few images, many regions each, so that each trunk pass
    serves 64 regions (section 2.3).

    :meth:`logits` runs the network; :meth:`loss` is the multi-task loss of the regions it last ran:
    cross-entropy plus ``box_weight`` times smooth L1 (Huber, beta 1) of the true class's deltas against the
    normalised targets, summed over coordinates and foreground rows and divided by the batch size, as Fast
    R-CNN's ``SmoothL1Loss`` layer averages over every RoI of the batch.
    """

    def __init__(
        self,
        anns: list[ImageAnnotation],
        boxes: list[np.ndarray],
        labels: list[np.ndarray],
        model: DetectorNet,
        scales: Sequence[int],
        max_side: int | None,
        mirror: bool,
        seed: int,
        frozen_convs: int = 0,
        box_weight: float = 1.0,
    ):
        self.images = RegionImages(anns, capacity=256)
        self.anns, self.boxes, self.model = anns, boxes, model
        self.scales, self.max_side, self.mirror, self.seed, self.box_weight = tuple(scales), max_side, mirror, seed, box_weight
        self.targets = [regression_targets(b, a.boxes, lab) for a, b, lab in zip(anns, boxes, labels)]
        self.device = next(model.parameters()).device
        convs = [m for m in model.trunk.modules() if isinstance(m, nn.Conv2d)]
        self.frozen = {id(p) for m in convs[:frozen_convs] for p in m.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) not in self.frozen)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if id(p) not in self.frozen]

    def train_mode(self) -> None:
        self.model.train()

    def normalise_targets(self, labels: list[np.ndarray]) -> None:
        """Set the model's target mean and standard deviation from the training rows (``labels``: -1 for rows
        not trained on); kept with the weights, so that test time un-normalises with the same numbers."""
        mean, std = target_statistics(self.targets, labels, self.model.classifier.out_features)
        self.model.bbox_mean.copy_(torch.from_numpy(mean))
        self.model.bbox_std.copy_(torch.from_numpy(std))

    @torch.no_grad()
    def input_scale(self, sampler, seed: int, rms: float, n_batches: int = 4) -> float:
        """The factor giving fc6's input (the RoI-pooled vectors) a root-mean-square value of ``rms`` over a sample
        of training batches, as :meth:`rcnn.methods.spp_regions.PooledRegions.input_scale` does for SPP-net."""
        norms = []
        self.model.eval()
        for batch in sampler.epoch_batches(seed, n_batches=n_batches):
            img_idx, reg_idx = sampler.locate(batch)
            for i in np.unique(img_idx):
                boxes = self.boxes[i][reg_idx[img_idx == i]]
                pooled = pooled_regions(self.model, self.images[int(i)], boxes, self._factors(int(i)))
                norms.append(torch.flatten(pooled, 1).norm(dim=1))
        mean_norm = float(torch.cat(norms).mean()) if norms else 0.0
        return rms * self.model.spec.pool5_dim**0.5 / mean_norm if mean_norm > 0 else 1.0

    def _factors(self, i: int) -> list[float]:
        return image_scales(self.anns[i].height, self.anns[i].width, self.scales, self.max_side)

    def _drawn(self, images: np.ndarray, iteration: int | None) -> list[list[float]]:
        """Per image, the factors its regions are pooled at: all of them without an iteration (the test rule picks
        per region), else one, drawn per image keyed by the iteration so that a resumed run draws the same."""
        factors = [self._factors(int(i)) for i in images]
        if iteration is None or len(self.scales) == 1:
            return factors
        picks = np.random.default_rng([self.seed, iteration, 1]).integers(len(self.scales), size=len(images))
        return [[f[k]] for f, k in zip(factors, picks)]

    def logits(self, img_idx: np.ndarray, reg_idx: np.ndarray, iteration: int | None) -> torch.Tensor:
        img_idx, reg_idx = np.asarray(img_idx, np.int64), np.asarray(reg_idx, np.int64)
        images = np.unique(img_idx)
        flips = np.zeros(len(images), bool)
        if self.mirror and iteration is not None:  # keyed by the iteration: a resumed run flips the same images
            flips = np.random.default_rng([self.seed, iteration]).random(len(images)) < 0.5
        order, logits, deltas, targets = [], [], [], []
        for i, flip, factors in zip(images, flips, self._drawn(images, iteration)):
            rows = np.flatnonzero(img_idx == i)
            boxes = self.boxes[i][reg_idx[rows]]
            target = self.targets[i][reg_idx[rows]].copy()
            if flip:
                boxes = mirror_boxes(boxes, self.anns[i].width)
                target[:, 0] = -target[:, 0]  # the centre's shift mirrors; sizes do not change
            pooled = pooled_regions(self.model, self.images[int(i)], boxes, factors, bool(flip))
            cls, box = head_outputs(self.model, pooled)
            order.append(rows)
            logits.append(cls)
            deltas.append(box)
            targets.append(target)
        back = to_device(np.argsort(np.concatenate(order)), self.device)
        target = to_device(np.concatenate(targets), self.device)
        self._last = torch.cat(deltas)[back], target[back]
        return torch.cat(logits)[back]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The multi-task loss of the regions :meth:`logits` last ran, whose labels are ``labels`` ``[B]``."""
        ce = F.cross_entropy(logits.float(), labels)
        deltas, target = self._last
        fg = torch.nonzero(labels > 0).flatten()
        cols = (4 * labels[fg])[:, None] + torch.arange(4, device=labels.device)
        mean, std = self.model.bbox_mean[cols], self.model.bbox_std[cols]
        pred = deltas.float()[fg[:, None], cols]
        box = F.smooth_l1_loss(pred, (target[fg] - mean) / std, reduction="sum", beta=1.0) / max(len(labels), 1)
        return ce + self.box_weight * box


@torch.no_grad()
def fast_outputs_later(model: DetectorNet, image_rgb: np.ndarray, boxes: np.ndarray, factors: Sequence[float]) -> HostCopy:
    """:data:`OUTPUTS` of ``boxes`` ``[N, 4]`` of one RGB image resized by each of ``factors``: the trunk once per
    scale, every box RoI-pooled from one map (:func:`pooled_regions`), on their way to the host as float16
    ``[N, D]`` (:meth:`HostCopy.arrays` waits)."""
    with inference_autocast(model):
        pooled = pooled_regions(model, image_rgb, boxes, factors)
    with record_function("rcnn.fc"), inference_autocast(model):
        logits, deltas = head_outputs(model, pooled)
        logprob = torch.log_softmax(logits.float(), 1)
        deltas = deltas.float() * model.bbox_std.float() + model.bbox_mean.float()
    return HostCopy({"cls_logprob": logprob, "bbox_deltas": deltas})


def class_boxes(boxes: np.ndarray, deltas: np.ndarray, c: int) -> np.ndarray:
    """The boxes ``[N, 4]`` moved by the deltas of object class ``c`` (0-based; ``deltas`` ``[N, 4 (C + 1)]``,
    background first)."""
    return decode(boxes, np.asarray(deltas, np.float32)[:, 4 * (c + 1) : 4 * (c + 2)])


def scored_boxes(outputs: dict[str, np.ndarray], boxes: np.ndarray, regress: bool = True):
    """From :data:`OUTPUTS` of ``boxes`` ``[N, 4]``: the object classes' softmax probabilities ``[N, C]`` (float32)
    and ``refine(c)``, the boxes moved for class ``c`` (None without ``regress``), as Fast R-CNN's ``im_detect``."""
    scores = np.exp(np.asarray(outputs["cls_logprob"], np.float32)[:, 1:])
    deltas = outputs["bbox_deltas"]
    return scores, ((lambda c: class_boxes(boxes, deltas, c)) if regress else None)


@dataclass
class FastRegionOutputs:
    """Fast R-CNN at test time: ``features(image_bgr, boxes, layers)`` gives :data:`OUTPUTS` for the boxes
    ``[N, 4]`` of one BGR image, resized so its shorter side is each of ``scales`` (longer at most ``max_side``),
    each box pooled at one (:func:`pooled_regions`); the model is made ready for inference on whole images once,
    here, with fc6 and fc7 replaced by truncated SVDs of ranks ``svd`` where given (section 3.1)."""

    model: DetectorNet
    scales: tuple[int, ...] = (600,)
    max_side: int | None = 1000
    precision: str = "auto"  # model.precision
    svd: tuple[int | None, int | None] = (None, None)

    def __post_init__(self) -> None:
        for_inference(self.model, whole_images=True, dtype=self.precision, svd=self.svd)

    def __call__(self, image_bgr: np.ndarray, boxes: np.ndarray, layers: tuple[str, ...] = OUTPUTS) -> dict[str, np.ndarray]:
        h, w = image_bgr.shape[:2]
        factors = image_scales(h, w, self.scales, self.max_side)
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        return fast_outputs_later(self.model, rgb, boxes, factors).arrays()
