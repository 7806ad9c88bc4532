"""Stage `features`: the fine-tuned CNN's features of every ground-truth box and proposal, cached in HDF5.

One record per image: ``boxes`` float32 ``[N, 4]`` (ground truth first), ``gt_classes``
int64 ``[N]`` (-1 for proposals), ``overlaps`` float32 ``[N, C]``, ``best_gt`` int64 ``[N]``
and one float16 ``[N, D]`` array per cached layer (R-CNN: pool5 for box regression and
fc7 for the SVMs, as R-CNN cached them). SPP-net does not cache its pooled pyramid
(``pool5`` here, up to 25,600-d): it is cheap to pool again from the cached conv maps
whenever a later stage needs it (:func:`layer_reader`). With ``features.bbox_rows: regression``
R-CNN caches box regression's layer only for the rows it trains on (trainval's, their indices
in int32 ``pool5_rows``) and computes any other row again when read: R-CNN's cache of every
box's pool5 took ~200 GB for VOC2007. Records stay in their parts, joined by ``index.json``;
a killed run resumes at the first image without a record.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from rcnn.errors import UserError
from rcnn.methods.rcnn_regions import warp_on_device
from rcnn.modeling.inference import for_inference
from rcnn.modeling.models import FEATURE_LAYERS, device_label
from rcnn.store import artifacts as store
from rcnn.store import records
from rcnn.training.regions import image_regions, regression_rows

from . import finetune, proposals
from .context import Context
from .image_records import images_ahead, one_ahead, write_image_records
from .methods import build_method, caches_regression_rows
from .provenance import cached_mb, upstream_check, upstream_digest

NAME = "features"
SCHEMA_VERSION = 2
INDEX = "index.json"
KIND = "features"
LAYERS = FEATURE_LAYERS
PART_SIZE = 16  # images per part file


def splits(ctx: Context) -> tuple[str, ...]:
    return build_method(ctx.cfg).feature_splits(ctx)


def cached_layers(ctx: Context) -> tuple[str, ...]:
    """The configured layers this stage writes: all of them for R-CNN; SPP-net pools ``pool5`` on demand."""
    bad = [layer for layer in ctx.cfg.features.layers if layer not in LAYERS]
    if bad:
        raise UserError(f"features.layers: unknown layer '{bad[0]}' (choose from {', '.join(LAYERS)})")
    layers = tuple(ctx.cfg.features.layers)
    return build_method(ctx.cfg).cached_layers(layers)


def params(ctx: Context) -> dict:
    method, f = build_method(ctx.cfg), ctx.cfg.features
    sparse = method.regression_layer(ctx.cfg)
    # Where a layer holds box regression's rows only, its row rule's threshold decides what is cached.
    rows = {"regression_layer": sparse, "bbox_min_overlap": ctx.cfg.bbox.min_overlap} if sparse else {}
    ranks = method.svd_ranks(ctx.cfg)
    svd = {"svd_fc6": ranks[0], "svd_fc7": ranks[1]} if any(r is not None for r in ranks) else {}
    return {
        "method": method.name,
        "layers": list(cached_layers(ctx)),
        "context_pad": ctx.cfg.finetune.context_pad,
        "warp": ctx.cfg.model.warp,
        "precision": ctx.cfg.model.precision,
        "classes": list(ctx.classes),
        "use_difficult": ctx.cfg.data.use_difficult,
        "bbox_rows": f.bbox_rows,
        **rows,
        **svd,
    }


def inputs(ctx: Context, split: str) -> dict[str, str]:
    trainval = ctx.cfg.data.trainval
    return {
        f"data/{split}": ctx.dataset(split).fingerprint,
        f"proposals/{split}": upstream_digest(ctx, "proposals", split),
        "finetune": upstream_digest(ctx, "finetune", trainval),
        **build_method(ctx.cfg).upstream_inputs(ctx, split),
    }


def layer_plan(ctx: Context, split: str) -> tuple[tuple[str, ...], str | None, bool, tuple[str, ...]]:
    """What this stage computes and caches for ``split``: ``(cached layers, the layer cached for box regression's
    rows only or None, whether this split caches those rows, the layers brought to the host)``."""
    cfg, method = ctx.cfg, build_method(ctx.cfg)
    layers = cached_layers(ctx)
    sparse = method.regression_layer(cfg)
    keep_rows = sparse is not None and caches_regression_rows(cfg, split)
    # Only what is written leaves the device: pool5 (R-CNN's, or SPP-net's pyramid) is computed on the way to
    # fc7 in any case, and where it is not cached a later stage computes the rows it reads again, timed apart.
    copied = tuple(k for k in layers if k != sparse or keep_rows)
    return layers, sparse, keep_rows, copied


def image_records(ctx: Context, split: str, ids: list[str]):
    """The records of ``ids``, in their order: ``(image_id, arrays, info)``, info holding the image's
    box count, compute seconds and device (what this process or a cluster worker runs). Under
    ``model.overlap_io`` a thread reads the next images (annotation, proposals, the decoded image or the
    conv maps) while the model computes this one."""
    cfg = ctx.cfg
    dataset = ctx.dataset(split)
    method = build_method(cfg)
    model = inference_model(ctx)
    device = device_label(next(model.parameters()).device)
    done_as = computed_as(ctx, model)
    layers, sparse, keep_rows, copied = layer_plan(ctx, split)
    with proposals.load(ctx, split) as props, method.region_features(ctx, split) as region_features:

        def read(image_id: str):  # the host's part, run ahead; nothing here touches the model
            ann = dataset.annotation(image_id)
            regions = image_regions(ann, props.array(image_id, "boxes", np.float32, 2), ctx.classes, cfg.data.use_difficult)
            chosen = None
            if keep_rows:  # chosen before the features, so that only these rows of the layer leave the device
                b, difficult = cfg.bbox, cfg.data.use_difficult
                reg = regression_rows(ann, regions.best_gt, regions.overlaps, ctx.classes, b.min_overlap, difficult)
                chosen = {sparse: reg.rows}
            return regions, chosen, region_features.load(ann)

        def record(image_id: str, regions, chosen, pending):
            feats, seconds = pending.result()
            for layer, values in feats.items():
                if not all_finite(values):
                    raise UserError(
                        f"{NAME}/{split}: the {layer} features of image {image_id} hold inf or nan (float16 holds up to "
                        "65504): the network's activations are out of range, as after a fine-tuning that diverged; lower "
                        f"finetune.lr and run `{ctx.command('run')}` again"
                    )
            arrays = {
                "boxes": regions.boxes,
                "gt_classes": regions.gt_classes,
                "overlaps": regions.overlaps,
                "best_gt": regions.best_gt,
                **{k: feats[k] for k in layers if k != sparse},
            }
            kept = 0
            if chosen is not None:
                arrays[sparse], arrays[f"{sparse}_rows"] = feats[sparse], chosen[sparse].astype(np.int32)
                kept = len(chosen[sparse])
            info = {"images": 1, "boxes": len(regions.boxes), "regression_rows": kept, "compute": seconds, "device": device}
            info.update(done_as)
            return image_id, arrays, info

        def start(item):
            image_id, (regions, chosen, loaded) = item
            return image_id, regions, chosen, region_features.start(model, loaded, regions.boxes, copied, chosen)

        # Under model.overlap_io one image is in flight: its work is queued on the device before the previous
        # image's is waited for, so a GPU computes while the host takes the results and prepares the next image.
        yield from one_ahead(images_ahead(ctx, read, ids), start, lambda started: record(*started), cfg.model.overlap_io)


def all_finite(values: np.ndarray) -> bool:
    """Whether every value is finite; for float16, from the exponent bits (all ones: inf or nan), five times faster."""
    values = np.asarray(values)
    if values.dtype == np.float16:
        return not ((values.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(values).all())


def compute(ctx: Context, split: str, work: Path) -> tuple[dict[str, Path], dict]:
    dataset = ctx.dataset(split)
    dataset.check(ctx.classes)
    layers = cached_layers(ctx)
    parts = work / "parts"
    start = time.perf_counter()
    totals = write_image_records(ctx, sys.modules[__name__], split, parts, dataset.ids, f"features {split}", postfix="boxes")
    wall = time.perf_counter() - start
    index = work / INDEX
    outputs = records.write_index(parts, index, dataset.ids, KIND)
    outputs[INDEX] = index
    done = int(totals.get("images", 0))
    size = sum(path.stat().st_size for path in outputs.values())
    sparse = build_method(ctx.cfg).regression_layer(ctx.cfg)
    metrics = {
        "images": len(dataset),
        "images_computed": done,
        "layers": list(layers),
        # box regression's layer, cached for this many rows only (features.bbox_rows: regression), or null
        "regression_layer": sparse,
        "regression_rows": int(totals.get("regression_rows", 0)) if sparse else None,
        # the whole cache, records and index, per image of the split, in MiB as every size here
        "mb_per_image": size / len(dataset) / 2**20 if len(dataset) else None,
        "device": totals.get("device"),
        # model.precision and (R-CNN) model.warp as resolved on that device: what rows computed again must match
        **{k: totals.get(k) for k in ("precision", "warp") if k in totals},
        "seconds_per_image": wall / done if done else None,
        # what a detector computes (decoding and warping, or pooling from the maps in memory, and the CNN), no I/O
        "compute_seconds_per_image": totals["compute"] / done if done else None,
        "boxes_per_s": totals["boxes"] / wall if done and wall > 0 else None,
    }
    return outputs, metrics


def load(ctx: Context, split: str) -> records.RecordSet:
    """Open the cached features of ``split``, each part checked against the manifest when first read."""
    return records.RecordSet(ctx.unit_dir(NAME, split) / INDEX, KIND, verify=upstream_check(ctx, NAME, split))


def layer_inputs(ctx: Context, split: str, layer: str) -> dict[str, str]:
    """Upstream digests a reader of ``layer`` depends on beyond the features (SPP-net's conv maps for pool5)."""
    return build_method(ctx.cfg).layer_inputs(ctx, split, layer)


def layer_reader(ctx: Context, split: str, layer: str):
    """A reader of ``layer``'s float32 ``[K, D]`` features of chosen windows of ``split``'s images: from the
    records when cached, else recomputed as the method says (SPP-net pools its pyramid again from the conv
    maps; R-CNN, under ``features.bbox_rows: regression``, warps the rows not cached through the fine-tuned
    model). A context manager with ``rows(rs, image_id, rows, boxes)`` and ``compute_seconds``."""
    method = build_method(ctx.cfg)
    if layer == method.regression_layer(ctx.cfg):
        check_recomputable(ctx, split)
    return method.layer_reader(ctx, split, layer, lambda: finetune.window_offset(ctx), lambda p: inference_model(ctx, p))


def inference_model(ctx: Context, precision: str | None = None):
    """The fine-tuned model, ready for inference as this stage runs it (in ``precision``; default
    ``model.precision``)."""
    model, _ = finetune.load(ctx)
    method = build_method(ctx.cfg)
    dtype = precision or ctx.cfg.model.precision
    return for_inference(model, whole_images=method.whole_images, dtype=dtype, svd=method.svd_ranks(ctx.cfg))


def computed_as(ctx: Context, model) -> dict[str, str]:
    """``model.precision`` and, for R-CNN, ``model.warp`` as they resolve for ``model``'s device (``auto``:
    float32 and OpenCV on a CPU, bfloat16 and torch on a GPU): what the features of this device are made with."""
    device = next(model.parameters()).device
    done = {"precision": str(next(model.parameters()).dtype).removeprefix("torch.")}
    if not build_method(ctx.cfg).whole_images:  # regions warped from the image: R-CNN
        done["warp"] = "torch" if warp_on_device(ctx.cfg.model.warp, device) else "opencv"
    return done


def check_recomputable(ctx: Context, split: str) -> None:
    """Refuse to compute rows again beside cached ones unless the cache came from today's fine-tuned model and
    settings: rows of two models mixed in one reading would be silently wrong."""
    upstream_digest(ctx, NAME, split)  # completed, of this configuration's data
    manifest = store.read_manifest(ctx.unit_dir(NAME, split))
    model = upstream_digest(ctx, "finetune", ctx.cfg.data.trainval)
    if manifest["inputs"].get("finetune") != model or manifest["params"] != params(ctx):
        raise UserError(
            f"features/{split} of pipeline '{ctx.cfg.name}' was computed with another fine-tuned model or other "
            f"settings, and rows not cached would be computed with today's; run `{ctx.command('features')}` first"
        )


def describe(manifest: dict) -> str:
    m = manifest.get("metrics", {})
    size = cached_mb(manifest)
    rate = m.get("seconds_per_image")
    rate_text = f", {rate:.2f} s/image on {m.get('device')}" if rate else ""
    per_image = m.get("mb_per_image")
    per_text = f" ({per_image:.2f} MiB/image)" if per_image is not None else ""
    sparse, kept = m.get("regression_layer"), m.get("regression_rows")
    rows_text = f", {sparse} of the {kept} box-regression rows only" if sparse and kept else ""
    rows_text = f", {sparse} not cached (computed again when read)" if sparse and not kept else rows_text
    layers = ", ".join(m.get("layers", []))
    return f"{m.get('images')} images, layers {layers}{rows_text}, {size:.1f} MiB cached{per_text}{rate_text}"
