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

import cv2
import numpy as np

from rcnn.data.datasets import load_image
from rcnn.errors import ConfigError
from rcnn.methods.rcnn_regions import region_features
from rcnn.methods.spp_regions import spp_region_features

from . import convmaps
from .context import Context
from .provenance import upstream_digest

# (features of the layers asked for, seconds of compute) for an image's annotation and its regions' boxes.
FeatureFn = Callable[..., tuple[dict[str, np.ndarray], float]]


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

    def computed_layers(self, layers: tuple[str, ...], bbox_layer: str) -> tuple[str, ...]:
        """The layers a detector computes per image (what stage `features` times): the cached ones."""
        return layers

    def upstream_inputs(self, ctx: Context, split: str) -> dict[str, str]:
        """Digests of the method's own artifacts that fine-tuning and features read, beyond the common ones."""
        return {}

    def finetune_params(self, ctx: Context) -> dict:
        """The method's own parameters of fine-tuning, beyond the common ones."""
        return {}

    def training_regions(self, ctx: Context, anns, boxes: list[np.ndarray], model):
        """Fine-tuning's inputs: an object whose ``logits(img_idx, reg_idx, iteration)`` are trained."""
        from .finetune import WarpedRegions

        return WarpedRegions(ctx, anns, boxes, model)

    def prepare_training(self, ctx: Context, regions, sampler) -> None:
        """Initialise what the method sets from the data before the first step of a fresh run."""

    def region_features(self, ctx: Context, split: str) -> AbstractContextManager[FeatureFn]:
        """A context manager giving ``features(model, ann, boxes, layers)`` for the regions of ``split``'s images."""
        return _Warped(ctx)


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

    def computed_layers(self, layers: tuple[str, ...], bbox_layer: str) -> tuple[str, ...]:
        # The detector keeps the pyramid it pooled for fc6 and hands it to box regression.
        return layers + (("pool5",) if bbox_layer == "pool5" else ())

    def upstream_inputs(self, ctx: Context, split: str) -> dict[str, str]:
        return {f"convmaps/{split}": upstream_digest(ctx, "convmaps", split)}

    def finetune_params(self, ctx: Context) -> dict:
        from rcnn.config import fingerprint_params

        return {"spp": fingerprint_params(ctx.cfg.spp)}

    def training_regions(self, ctx: Context, anns, boxes: list[np.ndarray], model):
        from .finetune import PooledRegions

        return PooledRegions(ctx, anns, boxes, model)

    def prepare_training(self, ctx: Context, regions, sampler) -> None:
        rms = ctx.cfg.spp.fc6_input_rms
        if rms is not None:
            regions.model.fc6_input_scale.fill_(regions.input_scale(sampler, ctx.cfg.finetune.seed + 1, rms))

    def region_features(self, ctx: Context, split: str) -> AbstractContextManager[FeatureFn]:
        return _Pooled(ctx, split)


class _Warped:
    """R-CNN's features: each region warped from the decoded image and run through the whole CNN."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def __enter__(self) -> FeatureFn:
        return self.features

    def __exit__(self, *exc) -> None:
        pass

    def features(self, model, ann, boxes: np.ndarray, layers: tuple[str, ...]) -> tuple[dict[str, np.ndarray], float]:
        cfg = self.ctx.cfg
        tick = time.perf_counter()
        image = cv2.cvtColor(load_image(ann), cv2.COLOR_BGR2RGB)
        feats = region_features(model, image, boxes, layers, cfg.finetune.context_pad, cfg.features.batch_size)
        return feats, time.perf_counter() - tick


class _Pooled:
    """SPP-net's features: each window pooled from the image's cached conv maps, then the fc layers."""

    def __init__(self, ctx: Context, split: str):
        self.ctx, self.split, self.maps = ctx, split, None

    def __enter__(self) -> FeatureFn:
        self.maps = convmaps.load(self.ctx, self.split)
        return self.features

    def __exit__(self, *exc) -> None:
        self.maps.close()

    def features(self, model, ann, boxes: np.ndarray, layers: tuple[str, ...]) -> tuple[dict[str, np.ndarray], float]:
        conv, factors = convmaps.image_record(self.maps, ann.image_id)
        tick = time.perf_counter()
        feats = spp_region_features(model, conv, factors, boxes, layers, self.ctx.cfg.spp.target_size)
        return feats, time.perf_counter() - tick


METHODS = {m.name: m for m in (RCNN, SPPNet)}


def method_named(name: str) -> Method:
    """The method called ``name`` in a configuration ("rcnn" or "spp")."""
    if name not in METHODS:
        raise ConfigError(f"method: unknown method '{name}' (choose from {', '.join(METHODS)})")
    return METHODS[name]()


def build_method(cfg) -> Method:
    """The method a pipeline's configuration chooses (``cfg.method``)."""
    return method_named(cfg.method)
