"""The detection method (R-CNN or SPP-net) as one object, chosen once from the configuration.

A method owns how regions become features: R-CNN warps every region and runs the whole
CNN on it (Girshick et al. 2014, section 2.1); SPP-net runs the conv layers once per
image and scale, caches those maps (stage `convmaps`) and pools every window's pyramid
from them (He et al. 2014, section 3.1). Stages, benchmarks and the CLI ask the method
and never test its name: :func:`method_named` is the one place that reads it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import cv2
import numpy as np
from torch.profiler import record_function

from rcnn.data.datasets import load_image
from rcnn.errors import ConfigError, UserError
from rcnn.methods.rcnn_regions import WarpedRegionFeatures, WarpedRegions, region_features_later
from rcnn.methods.spp_regions import (
    PooledRegionFeatures,
    PooledRegions,
    as_map_tensors,
    pool_windows,
    spp_region_features_later,
)
from rcnn.modeling.models import FEATURE_LAYERS
from rcnn.store import artifacts as store

from . import convmaps
from .context import Context
from .provenance import upstream_digest


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


class Method:
    """What a detection method decides; by default R-CNN's way (the whole network run on each warped region)."""

    name = ""
    extra_stages: tuple[str, ...] = ()  # stages only this method runs, besides the common ones
    whole_images = False  # the trunk runs on whole images (no fixed input size)

    def untrained_model(self, ctx: Context):
        """The configured backbone with fresh weights, shaped for this method."""
        return convmaps.untrained_model(ctx, spp=False)

    def cached_layers(self, layers: tuple[str, ...]) -> tuple[str, ...]:
        """Which of the configured feature layers stage `features` writes."""
        return layers

    def upstream_inputs(self, ctx: Context, split: str) -> dict[str, str]:
        """Digests of the method's own artifacts that fine-tuning and features read, beyond the common ones."""
        return {}

    def finetune_params(self, ctx: Context) -> dict:
        """The method's own parameters of fine-tuning, beyond the common ones."""
        return {}

    def training_regions(self, ctx: Context, anns, boxes: list[np.ndarray], model):
        """Fine-tuning's inputs: the ``regions`` :func:`rcnn.training.finetune.fine_tune` trains."""
        ft = ctx.cfg.finetune
        return WarpedRegions(anns, boxes, model, ft.context_pad, ft.mirror, ft.seed, ctx.cfg.model.warp)

    def prepare_training(self, ctx: Context, regions, sampler) -> None:
        """Initialise what the method sets from the data before the first step of a fresh run."""

    def region_features(self, ctx: Context, split: str) -> AbstractContextManager[RegionFeatures]:
        """A context manager giving the :class:`RegionFeatures` of ``split``'s images (``load(ann)``, then the call)."""
        return _Warped(ctx)

    def regression_layer(self, cfg) -> str | None:
        """The layer stage `features` caches only for the rows box regression trains on (``features.bbox_rows:
        regression``, where the SVMs read another layer), or None: every cached layer holds every row."""
        if cfg.features.bbox_rows != "regression" or cfg.bbox.layer == cfg.svm.layer:
            return None
        return cfg.bbox.layer if cfg.bbox.layer in self.cached_layers(tuple(cfg.features.layers)) else None

    def layer_inputs(self, ctx: Context, split: str, layer: str) -> dict[str, str]:
        """Upstream digests a reader of the feature ``layer`` depends on beyond the features themselves."""
        if layer == self.regression_layer(ctx.cfg):
            # Rows not cached are computed again with the fine-tuned model.
            return {"finetune": upstream_digest(ctx, "finetune", ctx.cfg.data.trainval)}
        return {}

    def layer_reader(
        self, ctx: Context, split: str, layer: str, window_offset: Callable[[], float], model: Callable[[str | None], object]
    ) -> LayerReader:
        """A reader of one feature layer of chosen windows of ``split``'s images (a context manager);
        ``window_offset()`` gives the fine-tuned model's receptive-field offset, asked only if windows are pooled,
        and ``model(precision)`` the fine-tuned model ready for inference in ``precision`` (None: ``model.precision``),
        asked only if a window is computed again."""
        if layer == self.regression_layer(ctx.cfg):
            return WarpedReader(ctx, split, layer, model)
        return LayerReader(ctx, split, layer)

    def test_features(self, cfg, model) -> Callable[[np.ndarray, np.ndarray, tuple[str, ...]], dict[str, np.ndarray]]:
        """What the detector computes features with on a new image: ``features(image_bgr, boxes, layers)``."""
        return WarpedRegionFeatures(model, cfg.finetune.context_pad, cfg.features.batch_size, cfg.model.warp, cfg.model.precision)


class RCNN(Method):
    """R-CNN: every region warped to the network's input size and run through the whole CNN."""

    name = "rcnn"


class SPPNet(Method):
    """SPP-net: conv maps cached once per image and scale, windows pooled from them; fc layers learn."""

    name = "spp"
    extra_stages = ("convmaps",)
    whole_images = True

    def untrained_model(self, ctx: Context):
        return convmaps.untrained_model(ctx, spp=True)

    def cached_layers(self, layers: tuple[str, ...]) -> tuple[str, ...]:
        # The pooled pyramid (up to 25,600-d) is cheap to pool again from the cached maps.
        return tuple(x for x in layers if x != "pool5")

    def upstream_inputs(self, ctx: Context, split: str) -> dict[str, str]:
        return {f"convmaps/{split}": upstream_digest(ctx, "convmaps", split)}

    def finetune_params(self, ctx: Context) -> dict:
        from rcnn.config import fingerprint_params

        return {"spp": fingerprint_params(ctx.cfg.spp)}

    def training_regions(self, ctx: Context, anns, boxes: list[np.ndarray], model):
        maps = convmaps.load(ctx, ctx.cfg.data.trainval)
        ft, spp = ctx.cfg.finetune, ctx.cfg.spp
        maps_of = lambda image_id, mirror: convmaps.image_record(maps, image_id, mirror)  # noqa: E731
        return PooledRegions(maps_of, anns, boxes, model, spp.target_size, ft.mirror, ft.seed, spp.random_scale)

    def prepare_training(self, ctx: Context, regions, sampler) -> None:
        rms = ctx.cfg.spp.fc6_input_rms
        if rms is not None:
            regions.model.fc6_input_scale.fill_(regions.input_scale(sampler, ctx.cfg.finetune.seed + 1, rms))

    def region_features(self, ctx: Context, split: str) -> AbstractContextManager[RegionFeatures]:
        return _Pooled(ctx, split)

    def regression_layer(self, cfg) -> str | None:
        return None  # pool5 is never cached (pooled again from the conv maps); the fc layers keep every row

    def layer_inputs(self, ctx: Context, split: str, layer: str) -> dict[str, str]:
        # The pyramid is not cached: a reader pools it again from the conv maps.
        if layer in self.cached_layers(ctx.cfg.features.layers):
            return {}
        return {f"convmaps/{split}": upstream_digest(ctx, "convmaps", split)}

    def layer_reader(
        self, ctx: Context, split: str, layer: str, window_offset: Callable[[], float], model: Callable[[str | None], object]
    ) -> LayerReader:
        if layer in self.cached_layers(ctx.cfg.features.layers) or layer != "pool5":
            return LayerReader(ctx, split, layer)
        return PyramidReader(ctx, split, window_offset())

    def test_features(self, cfg, model) -> Callable[[np.ndarray, np.ndarray, tuple[str, ...]], dict[str, np.ndarray]]:
        return PooledRegionFeatures(model, cfg.spp.scales, cfg.spp.max_side, cfg.spp.target_size, cfg.model.precision)


class _Started:
    """Calling a :class:`RegionFeatures` is ``start(...).result()``."""

    def __call__(self, model, loaded, boxes, layers, rows=None) -> tuple[dict[str, np.ndarray], float]:
        return self.start(model, loaded, boxes, layers, rows).result()


class _Warped(_Started):
    """R-CNN's features: each region warped from the decoded image and run through the whole CNN.

    ``load(ann)`` is the host's part (decoding, to RGB), safe to run in a thread ahead of the model; calling
    the object with what it returned computes the features."""

    def __init__(self, ctx: Context, warp: str | None = None):
        self.ctx = ctx
        self.warp = warp or ctx.cfg.model.warp

    def __enter__(self) -> _Warped:
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


class _Pooled(_Started):
    """SPP-net's features: each window pooled from the image's cached conv maps, then the fc layers.

    ``load(ann)`` reads the image's maps (I/O, not timed), safe to run in a thread ahead of the model."""

    def __init__(self, ctx: Context, split: str):
        self.ctx, self.split, self.maps = ctx, split, None

    def __enter__(self) -> _Pooled:
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
        warped = _Warped(self.ctx, self.made.get("warp"))
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


METHODS = {m.name: m for m in (RCNN, SPPNet)}


def method_named(name: str) -> Method:
    """The method called ``name`` in a configuration ("rcnn" or "spp")."""
    if name not in METHODS:
        raise ConfigError(f"method: unknown method '{name}' (choose from {', '.join(METHODS)})")
    return METHODS[name]()


def build_method(cfg) -> Method:
    """The method a pipeline's configuration chooses (``cfg.method``)."""
    return method_named(cfg.method)
