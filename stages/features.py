"""Stage `features`: the fine-tuned CNN's features of every ground-truth box and proposal, cached in HDF5.

One record per image: ``boxes`` float32 ``[N, 4]`` (ground truth first), ``gt_classes``
int64 ``[N]`` (-1 for proposals), ``overlaps`` float32 ``[N, C]``, ``best_gt`` int64 ``[N]``
and one float16 ``[N, D]`` array per configured layer (pool5 for box regression and
fc7 for the SVMs, as R-CNN cached them). Records stay in their parts, joined by
``index.json``; a killed run resumes at the first image without a record.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from rcnn import records
from rcnn.datasets import load_image
from rcnn.detector import region_features
from rcnn.errors import UserError
from rcnn.regions import image_regions
from rcnn.spp_features import spp_region_features

from . import convmaps, finetune, proposals
from .common import Context, cached_mb, pending_images, progress_bar, upstream_digest

NAME = "features"
SCHEMA_VERSION = 1
CODE = ("rcnn.models", "rcnn.regions", "rcnn.records", "rcnn.warp", "rcnn.detector", "rcnn.spp_features", "stages.features")
INDEX = "index.json"
KIND = "features"
LAYERS = ("pool5", "fc6", "fc7")


def splits(ctx: Context) -> tuple[str, ...]:
    return ctx.splits


def params(ctx: Context) -> dict:
    bad = [layer for layer in ctx.cfg.features.layers if layer not in LAYERS]
    if bad:
        raise UserError(f"features.layers: unknown layer '{bad[0]}' (choose from {', '.join(LAYERS)})")
    return {
        "method": ctx.cfg.method,
        "layers": list(ctx.cfg.features.layers),
        "context_pad": ctx.cfg.finetune.context_pad,
        "classes": list(ctx.classes),
        "use_difficult": ctx.cfg.data.use_difficult,
    }


def inputs(ctx: Context, split: str) -> dict[str, str]:
    trainval = ctx.cfg.data.trainval
    out = {
        f"data/{split}": ctx.dataset(split).fingerprint,
        f"proposals/{split}": upstream_digest(ctx, "proposals", split),
        "finetune": upstream_digest(ctx, "finetune", trainval),
    }
    if ctx.cfg.method == "spp":
        out[f"convmaps/{split}"] = upstream_digest(ctx, "convmaps", split)
    return out


def compute(ctx: Context, split: str, work: Path) -> tuple[dict[str, Path], dict]:
    cfg = ctx.cfg
    dataset = ctx.dataset(split)
    dataset.check(ctx.classes)
    model, _ = finetune.load(ctx)
    model.eval()
    device = next(model.parameters()).device
    layers = tuple(cfg.features.layers)
    parts = work / "parts"
    todo = pending_images(ctx, f"{NAME}/{split}", parts, dataset.ids)
    bar = progress_bar(ctx, len(todo), f"features {split}")
    start = time.perf_counter()
    n_boxes = 0
    maps = convmaps.load(ctx, split) if cfg.method == "spp" else None
    with proposals.load(ctx, split) as props, records.RecordWriter(parts, KIND, chunk_size=16, compress=layers) as writer:
        for image_id in todo:
            ann = dataset.annotation(image_id)
            regions = image_regions(ann, props.array(image_id, "boxes", np.float32, 2), ctx.classes, cfg.data.use_difficult)
            if maps is not None:
                factors = maps.array(image_id, "factors", np.float32, 1)
                conv = [maps.array(image_id, f"conv{k}", np.float16, 3) for k in range(len(factors))]
                feats = spp_region_features(model, conv, factors, regions.boxes, layers, cfg.spp.target_size)
            else:
                image = cv2.cvtColor(load_image(ann), cv2.COLOR_BGR2RGB)
                feats = region_features(model, image, regions.boxes, layers, cfg.finetune.context_pad, cfg.features.batch_size)
            writer.add(
                image_id,
                {
                    "boxes": regions.boxes,
                    "gt_classes": regions.gt_classes,
                    "overlaps": regions.overlaps,
                    "best_gt": regions.best_gt,
                    **feats,
                },
            )
            n_boxes += len(regions.boxes)
            bar.update(1)
            bar.set_postfix(boxes=len(regions.boxes))
    bar.close()
    wall = time.perf_counter() - start
    index = work / INDEX
    outputs = records.write_index(parts, index, dataset.ids, KIND)
    outputs[INDEX] = index
    metrics = {
        "images": len(dataset),
        "images_computed": len(todo),
        "layers": list(layers),
        "device": str(device),
        "seconds_per_image": wall / len(todo) if todo else None,
        "boxes_per_s": n_boxes / wall if todo and wall > 0 else None,
    }
    return outputs, metrics


def load(ctx: Context, split: str) -> records.RecordSet:
    """Open the cached features of ``split``."""
    return records.RecordSet(ctx.unit_dir(NAME, split) / INDEX, KIND)


def describe(manifest: dict) -> str:
    m = manifest.get("metrics", {})
    size = cached_mb(manifest)
    rate = m.get("seconds_per_image")
    rate_text = f", {rate:.2f} s/image on {m.get('device')}" if rate else ""
    return f"{m.get('images')} images, layers {', '.join(m.get('layers', []))}, {size:.1f} MB cached{rate_text}"
