"""Stage `convmaps` (SPP-net): the conv trunk's feature maps of every image, once per scale, cached in HDF5.

SPP-net runs the convolutional layers once per image (per scale) instead of once
per region; these maps are the cached artifact from which every window's pyramid
is pooled. Per image: ``factors`` float32 ``[K]`` (resize factor of each scale) and
``conv<k>`` float16 ``[H_k, W_k, C]``, channels last (the layout the trunk computes and pooling reads).
Where fine-tuning mirrors its training data (``finetune.mirror``), the trainval records also
hold ``mirror<k>``: the maps of the horizontally flipped image, as SPP-net's released code
caches them for fine-tuning (``flip_finetune`` in its ``Script_spp_voc.m``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from rcnn.data.datasets import load_image
from rcnn.methods.spp_regions import image_maps_later
from rcnn.modeling.checkpoints import initialise
from rcnn.modeling.inference import for_inference
from rcnn.modeling.models import DetectorNet, build_model, device_for, device_label
from rcnn.modeling.spp_geometry import image_scales
from rcnn.store import records

from .context import Context
from .image_records import images_ahead, one_ahead, write_image_records
from .provenance import cached_mb, upstream_check

NAME = "convmaps"
SCHEMA_VERSION = 2  # 2: maps stored channels last
INDEX = "index.json"
KIND = "convmaps"
PART_SIZE = 16  # images per part file


def splits(ctx: Context) -> tuple[str, ...]:
    return ctx.splits


def untrained_model(ctx: Context, spp: bool):
    """The configured backbone with fresh weights (this stage's trunk; fine-tuning starts from it too);
    with ``spp``, fc6 reads the configured pyramid and windows are mapped with the configured offset
    (``spp.offset``: a number, or the trunk's own)."""
    m = ctx.cfg.model
    levels = ctx.cfg.spp.levels if spp else None
    model = build_model(m.backbone, len(ctx.classes) + 1, m.input_size, m.fc_dim, m.seed, spp_levels=levels)
    if spp and ctx.cfg.spp.offset != "trunk":
        model.spec = replace(model.spec, offset=float(ctx.cfg.spp.offset))
    return model


def params(ctx: Context) -> dict:
    m = ctx.cfg.model
    return {
        "backbone": m.backbone,
        "weights": ctx.weights_param(),
        "precision": m.precision,
        "scales": list(ctx.cfg.spp.scales),
        "max_side": ctx.cfg.spp.max_side,
        "mirror": ctx.cfg.finetune.mirror,
    }


def mirrored(ctx: Context, split: str) -> bool:
    """Whether ``split``'s records also hold the maps of the flipped images (fine-tuning's split, if it mirrors)."""
    return ctx.cfg.finetune.mirror and split == ctx.cfg.data.trainval


def inputs(ctx: Context, split: str) -> dict[str, str]:
    return {f"data/{split}": ctx.dataset(split).fingerprint, **ctx.weights()[1]}


def trunk_model(ctx: Context) -> DetectorNet:
    """The backbone with its pretrained trunk; SPP-net keeps these conv layers fixed."""
    model = untrained_model(ctx, spp=True)
    initialise(model, ctx.weights()[0])
    return for_inference(model.to(device_for(ctx.cfg.model.device)), whole_images=True, dtype=ctx.cfg.model.precision)


def image_records(ctx: Context, split: str, ids: list[str]):
    """The records of ``ids``, in their order: ``(image_id, arrays, info)``, info holding the compute seconds
    (decoding and the trunk, no writing), the device and the trunk's stride and channels."""
    dataset = ctx.dataset(split)
    model = trunk_model(ctx)
    info = {"device": device_label(next(model.parameters()).device)}
    mirror = mirrored(ctx, split)

    def read(image_id: str):  # the host's part, run ahead under model.overlap_io: annotation and decoding
        tick = time.perf_counter()
        ann = dataset.annotation(image_id)
        return ann, load_image(ann), time.perf_counter() - tick

    def start(item):  # the image's trunk queued, and the maps' copies to the host
        image_id, (ann, image, decoding) = item
        tick = time.perf_counter() - decoding  # the compute seconds count decoding, as a detector's would
        factors = image_scales(ann.height, ann.width, ctx.cfg.spp.scales, ctx.cfg.spp.max_side)
        copies = {"conv": image_maps_later(model, image, factors)}
        if mirror:
            copies["mirror"] = image_maps_later(model, np.ascontiguousarray(image[:, ::-1]), factors)
        return image_id, factors, copies, time.perf_counter() - tick

    def finish(started):  # the wait for the maps
        image_id, factors, copies, seconds = started
        tick = time.perf_counter()
        record = {"factors": np.asarray(factors, np.float32)}
        for name, copy in copies.items():
            record.update({f"{name}{k}": m for k, m in copy.arrays().items()})
        return image_id, record, {"images": 1, "compute": seconds + time.perf_counter() - tick, **info}

    # Under model.overlap_io one image is in flight on the device, as in stage features.
    yield from one_ahead(images_ahead(ctx, read, ids), start, finish, ctx.cfg.model.overlap_io)


def compute(ctx: Context, split: str, work: Path) -> tuple[dict[str, Path], dict]:
    dataset = ctx.dataset(split)
    dataset.check(ctx.classes)
    spec = untrained_model(ctx, spp=True).spec  # the stride and channels pooling reads, without loading weights
    parts = work / "parts"
    mirror = mirrored(ctx, split)
    start = time.perf_counter()
    totals = write_image_records(
        ctx, sys.modules[__name__], split, parts, dataset.ids, f"convmaps {split}" + (" (and mirrored)" if mirror else "")
    )
    wall = time.perf_counter() - start
    index = work / INDEX
    outputs = records.write_index(parts, index, dataset.ids, KIND)
    outputs[INDEX] = index
    done = int(totals.get("images", 0))
    metrics = {
        "images": len(dataset),
        "images_computed": done,
        "scales": list(ctx.cfg.spp.scales),
        "mirrored": mirror,
        "device": totals.get("device"),
        "seconds_per_image": wall / done if done else None,
        "compute_seconds_per_image": totals["compute"] / done if done else None,  # decoding and the trunk, no writing
        "stride": spec.stride,
        "channels": spec.trunk_channels,
    }
    return outputs, metrics


def load(ctx: Context, split: str) -> records.RecordSet:
    return records.RecordSet(ctx.unit_dir(NAME, split) / INDEX, KIND, verify=upstream_check(ctx, NAME, split))


def image_record(rs: records.RecordSet, image_id: str, mirror: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
    """One image's float16 maps ``[H_k, W_k, C]`` (one per scale) and their resize factors ``[K]``;
    with ``mirror``, the maps of the horizontally flipped image (same factors)."""
    factors = rs.array(image_id, "factors", np.float32, 1)
    name = "mirror" if mirror else "conv"
    return [rs.array(image_id, f"{name}{k}", np.float16, 3) for k in range(len(factors))], factors


def describe(manifest: dict) -> str:
    m = manifest.get("metrics", {})
    size = cached_mb(manifest)
    rate = m.get("seconds_per_image")
    rate_text = f", {rate:.3f} s/image on {m.get('device')}" if rate else ""
    mirror = " and mirrored" if m.get("mirrored") else ""
    return f"{m.get('images')} images{mirror} at scales {m.get('scales')}, {size:.1f} MiB cached{rate_text}"
