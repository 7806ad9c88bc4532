"""The detection method (R-CNN, SPP-net or Fast R-CNN) as one object, chosen once from the configuration.

A method owns how regions become features: R-CNN warps every region and runs the whole
CNN on it (Girshick et al. 2014, section 2.1); SPP-net runs the conv layers once per
image and scale, caches those maps (stage `convmaps`) and pools every window's pyramid
from them (He et al. 2014, section 3.1); Fast R-CNN RoI-pools every region from the
image's conv map and trains the network to score and place them itself, with no SVMs
or ridge regressors after it (Girshick 2015). Stages, benchmarks and the CLI ask the
method and never test its name: :func:`method_named` is the one place that reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np

from rcnn.errors import ConfigError
from rcnn.methods.fast_regions import FROZEN_CONVS, OUTPUTS, FastRegionOutputs, FastRegions
from rcnn.methods.rcnn_regions import WarpedRegionFeatures, WarpedRegions
from rcnn.methods.spp_regions import PooledRegionFeatures, PooledRegions
from rcnn.modeling.models import add_box_head
from rcnn.training.sampling import FgBgSampler, ImageBatchSampler

from . import convmaps
from .context import Context
from .provenance import upstream_digest
from .region_features import (
    FastOutputs,
    LayerReader,
    Pooled,
    PyramidReader,
    RegionFeatures,
    Warped,
    WarpedReader,
    caches_regression_rows,
    made_as,
)

__all__ = ["METHODS", "Method", "build_method", "caches_regression_rows", "made_as", "method_named"]


class Method:
    """What a detection method decides; by default R-CNN's way (the whole network run on each warped region)."""

    name = ""
    title, article = "", ""  # as messages name it: "an R-CNN pipeline"
    extra_stages: tuple[str, ...] = ()  # stages only this method runs, besides the common ones
    skipped_stages: tuple[str, ...] = ()  # common stages this method does not run
    whole_images = False  # the trunk runs on whole images (no fixed input size)
    # What scores and moves the test boxes, as evaluate's figures name the two variants.
    variant_labels = {"plain": "SVM scores", "bbox": "SVM + box regression"}

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

    def feature_splits(self, ctx: Context) -> tuple[str, ...]:
        """The splits stage `features` computes: both, the training split's for the SVMs and box regressors."""
        return ctx.splits

    def svd_ranks(self, cfg) -> tuple[int | None, int | None]:
        """Ranks of fc6 and fc7's truncated SVDs at test time (None: as trained); features computes with them."""
        return None, None

    def training_regions(self, ctx: Context, anns, boxes: list[np.ndarray], model, labels: list[np.ndarray]):
        """Fine-tuning's inputs: the ``regions`` :func:`rcnn.training.finetune.fine_tune` trains (``labels``: each
        image's region labels, as :func:`rcnn.training.regions.finetune_labels` gives them)."""
        ft = ctx.cfg.finetune
        return WarpedRegions(anns, boxes, model, ft.context_pad, ft.mirror, ft.seed, ctx.cfg.model.warp)

    def sampler(self, ctx: Context, labels: list[np.ndarray]) -> FgBgSampler:
        """Fine-tuning's mini-batches over the images' region ``labels`` (-1: not drawn): R-CNN's, regions of any
        image (128 with 32 foreground)."""
        ft = ctx.cfg.finetune
        return FgBgSampler.from_image_labels(labels, batch_size=ft.batch_size, fg_fraction=ft.fg_fraction)

    def prepare_training(self, ctx: Context, regions, sampler) -> None:
        """Initialise what the method sets from the data before the first step of a fresh run."""

    def region_features(self, ctx: Context, split: str) -> AbstractContextManager[RegionFeatures]:
        """A context manager giving the :class:`RegionFeatures` of ``split``'s images (``load(ann)``, then the call)."""
        return Warped(ctx)

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
    title, article = "R-CNN", "an"


class SPPNet(Method):
    """SPP-net: conv maps cached once per image and scale, windows pooled from them; fc layers learn."""

    name = "spp"
    title, article = "SPP-net", "an"
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

    def training_regions(self, ctx: Context, anns, boxes: list[np.ndarray], model, labels: list[np.ndarray]):
        maps = convmaps.load(ctx, ctx.cfg.data.trainval)
        ft, spp = ctx.cfg.finetune, ctx.cfg.spp
        maps_of = lambda image_id, mirror: convmaps.image_record(maps, image_id, mirror)  # noqa: E731
        return PooledRegions(maps_of, anns, boxes, model, spp.target_size, ft.mirror, ft.seed, spp.random_scale)

    def prepare_training(self, ctx: Context, regions, sampler) -> None:
        rms = ctx.cfg.spp.fc6_input_rms
        if rms is not None:
            regions.model.fc6_input_scale.fill_(regions.input_scale(sampler, ctx.cfg.finetune.seed + 1, rms))

    def region_features(self, ctx: Context, split: str) -> AbstractContextManager[RegionFeatures]:
        return Pooled(ctx, split)

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


class FastRCNN(Method):
    """Fast R-CNN: RoIs pooled from the conv map of the whole image; the network learns the class scores and
    the box deltas evaluate uses, so stages train-svm and train-bbox do not run."""

    name = "fast"
    title, article = "Fast R-CNN", "a"
    skipped_stages = ("train-svm", "train-bbox")
    whole_images = True
    variant_labels = {"plain": "softmax scores", "bbox": "softmax + box regression"}

    def untrained_model(self, ctx: Context):
        return add_box_head(convmaps.untrained_model(ctx, spp=False))

    def cached_layers(self, layers: tuple[str, ...]) -> tuple[str, ...]:
        return OUTPUTS  # what evaluate reads; the fc layers are not cached

    def finetune_params(self, ctx: Context) -> dict:
        from rcnn.config import fingerprint_params

        params = fingerprint_params(ctx.cfg.fast)
        for key in ("svd_fc6", "svd_fc7"):  # test time only: stage features records them
            params.pop(key)
        return {"fast": params}

    def feature_splits(self, ctx: Context) -> tuple[str, ...]:
        return (ctx.cfg.data.test,)  # nothing is trained on features: only evaluate reads them

    def svd_ranks(self, cfg) -> tuple[int | None, int | None]:
        return cfg.fast.svd_fc6, cfg.fast.svd_fc7

    def frozen_convs(self, cfg) -> int:
        """The leading conv layers fine-tuning keeps fixed (``fast.frozen_convs``, or the paper's for the backbone)."""
        return FROZEN_CONVS[cfg.model.backbone] if cfg.fast.frozen_convs is None else cfg.fast.frozen_convs

    def sampler(self, ctx: Context, labels: list[np.ndarray]) -> FgBgSampler:
        ft = ctx.cfg.finetune
        return ImageBatchSampler.from_image_labels(
            labels, batch_size=ft.batch_size, fg_fraction=ft.fg_fraction, images_per_batch=ctx.cfg.fast.images_per_batch
        )

    def training_regions(self, ctx: Context, anns, boxes: list[np.ndarray], model, labels: list[np.ndarray]):
        ft, fast = ctx.cfg.finetune, ctx.cfg.fast
        frozen = self.frozen_convs(ctx.cfg)
        return FastRegions(
            anns, boxes, labels, model, fast.scales, fast.max_side, ft.mirror, ft.seed, frozen, fast.box_loss_weight
        )

    def prepare_training(self, ctx: Context, regions, sampler) -> None:
        sizes = [len(t) for t in regions.targets]
        labels = np.split(sampler.labels, np.cumsum(sizes)[:-1]) if sizes else []
        regions.normalise_targets(labels)
        rms = ctx.cfg.fast.fc6_input_rms
        if rms is not None:
            regions.model.fc6_input_scale.fill_(regions.input_scale(sampler, ctx.cfg.finetune.seed + 1, rms))

    def region_features(self, ctx: Context, split: str) -> AbstractContextManager[RegionFeatures]:
        return FastOutputs(ctx)

    def regression_layer(self, cfg) -> str | None:
        return None

    def test_features(self, cfg, model) -> Callable[[np.ndarray, np.ndarray, tuple[str, ...]], dict[str, np.ndarray]]:
        return FastRegionOutputs(model, cfg.fast.scales, cfg.fast.max_side, cfg.model.precision, self.svd_ranks(cfg))


METHODS = {m.name: m for m in (RCNN, SPPNet, FastRCNN)}


def method_named(name: str) -> Method:
    """The method called ``name`` in a configuration ("rcnn", "spp" or "fast")."""
    if name not in METHODS:
        raise ConfigError(f"method: unknown method '{name}' (choose from {', '.join(METHODS)})")
    return METHODS[name]()


def build_method(cfg) -> Method:
    """The method a pipeline's configuration chooses (``cfg.method``)."""
    return method_named(cfg.method)
