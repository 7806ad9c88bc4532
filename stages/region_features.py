"""How a method's regions become features in stage `features`, and how later stages read a cached layer.

:class:`RegionFeatures` is what stage `features` runs per image: R-CNN's warped regions (:class:`Warped`),
SPP-net's windows pooled from the cached conv maps (:class:`Pooled`), Fast R-CNN's RoIs pooled from the
image's conv map (:class:`FastOutputs`). The readers give train-bbox and evaluate one layer of chosen rows:
read from the cache, or computed again where the method does not cache it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import cv2
import numpy as np
from torch.profiler import record_function

from rcnn.data.datasets import load_image
from rcnn.errors import UserError
from rcnn.methods.fast_regions import fast_outputs_later
from rcnn.methods.rcnn_regions import region_features_later
from rcnn.methods.spp_regions import as_map_tensors, pool_windows, spp_region_features_later
from rcnn.modeling.models import FEATURE_LAYERS
from rcnn.modeling.spp_geometry import image_scales
from rcnn.store import artifacts as store

from . import convmaps
from .context import Context


class RegionFeatures(Protocol):
    """An image's region features in steps: ``load(ann)``, the host's reading (safe in a thread ahead of the
    model), then ``start(...)``, which queues the model's work, and the :class:`Pending` result's ``result()``,
    which waits for it: ``(features of the layers asked for, seconds of compute)``. A caller that starts the
    next image before it waits for this one keeps a GPU busy while the host finishes each image. Calling
    the object is ``start(...).result()``."""

    def load(self, ann) -> Any: ...

    def start(
        self, model, loaded, boxes: np.ndarray, layers: tuple[str, ...], rows: dict[str, np.ndarray] | None = None
    ) -> Pending: ...

    def __call__(
        self, model, loaded, boxes: np.ndarray, layers: tuple[str, ...], rows: dict[str, np.ndarray] | None = None
    ) -> tuple[dict[str, np.ndarray], float]: ...


class Pending:
    """An image's features on their way (:class:`rcnn.modeling.transfer.HostCopy`), with the host's seconds so far."""

    def __init__(self, copy, seconds: float):
        self.copy, self.seconds = copy, seconds

    def result(self) -> tuple[dict[str, np.ndarray], float]:
        """The features, and the seconds of compute: the host's before, plus this wait for the device."""
        tick = time.perf_counter()
        feats = self.copy.arrays()
        return feats, self.seconds + time.perf_counter() - tick


class Started:
    """Calling a :class:`RegionFeatures` is ``start(...).result()``."""

    def __call__(self, model, loaded, boxes, layers, rows=None) -> tuple[dict[str, np.ndarray], float]:
        return self.start(model, loaded, boxes, layers, rows).result()


class Warped(Started):
    """R-CNN's features: each region warped from the decoded image and run through the whole CNN.

    ``load(ann)`` is the host's part (decoding, to RGB), safe to run in a thread ahead of the model; calling
    the object with what it returned computes the features."""

    def __init__(self, ctx: Context, warp: str | None = None):
        self.ctx = ctx
        self.warp = warp or ctx.cfg.model.warp

    def __enter__(self) -> Warped:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def load(self, ann) -> tuple[np.ndarray, float]:
        """The image of ``ann`` as RGB, and the seconds that took (part of what a detector computes)."""
        tick = time.perf_counter()
        with record_function("rcnn.decode"):
            bgr = load_image(ann)
        with record_function("rcnn.to_rgb"):
            image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return image, time.perf_counter() - tick

    def start(
        self,
        model,
        loaded: tuple[np.ndarray, float],
        boxes: np.ndarray,
        layers: tuple[str, ...],
        rows: dict[str, np.ndarray] | None = None,
    ) -> Pending:
        """The ``layers`` of ``boxes`` (a layer in ``rows`` only for those rows) on their way; their seconds
        count the decoding."""
        image, decoding = loaded
        cfg = self.ctx.cfg
        tick = time.perf_counter()
        pad, batch = cfg.finetune.context_pad, cfg.features.batch_size
        copy = region_features_later(model, image, boxes, layers, pad, batch, self.warp, rows)
        return Pending(copy, decoding + time.perf_counter() - tick)


class Pooled(Started):
    """SPP-net's features: each window pooled from the image's cached conv maps, then the fc layers.

    ``load(ann)`` reads the image's maps (I/O, not timed), safe to run in a thread ahead of the model."""

    def __init__(self, ctx: Context, split: str):
        self.ctx, self.split, self.maps = ctx, split, None

    def __enter__(self) -> Pooled:
        self.maps = convmaps.load(self.ctx, self.split)
        return self

    def __exit__(self, *exc) -> None:
        self.maps.close()

    def load(self, ann) -> tuple[list[np.ndarray], np.ndarray]:
        with record_function("rcnn.read_maps"):
            return convmaps.image_record(self.maps, ann.image_id)

    def start(
        self,
        model,
        loaded: tuple[list[np.ndarray], np.ndarray],
        boxes: np.ndarray,
        layers: tuple[str, ...],
        rows: dict[str, np.ndarray] | None = None,
    ) -> Pending:
        conv, factors = loaded
        tick = time.perf_counter()
        copy = spp_region_features_later(model, conv, factors, boxes, layers, self.ctx.cfg.spp.target_size, rows)
        return Pending(copy, time.perf_counter() - tick)


class LayerReader:
    """One cached layer's float32 ``[K, D]`` features of chosen windows of an image of ``split``, read from the
    features records. Use as a context manager."""

    compute_seconds = 0.0  # of the last call to rows(): nothing is computed, the layer is read

    def __init__(self, ctx: Context, split: str, layer: str):
        if layer not in FEATURE_LAYERS:
            raise UserError(f"unknown feature layer '{layer}' (choose from {', '.join(FEATURE_LAYERS)})")
        if layer not in ctx.cfg.features.layers:
            raise UserError(f"layer '{layer}' is not in features.layers ({', '.join(ctx.cfg.features.layers)}); add it")
        self.layer = layer

    def __enter__(self) -> LayerReader:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def rows(self, rs, image_id: str, rows: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """``layer`` of the windows ``rows`` (indices or a boolean mask) of ``image_id``'s record in ``rs``,
        whose ``boxes`` the caller has read."""
        return rs.array(image_id, self.layer, np.float16, 2)[rows].astype(np.float32)


def caches_regression_rows(cfg, split: str) -> bool:
    """Whether stage `features` caches the regression layer's rows on ``split`` (box regression's training
    split; the test split caches none): see :meth:`Method.regression_layer`."""
    return split == cfg.data.trainval


def made_as(ctx: Context, split: str) -> dict[str, str]:
    """What features/``split`` recorded it was computed with (``precision``, R-CNN's ``warp``: ``auto`` as
    resolved on its device), so that rows computed again match its cached ones on any machine: a unit made on a
    GPU is read on a CPU in bfloat16 with the torch warp. Empty where nothing was recorded: the configured values
    then apply."""
    metrics = (store.read_manifest(ctx.unit_dir("features", split)) or {}).get("metrics") or {}
    return {k: metrics[k] for k in ("precision", "warp") if isinstance(metrics.get(k), str)}


class WarpedReader(LayerReader):
    """R-CNN's box-regression layer under ``features.bbox_rows: regression``: rows the features stage cached
    (the regression rows of the training split, listed in ``<layer>_rows``) are read; any other row is computed
    again as that stage computed it, its box warped from the image through the fine-tuned model (float16, the
    numbers a cache would hold). ``compute_seconds`` is the last call's decoding, warping and CNN time."""

    def __init__(self, ctx: Context, split: str, layer: str, model: Callable[[str | None], object]):
        super().__init__(ctx, split, layer)
        self.ctx, self.split, self.load_model, self.model = ctx, split, model, None
        self.cached = caches_regression_rows(ctx.cfg, split)
        self.recomputed = 0  # rows computed again, over every call
        # computed as the features stage computed its rows, on whichever device it ran (model.precision and
        # model.warp auto differ)
        self.made = made_as(ctx, split)

    def rows(self, rs, image_id: str, rows: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        index = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        self.compute_seconds = 0.0
        out, hit = None, np.zeros(len(index), bool)
        if self.cached:
            have = rs.array(image_id, f"{self.layer}_rows", np.int32, 1)
            cache = rs.array(image_id, self.layer, np.float16, 2)
            out = np.empty((len(index), cache.shape[1]), np.float32)
            if len(have):  # ascending: where each requested row would sit among the cached ones
                at = np.minimum(np.searchsorted(have, index), len(have) - 1)
                hit = have[at] == index
                out[hit] = cache[at[hit]]
        missing = np.flatnonzero(~hit)
        if len(missing) or out is None:
            computed = self._compute(image_id, np.asarray(boxes, np.float32).reshape(-1, 4)[missing])
            out = np.empty((len(index), computed.shape[1]), np.float32) if out is None else out
            out[missing] = computed
        return out

    def _compute(self, image_id: str, boxes: np.ndarray) -> np.ndarray:
        if self.model is None:  # loaded on the first row not cached: a reader of cached rows never needs it
            self.model = self.load_model(self.made.get("precision"))
        ann = self.ctx.dataset(self.split).annotation(image_id)
        warped = Warped(self.ctx, self.made.get("warp"))
        feats, self.compute_seconds = warped(self.model, warped.load(ann), boxes, (self.layer,))
        self.recomputed += len(boxes)
        return feats[self.layer].astype(np.float32)


class PyramidReader(LayerReader):
    """SPP-net's ``pool5`` (the pyramid fc6 reads, not cached): pooled again from the cached conv maps,
    exactly as the features stage pooled it."""

    def __init__(self, ctx: Context, split: str, window_offset: float):
        self.layer = "pool5"
        manifest = store.read_manifest(ctx.unit_dir(convmaps.NAME, split)) or {}
        self.stride = int(manifest.get("metrics", {}).get("stride", 0))
        if self.stride < 1:
            raise UserError(f"the conv maps of {split} are missing or incomplete: run `{ctx.command('convmaps')}`")
        self.offset = window_offset  # where the fine-tuned model placed its windows
        self.levels = tuple(ctx.cfg.spp.levels)
        self.target = ctx.cfg.spp.target_size
        self.maps = convmaps.load(ctx, split)

    def __exit__(self, *exc) -> None:
        self.maps.close()

    def rows(self, rs, image_id: str, rows: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        conv, factors = convmaps.image_record(self.maps, image_id)
        tick = time.perf_counter()
        pooled, inverse = pool_windows(
            as_map_tensors(conv), factors, boxes, self.stride, self.levels, self.target, offset=self.offset
        )
        self.compute_seconds = time.perf_counter() - tick
        return pooled.numpy()[inverse]  # maxima of float16 maps: the same numbers a float16 cache would hold


class FastOutputs(Warped):
    """Fast R-CNN's outputs (:data:`rcnn.methods.fast_regions.OUTPUTS`): the image resized to each of ``fast.scales``
    through the trunk once, every region RoI-pooled from its map, then the fc layers and the two sibling layers.

    ``load(ann)`` decodes the image (timed, as for R-CNN), safe to run in a thread ahead of the model."""

    def start(self, model, loaded, boxes, layers, rows=None) -> Pending:
        image, decoding = loaded
        tick = time.perf_counter()
        fast = self.ctx.cfg.fast
        factors = image_scales(image.shape[0], image.shape[1], fast.scales, fast.max_side)
        copy = fast_outputs_later(model, image, boxes, factors)
        return Pending(copy, decoding + time.perf_counter() - tick)
