"""R-CNN's regions: every region warped to the network's input size, with context, and run through the whole CNN.

At test time :class:`WarpedRegionFeatures` gives the detector its features; in fine-tuning
:class:`WarpedRegions` gives the training loop its class scores (Girshick et al. 2014, sections 2.1 and 2.3).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn
from torch.profiler import record_function

from rcnn.data.datasets import ImageAnnotation, load_image
from rcnn.errors import UserError
from rcnn.modeling.inference import for_inference, inference_autocast
from rcnn.modeling.models import DetectorNet, normalise_crops, normalised_fill, pixel_affine
from rcnn.modeling.transfer import HostCopy, to_device
from rcnn.modeling.warp import warp_many_torch, warp_plan, warp_planned, warp_regions, warp_regions_torch

#: How regions are warped: ``"opencv"`` on the host (uint8 crops, :func:`rcnn.modeling.warp.warp_regions`),
#: ``"torch"`` on the model's device (float crops, :func:`rcnn.modeling.warp.warp_regions_torch`: the image
#: goes to the device once instead of every crop), ``"auto"`` the faster for the device: OpenCV on a CPU.
WARPS = ("auto", "opencv", "torch")


def warp_on_device(warp: str, device: torch.device) -> bool:
    """Whether ``warp`` warps on the model's device (``"auto"``: on a GPU, not on a CPU)."""
    if warp not in WARPS:
        raise ValueError(f"warp must be one of {', '.join(WARPS)}, got {warp!r}")
    return warp == "torch" or (warp == "auto" and device.type != "cpu")


def region_features(*args, **kwargs) -> dict[str, np.ndarray]:
    """:func:`region_features_later` (the same arguments), waited for: each layer's float16 ``[N, D]``."""
    return region_features_later(*args, **kwargs).arrays()


@torch.no_grad()
def region_features_later(
    model: DetectorNet,
    image_rgb: np.ndarray,
    boxes: np.ndarray,
    layers: tuple[str, ...],
    context_pad: int,
    batch_size: int = 256,
    warp: str = "auto",
    rows: dict[str, np.ndarray] | None = None,
) -> HostCopy:
    """Layer outputs (float16 ``[N, D]``) of the warped ``boxes [N, 4]`` (x1, y1, x2, y2) of one RGB image;
    a layer named in ``rows`` only for those rows (chosen on the device, before the copy to the host).

    The wait is left to the caller: on a GPU the work is queued and the outputs' copies to the host with it;
    :meth:`HostCopy.arrays` waits for them (the caller can queue the next image first). Nothing here reads a
    value from the device. Both warps sample the same places (see
    :func:`rcnn.modeling.warp.warp_regions_torch`); the device warp keeps its samples in floating point where
    OpenCV rounds them to uint8, so features differ slightly.
    """
    spec = model.spec
    device = next(model.parameters()).device
    on_device = warp_on_device(warp, device)
    # The record_function ranges name the phases in a torch.profiler trace (benchmarks/profile_features.py).
    if on_device:
        scale, shift = pixel_affine(spec, device)
        with record_function("rcnn.upload"):
            image = to_device(image_rgb, device).permute(2, 0, 1).float()[None]
            # The image is normalised once, so the crops come out normalised: each crop pixel is a convex
            # blend of image pixels, or the fill, normalised alike. Normalising the crops instead would be
            # two more passes over 2000 x 3 x 227 x 227 floats per image.
            image.mul_(scale).sub_(shift)
            # Every box's geometry goes to the device now, in one copy, and no chunk copies anything: on a
            # GPU a copy from the host waits for the device's queue to drain.
            sizes, index = np.array([image.shape[2:]]), np.zeros(len(boxes), np.int64)
            plan = warp_plan(sizes, index, boxes, spec.input_size, context_pad, normalised_fill(spec), device)
    # Each chunk's outputs stay on the device, in float16, and go to the host once per image: no wait for
    # the device per chunk, during which it would idle.
    out: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        with record_function("rcnn.warp"):
            if on_device:
                x = warp_planned(image, plan, slice(start, start + batch_size))
            else:
                x = normalise_crops(warp_regions(image_rgb, chunk, spec.input_size, context_pad, spec.mean_pixel), spec, device)
        with record_function("rcnn.cnn"), inference_autocast(model):
            feats = model.extract(x, layers)
        for layer in layers:
            out[layer].append(feats[layer].detach().to(torch.float16))
    dims = {"pool5": spec.pool5_dim, "fc6": spec.fc_dim, "fc7": spec.fc_dim}
    result = {}
    for k, v in out.items():
        if not v:
            result[k] = torch.zeros((0, dims[k]), dtype=torch.float16)
            continue
        x = torch.cat(v)
        if rows is not None and k in rows:
            x = x[to_device(np.asarray(rows[k], np.int64), x.device)]
        result[k] = x
    return HostCopy(result)


@dataclass
class WarpedRegionFeatures:
    """R-CNN at test time: ``features(image_bgr, boxes, layers)`` warps each box ``[N, 4]`` (x1, y1, x2, y2)
    of a BGR image with ``context_pad`` pixels of context and returns each layer's float16 ``[N, D]``.

    The model is made ready for inference (:func:`rcnn.modeling.inference.for_inference`) once, here.
    """

    model: DetectorNet
    context_pad: int
    batch_size: int = 256
    warp: str = "auto"  # see WARPS
    precision: str = "auto"  # model.precision

    def __post_init__(self) -> None:
        for_inference(self.model, whole_images=False, dtype=self.precision)

    def __call__(self, image_bgr: np.ndarray, boxes: np.ndarray, layers: tuple[str, ...]) -> dict[str, np.ndarray]:
        with record_function("rcnn.to_rgb"):
            rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        return region_features(self.model, rgb, boxes, layers, self.context_pad, self.batch_size, self.warp)


class RegionImages:
    """Decoded RGB images, most recently used kept (fine-tuning revisits images constantly)."""

    def __init__(self, annotations: list[ImageAnnotation], capacity: int = 2000):
        self.annotations = annotations
        self.capacity = capacity
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getitem__(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        image = cv2.cvtColor(load_image(self.annotations[index]), cv2.COLOR_BGR2RGB)
        self._cache[index] = image
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return image


def warp_batch(
    images: RegionImages, boxes: list[np.ndarray], batch_img: np.ndarray, batch_reg: np.ndarray, spec, context_pad: int
) -> np.ndarray:
    """Warped crops ``[B, S, S, 3]`` for the regions ``(batch_img[k], batch_reg[k])``, in batch order."""
    crops = np.empty((len(batch_img), spec.input_size, spec.input_size, 3), np.uint8)
    for i in np.unique(batch_img):
        sel = np.flatnonzero(batch_img == i)
        crops[sel] = warp_regions(images[i], boxes[i][batch_reg[sel]], spec.input_size, context_pad, spec.mean_pixel)
    return crops


class WarpedRegions:
    """R-CNN's training inputs (see :mod:`rcnn.training.finetune`): warped, optionally mirrored crops of
    ``boxes[i]`` (float32 ``[N_i, 4]``, x1, y1, x2, y2) of image ``anns[i]`` through the whole network.

    ``warp`` (see :data:`WARPS`) picks where crops are made: on the host with OpenCV, or on the model's
    device from images kept there, so that a GPU is not fed crop by crop over the bus. On the device, when
    every training image fits in ``slab_bytes`` (uint8, padded to the largest; on a GPU at most a quarter of
    its memory), each image is uploaded once into one slab and a mini-batch's crops, from however many
    images, come from one ``roi_align`` call (as a careful PyTorch user warps them): about 140 operator calls
    per 128-crop batch from 90 images, against 9,200 image by image. Otherwise the most recently used
    ``device_images`` are kept and the crops are made image by image. Both give the same crops up to float
    rounding.
    """

    def __init__(
        self,
        anns: list[ImageAnnotation],
        boxes: list[np.ndarray],
        model: DetectorNet,
        context_pad: int,
        mirror: bool,
        seed: int,
        warp: str = "auto",
        device_images: int = 512,
        slab_bytes: int = 8 << 30,
    ):
        self.images = RegionImages(anns)
        self.boxes, self.model = boxes, model
        self.context_pad, self.mirror, self.seed, self.warp = context_pad, mirror, seed, warp
        self._on_device: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.device_images = device_images
        # One more row and column than the largest image, for the repeated border warp_many_torch reads.
        self._slab_shape = (
            len(anns),
            3,
            max((a.height for a in anns), default=0) + 1,
            max((a.width for a in anns), default=0) + 1,
        )
        device = next(model.parameters()).device
        if device.type == "cuda":  # a quarter of the card at most, the rest for the network's activations
            slab_bytes = min(slab_bytes, torch.cuda.get_device_properties(device).total_memory // 4)
        self.use_slab = int(np.prod(self._slab_shape)) <= slab_bytes
        self._slab: torch.Tensor | None = None
        self._sizes = np.zeros((len(anns), 2), np.int64)  # (height, width) of each image uploaded; 0: not yet

    def trainable(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def train_mode(self) -> None:
        """Put the model in training mode (dropout on) before a step."""
        self.model.train()

    def _device_image(self, i: int, device: torch.device) -> torch.Tensor:
        """Image ``i`` as float ``[3, H, W]`` (0-255 RGB) on ``device``, most recently used kept."""
        if i in self._on_device:
            self._on_device.move_to_end(i)
            return self._on_device[i]
        image = to_device(self.images[i], device).permute(2, 0, 1).float()
        self._on_device[i] = image
        if len(self._on_device) > self.device_images:
            self._on_device.popitem(last=False)
        return image

    def _slab_crops(self, img_idx: np.ndarray, reg_idx: np.ndarray, device: torch.device) -> torch.Tensor:
        """Crops ``[B, 3, S, S]`` (0-255 RGB) of the regions, from one gather of their images out of the slab."""
        if self._slab is None:
            self._slab = torch.zeros(self._slab_shape, dtype=torch.uint8, device=device)
        uniq, where = np.unique(img_idx, return_inverse=True)
        for i in uniq[self._sizes[uniq, 0] == 0]:
            image = to_device(self.images[int(i)], device).permute(2, 0, 1)
            h, w = image.shape[1:]
            if h >= self._slab_shape[2] or w >= self._slab_shape[3]:
                ann = self.images.annotations[int(i)]
                raise UserError(
                    f"image '{ann.image_id}' is {w}x{h} pixels, larger than its annotation's {ann.width}x{ann.height}"
                )
            self._slab[i, :, :h, :w] = image
            self._slab[i, :, h, :w] = image[:, h - 1]
            self._slab[i, :, : h + 1, w] = self._slab[i, :, : h + 1, w - 1]
            self._sizes[i] = (h, w)
        batch = self._slab[to_device(uniq, device)].float()
        boxes = np.stack([self.boxes[i][r] for i, r in zip(img_idx, reg_idx)]) if len(img_idx) else np.zeros((0, 4))
        spec = self.model.spec
        return warp_many_torch(batch, self._sizes[uniq], where, boxes, spec.input_size, self.context_pad, spec.mean_pixel)

    def inputs(self, img_idx: np.ndarray, reg_idx: np.ndarray, iteration: int | None) -> torch.Tensor:
        """The normalised network inputs ``[B, 3, S, S]`` of the regions, in batch order; with an
        ``iteration`` (training), each mirrored with probability 1/2 when ``mirror`` is set."""
        spec = self.model.spec
        device = next(self.model.parameters()).device
        flip = None
        if self.mirror and iteration is not None:
            # Flips come from a generator keyed by the iteration, so a resumed run flips the same crops.
            flip = np.random.default_rng([self.seed, iteration]).random(len(img_idx)) < 0.5
        if not warp_on_device(self.warp, device):
            crops = warp_batch(self.images, self.boxes, img_idx, reg_idx, spec, self.context_pad)
            if flip is not None:
                crops[flip] = crops[flip, :, ::-1]
            return normalise_crops(crops, spec, device)
        if self.use_slab:
            x = self._slab_crops(np.asarray(img_idx), np.asarray(reg_idx), device)
        else:
            x = torch.empty((len(img_idx), 3, spec.input_size, spec.input_size), device=device)
            for i in np.unique(img_idx):
                sel = np.flatnonzero(img_idx == i)
                boxes = self.boxes[i][reg_idx[sel]]
                image = self._device_image(int(i), device)
                x[to_device(sel, device)] = warp_regions_torch(image, boxes, spec.input_size, self.context_pad, spec.mean_pixel)
        if flip is not None and flip.any():
            rows = to_device(np.flatnonzero(flip), device)
            x[rows] = x[rows].flip(-1)
        scale, shift = pixel_affine(spec, device)
        return x.mul_(scale).sub_(shift)

    def logits(self, img_idx: np.ndarray, reg_idx: np.ndarray, iteration: int | None) -> torch.Tensor:
        return self.model(self.inputs(img_idx, reg_idx, iteration))
