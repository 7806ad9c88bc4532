"""SPP-net's windows: conv maps computed once per image and scale, every window pyramid-pooled from them
(He et al. 2014, section 3.1).

At test time :class:`PooledRegionFeatures` gives the detector its features; in fine-tuning
:class:`PooledRegions` gives the training loop its class scores from the cached maps (only the fc layers learn).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.profiler import record_function

from rcnn.modeling.inference import for_inference, inference_autocast
from rcnn.modeling.models import PYRAMID_LAYOUT, DetectorNet, pixel_affine
from rcnn.modeling.spp import spp_pool
from rcnn.modeling.spp_geometry import image_scales, map_windows, select_scale
from rcnn.modeling.transfer import HostCopy, to_device
from rcnn.structures.boxes import mirror_boxes
from rcnn.training.sampling import FgBgSampler

#: From this many windows on one map, pooling them alone (with the sparse-table method) beats batching.
MANY_WINDOWS = 16


def image_maps(model: DetectorNet, image_bgr: np.ndarray, factors: Sequence[float], to_host: bool = True) -> list:
    """float16 conv maps of one BGR image resized by each factor in ``factors``, channels last: ``[H_k, W_k, C]``.

    numpy arrays, or with ``to_host=False`` tensors left on the model's device (a detector that pools them
    there at once saves a round trip over the bus).

    Channels last is the layout the trunk computes in (see :func:`rcnn.modeling.inference.for_inference`) and
    the one pooling reads (each cell's channels side by side), so no copy ever transposes a map.
    :func:`as_map_tensors` gives them the ``[C, H_k, W_k]`` shape the rest of the code indexes.
    """
    maps = _image_maps(model, image_bgr, factors)
    return list(HostCopy(dict(enumerate(maps))).arrays().values()) if to_host else maps


def image_maps_later(model: DetectorNet, image_bgr: np.ndarray, factors: Sequence[float]) -> HostCopy:
    """:func:`image_maps` on their way to the host: ``arrays()`` waits for them, ``{k: map of factors[k]}``."""
    return HostCopy(dict(enumerate(_image_maps(model, image_bgr, factors))))


def image_input(model: DetectorNet, image_rgb: np.ndarray, factor: float, flip: bool = False) -> torch.Tensor:
    """The trunk's normalised ``[1, 3, h, w]`` input of an RGB image resized by ``factor`` (flipped left to right
    with ``flip``), on the model's device: what SPP-net's conv maps and Fast R-CNN's RoIs are computed from."""
    h, w = image_rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    with record_function("rcnn.resize"):
        resized = cv2.resize(image_rgb, size, interpolation=cv2.INTER_LINEAR) if size != (w, h) else image_rgb
    if flip:
        resized = resized[:, ::-1]  # to_device makes it contiguous
    device = next(model.parameters()).device
    scale, shift = pixel_affine(model.spec, device)
    with record_function("rcnn.upload"):
        return to_device(resized, device).permute(2, 0, 1)[None].float().mul_(scale).sub_(shift)


@torch.no_grad()
def _image_maps(model: DetectorNet, image_bgr: np.ndarray, factors: Sequence[float]) -> list[torch.Tensor]:
    with record_function("rcnn.to_rgb"):
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    maps = []
    for f in factors:
        x = image_input(model, rgb, f)
        with record_function("rcnn.conv"), inference_autocast(model):
            fmap = model.trunk(x)[0]
        maps.append(fmap.permute(1, 2, 0).to(torch.float16).contiguous())
    return maps


def as_map_tensors(maps: Sequence, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Cached float16 ``[H, W, C]`` maps (see :func:`image_maps`; arrays or tensors) as ``[C, H, W]`` tensors on ``device``.

    The tensors are views of the channels-last data (no copy on the CPU), still float16: maxima are
    exact in any precision, and half the bytes make pooling's tables about 2x faster.
    """
    device = torch.device(device)
    tensors = [
        m.to(device, torch.float16) if isinstance(m, torch.Tensor) else to_device(np.asarray(m, np.float16), device) for m in maps
    ]
    return [t.permute(2, 0, 1) for t in tensors]


def window_cells(
    shapes: Sequence[Sequence[int]],
    factors: Sequence[float],
    boxes: np.ndarray,
    stride: int,
    target: float,
    offset: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The scale each window is pooled at and its inclusive cell rectangle on that scale's map.

    ``shapes`` are the ``[C, H_k, W_k]`` map shapes, ``factors`` their resize factors and ``boxes``
    ``[N, 4]`` the windows in original pixels; ``stride`` and ``offset`` place the trunk's cells
    (:func:`rcnn.modeling.spp_geometry.map_windows`). Returns int64 ``[N]`` scale indices (SPP-net's rule:
    the scale where the window's area is closest to ``target``²) and int64 ``[N, 4]`` rectangles.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scale = select_scale(boxes, list(factors), target)
    rects = np.zeros((len(boxes), 4), np.int64)
    for k in np.unique(scale):
        sel = scale == k
        rects[sel] = map_windows(boxes[sel] * np.float32(factors[k]), stride, shapes[k][-2], shapes[k][-1], offset)
    return scale, rects


def scale_cells(
    shapes: Sequence[Sequence[int]], factors: Sequence[float], boxes: np.ndarray, stride: int, offset: float = 0.0
) -> np.ndarray:
    """Every window's inclusive cell rectangle on every scale's map: int64 ``[K, N, 4]`` (arguments as
    in :func:`window_cells`), for callers that choose the scale themselves (fine-tuning's random scales)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return np.stack([map_windows(boxes * np.float32(f), stride, s[-2], s[-1], offset) for f, s in zip(factors, shapes)])


def pool_images(
    items: Sequence[tuple[Sequence[torch.Tensor], Sequence[float], np.ndarray]],
    stride: int,
    levels: Sequence[int],
    target: float = 224.0,
    offset: float = 0.0,
) -> torch.Tensor:
    """Pyramid-pooled vectors of the windows of several images, in one pooling call.

    Each item is ``(maps, factors, boxes)``: one ``[C, H_k, W_k]`` map per scale, the resize
    factor of each, and the image's windows ``[N, 4]`` (x1, y1, x2, y2, original pixels). Each
    window is pooled from the map of the scale where its area is closest to ``target``² (SPP-net's
    multi-scale rule; with one scale, that scale). Returns float32 ``[sum N, C * sum(n^2)]`` in
    item order, each level flattened bin-major (:data:`rcnn.modeling.models.PYRAMID_LAYOUT`).
    """
    cells = [
        (maps, *window_cells([m.shape for m in maps], factors, boxes, stride, target, offset)) for maps, factors, boxes in items
    ]
    return pool_cells(cells, levels)


def pool_cells(
    items: Sequence[tuple[Sequence[torch.Tensor], np.ndarray, np.ndarray]],
    levels: Sequence[int],
    dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """:func:`pool_images` for windows already placed by :func:`window_cells`: items ``(maps, scale, rects)``.

    ``dtype`` of the result: float32 by default, or ``None`` for the maps' own (float16 for cached
    maps: the same numbers, since maxima are exact, in half the bytes).
    """
    channels = items[0][0][0].shape[0]
    device = items[0][0][0].device
    dim = channels * sum(n * n for n in levels)
    dtype = dtype or items[0][0][0].dtype
    out = torch.empty((sum(len(scale) for _, scale, _ in items), dim), dtype=dtype, device=device)
    # Maps with many windows (test time: every proposal of an image) are pooled one at a time, each
    # with its own sparse table; the rest (fine-tuning batches: a window or two from each of many
    # images) in one batched call over the cells their windows touch.
    batched_maps: list[torch.Tensor] = []
    rects, owner, order = [], [], []
    offset = 0
    for maps, scale, cells in items:
        for k in np.unique(scale):
            sel = np.flatnonzero(scale == k)
            fmap, r = maps[k], cells[sel]
            if len(sel) >= MANY_WINDOWS:
                if sel[-1] - sel[0] + 1 == len(sel):  # a block of rows (pool_windows sorts by scale): pooled in place
                    spp_pool(fmap, r, levels, out=out[offset + sel[0] : offset + sel[-1] + 1], layout=PYRAMID_LAYOUT)
                else:
                    out[to_device(offset + sel, device)] = spp_pool(fmap, r, levels, layout=PYRAMID_LAYOUT).to(dtype)
                continue
            x0, y0 = r[:, 0].min(), r[:, 1].min()
            rects.append(r - np.array([x0, y0, x0, y0]))
            owner.append(np.full(len(sel), len(batched_maps)))
            order.append(offset + sel)
            batched_maps.append(fmap[:, y0 : r[:, 3].max() + 1, x0 : r[:, 2].max() + 1])
        offset += len(scale)
    if not batched_maps:
        return out
    height = max(m.shape[1] for m in batched_maps)
    width = max(m.shape[2] for m in batched_maps)
    # Channels first: with a window or two per map these are pooled by roi_pool, which reads that layout.
    batch = torch.zeros((len(batched_maps), channels, height, width), dtype=batched_maps[0].dtype, device=device)
    for i, m in enumerate(batched_maps):  # zero padding to a common size: no window reaches it
        batch[i, :, : m.shape[1], : m.shape[2]] = m
    pooled = spp_pool(batch, np.concatenate(rects), levels, np.concatenate(owner), layout=PYRAMID_LAYOUT)
    out[to_device(np.concatenate(order), device)] = pooled.to(dtype)
    return out


@torch.no_grad()
def pool_windows(
    maps: Sequence[torch.Tensor],
    factors: Sequence[float],
    boxes: np.ndarray,
    stride: int,
    levels: Sequence[int],
    target: float,
    dtype: torch.dtype | None = torch.float32,
    offset: float = 0.0,
) -> tuple[torch.Tensor, np.ndarray]:
    """Pyramids of one image's distinct windows, and for each of ``boxes`` the row of its pyramid.

    Windows that fall on the same cells of the same scale have identical pyramids, so each such
    group is pooled once (about 1 in 7 of the demo's proposals is a repeat): ``pooled[inverse]`` is
    the ``[N, D]`` of :func:`pool_images` for these boxes (``dtype`` as in :func:`pool_cells`).
    """
    scale, rects = window_cells([m.shape for m in maps], factors, boxes, stride, target, offset)
    if len(rects) and int(rects.max()) >= 1 << 12:
        raise ValueError(f"feature maps over {1 << 12} cells across are not supported")
    # One integer per (scale, rectangle): cell indices are below 2^12, so five fields fit in 63 bits.
    key = scale.astype(np.int64)
    for column in rects.T:
        key = (key << 12) | column
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    return pool_cells([(maps, scale[first], rects[first])], levels, dtype), inverse.reshape(-1)


def spp_region_features(*args, **kwargs) -> dict[str, np.ndarray]:
    """:func:`spp_region_features_later` (the same arguments), waited for: each layer's float16 ``[N, D]``."""
    return spp_region_features_later(*args, **kwargs).arrays()


@torch.no_grad()
def spp_region_features_later(
    model: DetectorNet,
    maps: Sequence[np.ndarray],
    factors: Sequence[float],
    boxes: np.ndarray,
    layers: tuple[str, ...],
    target: float = 224.0,
    rows: dict[str, np.ndarray] | None = None,
) -> HostCopy:
    """SPP-net's counterpart of :func:`rcnn.methods.rcnn_regions.region_features_later`: float16 ``[N, D]`` per
    layer (a layer in ``rows`` only for those rows), the wait for the device left to :meth:`HostCopy.arrays`.

    ``pool5`` here is the pyramid-pooled window vector that fc6 reads. Repeated windows (see
    :func:`pool_windows`) go through the fc layers once.
    """
    device = next(model.parameters()).device
    with record_function("rcnn.upload"):
        maps = as_map_tensors(maps, device)
    spec = model.spec
    with record_function("rcnn.pool"):
        pooled, inverse = pool_windows(maps, factors, boxes, spec.stride, spec.spp_levels, target, dtype=None, offset=spec.offset)
    with record_function("rcnn.fc"), inference_autocast(model):
        out = model.head(pooled, layers)
        out["pool5"] = pooled
        # Each box's row of the distinct windows' outputs, or only the chosen boxes' rows, gathered where they
        # were computed: the host receives its rows with no indexing of its own (16 MB of fc7 at 2000 boxes).
        picks = {k: inverse[rows[k]] if rows and k in rows else inverse for k in layers}
        picked = {k: out[k][to_device(picks[k].astype(np.int64), out[k].device)] for k in layers}
    return HostCopy(picked)


@dataclass
class PooledRegionFeatures:
    """SPP-net at test time: ``features(image_bgr, boxes, layers)`` runs the conv trunk once per scale of
    ``scales`` (shorter side; longer side at most ``max_side``) and pools each box ``[N, 4]`` (x1, y1, x2, y2)
    from the scale that brings it closest to ``target`` pixels; each layer float16 ``[N, D]``.

    The model is made ready for inference on whole images once, here.
    """

    model: DetectorNet
    scales: tuple[int, ...] = (688,)
    max_side: int | None = None
    target: float = 224.0
    precision: str = "auto"  # model.precision

    def __post_init__(self) -> None:
        for_inference(self.model, whole_images=True, dtype=self.precision)

    def __call__(self, image_bgr: np.ndarray, boxes: np.ndarray, layers: tuple[str, ...]) -> dict[str, np.ndarray]:
        h, w = image_bgr.shape[:2]
        factors = image_scales(h, w, self.scales, self.max_side)
        maps = image_maps(self.model, image_bgr, factors, to_host=False)
        return spp_region_features(self.model, maps, factors, boxes, layers, self.target)


# ``maps_of(image_id, mirror)``: an image's float16 conv maps ``[H_k, W_k, C]`` (of its mirror image with
# ``mirror``) and their resize factors ``[K]``, as the conv maps stage cached them.
MapsOf = Callable[[str, bool], tuple[list[np.ndarray], np.ndarray]]


class PooledRegions:
    """SPP-net's training inputs (see :mod:`rcnn.training.finetune`): windows ``boxes[i]`` (float32 ``[N_i, 4]``,
    x1, y1, x2, y2) of image ``anns[i]`` pooled from its cached conv maps; only fc6, fc7, fc8 learn.

    With ``mirror`` each training window is, with probability 1/2, pooled from the maps of the flipped
    image instead, at the mirrored place: SPP-net's released code fine-tunes on the trainval images and
    their mirror images (``flip_finetune = true`` in ``Script_spp_voc.m``). With ``random_scale`` a window
    is pooled at a random scale instead of the one closest to ``target`` (also from the released code).
    """

    def __init__(
        self,
        maps_of: MapsOf,
        anns: list,
        boxes: list[np.ndarray],
        model: DetectorNet,
        target: float,
        mirror: bool,
        seed: int,
        random_scale: bool = False,
    ):
        self.maps_of = maps_of
        self.ids = [a.image_id for a in anns]
        self.widths = [a.width for a in anns]
        self.boxes, self.model, self.target = boxes, model, target
        self.mirror, self.seed, self.random_scale = mirror, seed, random_scale
        self._cache: OrderedDict[tuple[int, bool], tuple[list[torch.Tensor], np.ndarray, np.ndarray]] = OrderedDict()
        self.device = next(model.parameters()).device
        # Maps kept on the device, oldest dropped first: at most 4000 images, and on a GPU at most a quarter of
        # its memory (five scales of a VOC image are about 3 MB each: 4000 would not fit a 24 GB card).
        self._cache_bytes, self.cache_limit = 0, None
        if self.device.type == "cuda":
            self.cache_limit = torch.cuda.get_device_properties(self.device).total_memory // 4
        for p in model.trunk.parameters():
            p.requires_grad_(False)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for name, p in self.model.named_parameters() if not name.startswith("trunk.")]

    def train_mode(self) -> None:
        """Training mode for the fc layers; the fixed conv layers (and their batch-norm statistics, if any) stay in eval."""
        self.model.train()
        self.model.trunk.eval()

    def _image(self, i: int, mirror: bool = False) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray]:
        """Image ``i``'s conv maps (of its mirror image with ``mirror``), the scale each of its regions
        is pooled at, and each region's cell rectangle at every scale ``[K, N, 4]`` (placed once)."""
        key = (i, mirror)
        if key not in self._cache:
            maps, factors = self.maps_of(self.ids[i], mirror)
            # Channels first: training batches hold a window or two per image, pooled by roi_pool from a
            # batch of crops in its layout, and cropping channels-last maps into it would transpose them.
            maps = [m.contiguous() for m in as_map_tensors(maps, self.device)]
            boxes = mirror_boxes(self.boxes[i], self.widths[i]) if mirror else self.boxes[i]
            spec = self.model.spec
            rects = scale_cells([m.shape for m in maps], factors, boxes, spec.stride, spec.offset)
            self._cache[key] = (maps, select_scale(boxes, list(factors), self.target), rects)
            self._cache_bytes += sum(m.numel() * m.element_size() for m in maps)
            while len(self._cache) > 1 and (
                len(self._cache) > 4000 or (self.cache_limit is not None and self._cache_bytes > self.cache_limit)
            ):
                old_maps = self._cache.popitem(last=False)[1][0]
                self._cache_bytes -= sum(m.numel() * m.element_size() for m in old_maps)
        return self._cache[key]

    def pooled(
        self, img_idx: np.ndarray, reg_idx: np.ndarray, mirror: np.ndarray | None = None, draw: np.ndarray | None = None
    ) -> torch.Tensor:
        """Pyramids ``[B, D]`` of the regions ``reg_idx`` of images ``img_idx``, in batch order: from
        their mirror images where ``mirror`` is set, and with ``draw`` (uniform in ``[0, 1)``, one per
        region) at a random scale instead of the closest one."""
        mirror = np.zeros(len(img_idx), bool) if mirror is None else np.asarray(mirror, bool)
        # Pool the batch grouped by image (rows come back in `order`), then restore the batch order.
        key = img_idx.astype(np.int64) * 2 + mirror
        order = np.argsort(key, kind="stable")
        items = []
        for k in np.unique(key):
            maps, scale, rects = self._image(int(k) // 2, bool(k % 2))
            rows = order[key[order] == k]
            regions = reg_idx[rows]
            at = scale[regions] if draw is None else np.minimum((draw[rows] * len(maps)).astype(np.int64), len(maps) - 1)
            items.append((maps, at, rects[at, regions]))
        pooled = pool_cells(items, self.model.spec.spp_levels)
        return pooled[to_device(np.argsort(order), self.device)]

    def logits(self, img_idx: np.ndarray, reg_idx: np.ndarray, iteration: int | None) -> torch.Tensor:
        mirror = draw = None
        if iteration is not None:
            # As R-CNN's crop flips: drawn from a generator keyed by the iteration, so a resumed run draws the same.
            rng = np.random.default_rng([self.seed, iteration])
            mirror = rng.random(len(img_idx)) < 0.5 if self.mirror else None
            draw = rng.random(len(img_idx)) if self.random_scale else None
        fc7 = self.model.head(self.pooled(img_idx, reg_idx, mirror, draw))["fc7"]
        return self.model.classifier(self.model.dropout(fc7))

    @torch.no_grad()
    def input_scale(self, sampler: FgBgSampler, seed: int, rms: float, n_batches: int = 8) -> float:
        """The factor giving fc6's input a root-mean-square value of ``rms`` over a sample of training batches."""
        norms = []
        for batch in sampler.epoch_batches(seed, n_batches=n_batches):
            norms.append(self.pooled(*sampler.locate(batch)).norm(dim=1))
        mean_norm = float(torch.cat(norms).mean())
        return rms * self.model.spec.pool5_dim**0.5 / mean_norm if mean_norm > 0 else 1.0
