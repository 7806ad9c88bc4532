"""The measurements of ``run_all.py``: each runs one part of the library and its stock baseline
(``stock.py``) on the same images, boxes and device, and returns their figures.

A measurement takes a :class:`Bench` and returns ``{name: figures}``; figures hold ``ours`` and
``stock`` in ``unit``, whether ``lower`` is better, and ``details``. The caller adds the ratio.
"""

from __future__ import annotations

import shutil
import statistics
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import stock
import torch
from common import alternate, rcnn_image_features, spp_image_features, timed

from rcnn.config import DataConfig, FinetuneConfig, ModelConfig, PipelineConfig, SPPConfig
from rcnn.data.datasets import ImageAnnotation
from rcnn.data.folders import folder_bytes
from rcnn.learners.svm import ImageFeatures, SVMParams, train_class_svms
from rcnn.methods.rcnn_regions import region_features_later
from rcnn.methods.spp_regions import image_maps, spp_region_features_later
from rcnn.modeling.checkpoints import initialise
from rcnn.modeling.inference import for_inference
from rcnn.modeling.models import build_model, to_training_device
from rcnn.modeling.spp import PYRAMID_LEVELS
from rcnn.modeling.spp_geometry import TARGET_SIZE, image_scales
from rcnn.runtime import strict_float32
from rcnn.stages import convmaps
from rcnn.stages.context import Context
from rcnn.stages.finetune import schedule as finetune_schedule
from rcnn.stages.image_records import one_ahead
from rcnn.stages.methods import build_method
from rcnn.stages.runner import run_stage
from rcnn.store import records
from rcnn.training.finetune import deterministic_cudnn, training_autocast
from rcnn.training.regions import finetune_labels, image_regions, regression_rows
from rcnn.training.sampling import FgBgSampler

MAX_SIDE = SPPConfig().max_side  # the pipelines' cap on the longer side after resizing


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does."""

    images: int  # images per measurement
    boxes: int  # boxes per image
    squeezenet_crop: int  # R-CNN crop side for SqueezeNet (AlexNet's fc6 needs its own 227)
    scale: int  # SPP-net's single scale (shorter side)
    scales: tuple[int, ...]  # SPP-net's five scales
    image_size: int  # side of the synthetic images
    finetune_batch: int  # regions per fine-tuning step
    finetune_steps: int  # timed steps per method, the median kept
    svm_images: int  # images the SVMs train on (the stock fit on every negative grows with them)
    svm_repeats: int  # timed fits per side, taking turns, the median kept
    svm_dim: int  # feature width the SVMs read (AlexNet's fc7: 4096)
    repeats: int  # timed runs per image
    warmup: bool = True  # one untimed run of each side first


@dataclass
class Bench:
    """What every measurement shares: device, sizes, the images (decoded, BGR), their boxes and classes."""

    device: torch.device
    sizes: Sizes
    voc: Path  # a VOC folder whose split "bench" lists the images
    anns: list[ImageAnnotation]
    images: list[np.ndarray]
    boxes: list[np.ndarray]
    classes: tuple[str, ...]
    tmp: Path
    squeezenet_weights: str | None = None
    precision: str = "auto"  # model.precision of the library's side (the stock side keeps its autocast)
    _networks: dict = field(default_factory=dict, repr=False)

    def network(self, key: tuple, build):
        """The network ``build()`` made for ``key``, built once: measurements share the inference networks."""
        if key not in self._networks:
            self._networks[key] = build()
        return self._networks[key]

    def as_stages(self, fn):
        """``fn`` run as the stages run the library: under ``model.precision: float32``, float32 on a GPU too,
        not TF32 (stages/runner.py), so that what is timed is what a stage computes."""

        def run(*args):
            with strict_float32(self.precision == "float32"):
                return fn(*args)

        return run


def context_pad(crop: int) -> int:
    """R-CNN's 16 px of context at 227 px, scaled to ``crop``."""
    return round(16 * crop / 227)


def _figures(ours: float, stock_value: float, unit: str, lower: bool = True, **details) -> dict:
    return {"ours": ours, "stock": stock_value, "unit": unit, "lower": lower, "details": details}


def _per_image(b: Bench, ours, baseline) -> tuple[float, float]:
    """Mean over the images of the median milliseconds per image of ``ours(image, boxes)`` and ``baseline``, each
    image's first run untimed: a new image size makes oneDNN or cuDNN choose kernels once, which a stage pays
    once per size, not per image."""
    times: dict[str, list[float]] = {"ours": [], "stock": []}
    for image, boxes in zip(b.images, b.boxes):
        fns = {"ours": partial(b.as_stages(ours), image, boxes), "stock": partial(baseline, image, boxes)}
        for name, seconds in alternate(fns, b.sizes.repeats, b.device, warmup=b.sizes.warmup).items():
            times[name].append(seconds)
    return 1000 * float(np.mean(times["ours"])), 1000 * float(np.mean(times["stock"]))


def _rcnn_net(b: Bench, backbone: str, crop: int, weights: str | None):
    def build():
        net = build_model(backbone, len(b.classes) + 1, crop)
        if weights:
            initialise(net, weights)
        return for_inference(net.to(b.device), dtype=b.precision)

    return b.network(("rcnn", backbone, crop, weights), build)


def _spp_net(b: Bench):
    def build():
        net = build_model("alexnet", len(b.classes) + 1, spp_levels=PYRAMID_LEVELS)
        return for_inference(net.to(b.device), whole_images=True, dtype=b.precision)

    return b.network(("spp", "alexnet"), build)


def _rcnn(b: Bench, backbone: str, crop: int, weights: str | None, layers=("pool5", "fc7")) -> dict:
    pad = context_pad(crop)
    net = _rcnn_net(b, backbone, crop, weights)
    baseline = partial(stock.RCNNFeatures(backbone, crop, pad, b.device, weights), pool5="pool5" in layers)
    ours, base = _per_image(b, lambda im, bx: rcnn_image_features(net, im, bx, pad, layers), baseline)
    return _figures(ours, base, "ms/image", backbone=backbone, crop=crop, context_pad=pad, boxes=b.sizes.boxes,
                    layers=list(layers))  # fmt: skip


def rcnn_features(b: Bench) -> dict:
    """R-CNN's pool5 and fc7 of every box of a decoded image: AlexNet at 227 px, SqueezeNet; and AlexNet's fc7
    alone on both sides, what the features stage copies out for a test image under ``features.bbox_rows:
    regression`` (the papers' pipelines)."""
    return {
        "rcnn_alexnet": _rcnn(b, "alexnet", 227, None),
        "rcnn_squeezenet": _rcnn(b, "squeezenet1_0", b.sizes.squeezenet_crop, b.squeezenet_weights),
        "rcnn_alexnet_fc7": _rcnn(b, "alexnet", 227, None, ("fc7",)),
    }


def spp_features(b: Bench) -> dict:
    """SPP-net's pyramids and fc7 of every box of a decoded image, at one scale and at five; and fc7 alone at one
    scale on both sides, what the features stage copies out (the pyramid is pooled again where box regression
    reads it)."""
    net = _spp_net(b)
    baseline = stock.SPPFeatures(MAX_SIDE, PYRAMID_LEVELS, TARGET_SIZE, b.device)
    out, one, both = {}, (b.sizes.scale,), ("pool5", "fc7")
    variants = {"spp_1_scale": (one, both), "spp_5_scales": (b.sizes.scales, both), "spp_1_scale_fc7": (one, ("fc7",))}
    for name, (scales, layers) in variants.items():
        ours, base = _per_image(
            b,
            lambda im, bx, s=scales, k=layers: spp_image_features(net, im, bx, s, MAX_SIDE, TARGET_SIZE, k),
            lambda im, bx, s=scales, k=layers: baseline(im, bx, s, pool5="pool5" in k),
        )
        out[name] = _figures(ours, base, "ms/image", backbone="alexnet", scales=list(scales), levels=list(PYRAMID_LEVELS),
                             boxes=b.sizes.boxes, layers=list(layers))  # fmt: skip
    return out


def _stream(b: Bench, start, baseline) -> tuple[float, float]:
    """Milliseconds per image over all the images in a row: ours as the features stage runs them, each
    image's work queued before the previous one's is waited for (``start(image, boxes)`` gives a
    :class:`rcnn.modeling.transfer.HostCopy`), against the baseline one image after another."""
    pairs = list(zip(b.images, b.boxes))

    def ours() -> None:
        for _ in one_ahead(pairs, lambda pair: start(*pair), lambda copy: copy.arrays()):
            pass

    def baseline_all() -> None:
        for image, boxes in pairs:
            baseline(image, boxes)

    times = alternate({"ours": b.as_stages(ours), "stock": baseline_all}, b.sizes.repeats, b.device, warmup=b.sizes.warmup)
    return 1000 * times["ours"] / len(pairs), 1000 * times["stock"] / len(pairs)


def streamed_features(b: Bench) -> dict:
    """R-CNN (AlexNet) and SPP-net (one scale) over a row of images, with one image in flight as the
    features stage keeps it (the whole gain is on a GPU, which computes while the host finishes an image)."""
    pad = context_pad(227)
    rcnn_net, spp_net = _rcnn_net(b, "alexnet", 227, None), _spp_net(b)
    rcnn_stock = stock.RCNNFeatures("alexnet", 227, pad, b.device)
    spp_stock = stock.SPPFeatures(MAX_SIDE, PYRAMID_LEVELS, TARGET_SIZE, b.device)
    scales = (b.sizes.scale,)

    def rcnn_start(image, boxes):
        return region_features_later(rcnn_net, cv2.cvtColor(image, cv2.COLOR_BGR2RGB), boxes, ("pool5", "fc7"), pad)

    def spp_start(image, boxes):
        factors = image_scales(image.shape[0], image.shape[1], scales, MAX_SIDE)
        maps = image_maps(spp_net, image, factors, to_host=False)
        return spp_region_features_later(spp_net, maps, factors, boxes, ("fc7",), TARGET_SIZE)  # as the stage: fc7

    ours, base = _stream(b, rcnn_start, rcnn_stock)
    spp_ours, spp_base = _stream(b, spp_start, lambda image, boxes: spp_stock(image, boxes, scales, pool5=False))
    return {
        "rcnn_alexnet_stream": _figures(
            ours, base, "ms/image", backbone="alexnet", crop=227, context_pad=pad, boxes=b.sizes.boxes, images=len(b.images)
        ),  # fmt: skip
        "spp_1_scale_stream": _figures(
            spp_ours,
            spp_base,
            "ms/image",
            backbone="alexnet",
            scales=list(scales),
            levels=list(PYRAMID_LEVELS),
            boxes=b.sizes.boxes,
            images=len(b.images),
        ),  # fmt: skip
    }


def _write_records(folder: Path, kind: str, items: list[tuple[str, dict]]) -> int:
    """Bytes of ``items`` written as the stages write them: record parts and their index."""
    with records.RecordWriter(folder / "parts", kind, chunk_size=16) as writer:
        for image_id, arrays in items:
            writer.add(image_id, arrays)
    records.write_index(folder / "parts", folder / "index.json", [i for i, _ in items], kind)
    size = folder_bytes(folder)
    shutil.rmtree(folder)
    return size


def cache_bytes(b: Bench) -> dict:
    """Feature cache per image: R-CNN's features records (pool5 and fc7 of every box, float16, as
    ``features.bbox_rows: all`` keeps them), the same under ``bbox_rows: regression`` (fc7 of every box,
    pool5 of the rows box regression trains on: a trainval image's records; a test image's hold no pool5)
    and SPP-net's conv-map records (one scale) plus its fc7 records; the stock cache is what the baseline
    computes kept with ``torch.save``: float32 pool5 and fc7 of every box."""
    n = min(2, len(b.images))
    rcnn_net, spp_net = _rcnn_net(b, "alexnet", 227, None), _spp_net(b)
    rcnn_items, sparse_items, spp_maps, spp_items, stock_bytes = [], [], [], [], 0
    regression_count = 0
    with torch.no_grad():
        for ann, image, boxes in list(zip(b.anns, b.images, b.boxes))[:n]:
            regions = image_regions(ann, boxes, b.classes)
            rows = {"boxes": regions.boxes, "gt_classes": regions.gt_classes, "overlaps": regions.overlaps,
                    "best_gt": regions.best_gt}  # fmt: skip
            feats = rcnn_image_features(rcnn_net, image, regions.boxes, context_pad(227))
            rcnn_items.append((ann.image_id, {**rows, **feats}))
            # R-CNN's box regression: IoU >= 0.6 with a ground truth (appendix C), the pipelines' bbox.min_overlap
            keep = regression_rows(ann, regions.best_gt, regions.overlaps, b.classes, 0.6).rows
            regression_count += len(keep)
            sparse = {"fc7": feats["fc7"], "pool5": feats["pool5"][keep], "pool5_rows": keep.astype(np.int32)}
            sparse_items.append((ann.image_id, {**rows, **sparse}))
            factors = image_scales(ann.height, ann.width, (b.sizes.scale,), MAX_SIDE)
            maps = image_maps(spp_net, image, factors)
            conv = {f"conv{k}": m for k, m in enumerate(maps)}
            spp_maps.append((ann.image_id, {"factors": np.asarray(factors, np.float32), **conv}))
            fc7 = spp_image_features(spp_net, image, regions.boxes, (b.sizes.scale,), MAX_SIDE, TARGET_SIZE, ("fc7",))
            spp_items.append((ann.image_id, {**rows, **fc7}))
            path = b.tmp / "stock-cache.pt"
            torch.save({k: torch.from_numpy(feats[k].astype(np.float32)) for k in ("pool5", "fc7")}, path)
            stock_bytes += path.stat().st_size
            path.unlink()
    mb = 1 / (n * 2**20)
    rcnn = _write_records(b.tmp / "cache-rcnn", "features", rcnn_items) * mb
    sparse = _write_records(b.tmp / "cache-rcnn-rows", "features", sparse_items) * mb
    spp_bytes = _write_records(b.tmp / "cache-maps", convmaps.KIND, spp_maps)
    spp = (spp_bytes + _write_records(b.tmp / "cache-spp", "features", spp_items)) * mb
    return {
        "cache_rcnn": _figures(rcnn, stock_bytes * mb, "MB/image", layers=["pool5", "fc7"], boxes=b.sizes.boxes),
        "cache_rcnn_regression": _figures(
            sparse,
            stock_bytes * mb,
            "MB/image",
            layers=["pool5 (regression rows)", "fc7"],
            boxes=b.sizes.boxes,
            regression_rows=regression_count / n,
        ),
        "cache_spp": _figures(spp, stock_bytes * mb, "MB/image", layers=["conv maps", "fc7"], scales=[b.sizes.scale]),
    }


def _context(b: Bench, method: str, pad: int, bg_low: float) -> Context:
    """A pipeline over the bench images for the stages' own training objects (AlexNet, random init)."""
    cfg = PipelineConfig(
        name=f"bench-{method}",
        method=method,
        data=DataConfig(root=str(b.voc), trainval="bench", test="bench", classes=b.classes),
        model=ModelConfig(backbone="alexnet", weights="scratch", device=b.device.type, precision=b.precision),
        finetune=FinetuneConfig(context_pad=pad, bg_low=bg_low, batch_size=b.sizes.finetune_batch, mirror=False),
        spp=SPPConfig(scales=(b.sizes.scale,), max_side=MAX_SIDE, levels=PYRAMID_LEVELS),
    )
    return Context(cfg=cfg, runs_dir=b.tmp / "runs", progress=False, log=lambda _: None)


def _regions(b: Bench, ctx: Context) -> tuple[list[np.ndarray], list[np.ndarray], FgBgSampler]:
    ft = ctx.cfg.finetune
    boxes, labels = [], []
    for ann, proposals in zip(b.anns, b.boxes):
        regions = image_regions(ann, proposals, b.classes)
        boxes.append(regions.boxes)
        labels.append(finetune_labels(regions, ft.fg_threshold, ft.bg_low))
    return boxes, labels, FgBgSampler.from_image_labels(labels, batch_size=ft.batch_size, fg_fraction=ft.fg_fraction)


def _train_steps(b: Bench, ctx: Context, regions, model, baseline, sampler: FgBgSampler) -> dict:
    """Regions per second of the stage's training step (the loop body of stages/finetune.py) and the stock one,
    taking turns on the same mini-batches after one untimed step each."""
    ft, device = ctx.cfg.finetune, b.device
    optimizer = finetune_schedule(ctx).make_optimizer(regions.model, regions.trainable())
    loss_fn = torch.nn.CrossEntropyLoss()

    def ours(it: int, batch: np.ndarray) -> float:
        with deterministic_cudnn(device):
            return _step(it, batch)

    def _step(it: int, batch: np.ndarray) -> float:
        regions.train_mode()
        img_idx, reg_idx = sampler.locate(batch)
        target = torch.from_numpy(sampler.labels[batch]).to(device)
        with training_autocast(device, ctx.cfg.model.precision):
            logits = regions.logits(img_idx, reg_idx, it)
            loss = loss_fn(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    steps, warmup = b.sizes.finetune_steps, b.sizes.warmup
    times: dict[str, list[float]] = {"ours": [], "stock": []}
    for it, batch in enumerate(sampler.epoch_batches(ft.seed, n_batches=steps + warmup)):
        target = torch.from_numpy(sampler.labels[batch]).to(device)
        fns = {"ours": partial(b.as_stages(ours), it, batch), "stock": partial(baseline.step, batch, target)}
        if warmup and it == 0:  # the first batch warms both sides up, untimed
            for fn in fns.values():
                timed(fn, device)
            continue
        for name, seconds in alternate(fns, 1, device).items():
            times[name].append(seconds)
    rates = [ft.batch_size / statistics.median(times[k]) for k in ("ours", "stock")]
    return _figures(*rates, "regions/s", lower=False, batch=ft.batch_size, steps=steps, regions=len(sampler.labels))


def finetune_rcnn(b: Bench) -> dict:
    """R-CNN fine-tuning of all of AlexNet on 227 px warped regions (R-CNN section 2.3), regions per second."""
    ctx = _context(b, "rcnn", context_pad(227), bg_low=0.0)
    boxes, labels, sampler = _regions(b, ctx)
    model = to_training_device(build_method(ctx.cfg).untrained_model(ctx), b.device)  # as stages/finetune.py
    regions = build_method(ctx.cfg).training_regions(ctx, b.anns, boxes, model, labels)
    for i in range(len(b.anns)):  # decoded once, as the stock side uploads every image first
        regions.images[i]
    baseline = stock.RCNNFinetune(b.images, sampler.image_index, np.concatenate(boxes), len(b.classes) + 1, 227,
                                  context_pad(227), b.device)  # fmt: skip
    return {"finetune_rcnn": _train_steps(b, ctx, regions, model, baseline, sampler)}


def finetune_spp(b: Bench) -> dict:
    """SPP-net fine-tuning of fc6, fc7 and the classifier on windows pooled from cached conv maps
    (one scale), regions per second; the maps are computed first by the convmaps stage (not timed)."""
    ctx = _context(b, "spp", context_pad(227), bg_low=0.1)  # SPP-net: background IoU in [0.1, 0.5)
    run_stage(ctx, convmaps)  # as a run writes them: manifest and digests, which the reader checks
    boxes, labels, sampler = _regions(b, ctx)
    model = to_training_device(build_method(ctx.cfg).untrained_model(ctx), b.device)  # as stages/finetune.py
    regions = build_method(ctx.cfg).training_regions(ctx, b.anns, boxes, model, labels)
    regions.pooled(np.arange(len(b.anns)), np.zeros(len(b.anns), np.int64))  # every image's maps loaded once
    model.fc6_input_scale.fill_(regions.input_scale(sampler, ctx.cfg.finetune.seed + 1, ctx.cfg.spp.fc6_input_rms))
    baseline = stock.SPPFinetune(b.images, sampler.image_index, np.concatenate(boxes), len(b.classes) + 1, b.sizes.scale,
                                 MAX_SIDE, PYRAMID_LEVELS, b.device)  # fmt: skip
    return {"finetune_spp": _train_steps(b, ctx, regions, model, baseline, sampler)}


def svm_training(b: Bench) -> dict:
    """Per-class SVMs with R-CNN's hard-negative mining (rcnn.learners.svm, one worker) against one liblinear fit per
    class on every negative, on the same features: synthetic, ``svm_dim`` wide, ReLU-like, each row carrying
    its classes' signal in proportion to its overlap with their objects."""
    rng = np.random.default_rng(0)
    n = min(b.sizes.svm_images, len(b.anns))
    regions = [image_regions(a, bx, b.classes) for a, bx in zip(b.anns[:n], b.boxes[:n])]
    # Only classes with a ground-truth box here get an SVM (train_class_svms needs positives for each).
    kept = sorted({int(c) for r in regions for c in r.gt_classes if c >= 0})
    remap = np.full(len(b.classes) + 1, -1, np.int64)
    remap[kept] = np.arange(len(kept))
    signal = rng.standard_normal((len(kept), b.sizes.svm_dim), dtype=np.float32)
    images = []
    for r in regions:
        overlaps = r.overlaps[:, kept]
        x = rng.standard_normal((len(r.boxes), b.sizes.svm_dim), dtype=np.float32) + 2 * np.square(overlaps) @ signal
        images.append(ImageFeatures(np.maximum(x, 0), remap[r.gt_classes], overlaps))
    fns = {"ours": lambda: train_class_svms(images, len(kept), SVMParams(), n_jobs=1),
           "stock": lambda: stock.train_svms([i.features for i in images], [i.gt_classes for i in images],
                                             [i.overlaps for i in images], len(kept))}  # fmt: skip
    t, rows = alternate(fns, b.sizes.svm_repeats, torch.device("cpu")), sum(len(i.features) for i in images)
    details = dict(classes=len(kept), images=n, rows=rows, dim=b.sizes.svm_dim, fits=b.sizes.svm_repeats)
    return {"svm": _figures(t["ours"], t["stock"], "s", **details)}


#: In the order they run; ``run_all.py --only`` takes these names.
MEASUREMENTS = {
    "rcnn": rcnn_features,
    "spp": spp_features,
    "stream": streamed_features,
    "cache": cache_bytes,
    "finetune-rcnn": finetune_rcnn,
    "finetune-spp": finetune_spp,
    "svm": svm_training,
}
