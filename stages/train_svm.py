"""Stage `train-svm`: one linear SVM per class on cached features, with R-CNN's hard-negative mining."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from rcnn.config import fingerprint_params, section_kwargs
from rcnn.learners.svm import ImageFeatures, SVMModel, SVMParams, thin_negatives, train_class_svms
from rcnn.modeling.inference import to_float32
from rcnn.store import records

from . import features
from .context import Context
from .provenance import upstream_check, upstream_digest
from .runner import progress_bar

NAME = "train-svm"
SCHEMA_VERSION = 1
MODEL = "svm.npz"
HISTORY = "svm.history.json"


def splits(ctx: Context) -> tuple[str, ...]:
    return (ctx.cfg.data.trainval,)


def params(ctx: Context) -> dict:
    return {**fingerprint_params(ctx.cfg.svm), "classes": list(ctx.classes)}


def inputs(ctx: Context, split: str) -> dict[str, str]:
    return {f"features/{split}": upstream_digest(ctx, "features", split)}


def svm_params(ctx: Context) -> SVMParams:
    return SVMParams(**section_kwargs(SVMParams, ctx.cfg.svm))


def read_images(
    index: Path, layer: str, verify: records.Verify | None = None, kept: Mapping[str, np.ndarray] | None = None
) -> Iterator[ImageFeatures]:
    """The SVM's view of a feature cache, one image at a time (picklable for worker processes).

    ``kept`` gives each image's rows to read (SPP-net's thinning of negatives, as :func:`thinned_rows`
    computes it once); without it every row is read. ``verify`` vets each file before it is read (see
    :class:`rcnn.store.records.RecordSet`).
    """
    with records.RecordSet(index, features.KIND, verify=verify) as rs:
        for image_id in rs.ids:
            gt_classes = rs.array(image_id, "gt_classes", np.int64, 1)
            rows = slice(None) if kept is None else kept[image_id]
            yield ImageFeatures(
                features=to_float32(rs.array(image_id, layer, np.float16, 2)[rows]),
                gt_classes=gt_classes[rows],
                overlaps=rs.array(image_id, "overlaps", np.float32, 2)[rows],
            )


def thinned_rows(ctx: Context, index: Path, max_overlap: float, verify: records.Verify | None) -> dict[str, np.ndarray]:
    """Each image's rows after SPP-net's thinning of negatives, computed once for every pass over the images
    (the first pass and each mining worker's): at voc07-mini's full size the NMS behind it takes 9 ms per image."""
    with records.RecordSet(index, features.KIND, verify=verify) as rs:
        bar = progress_bar(ctx, len(rs.ids), "thinning negatives")
        kept = {}
        for image_id in rs.ids:
            boxes, gt_classes = rs.array(image_id, "boxes", np.float32, 2), rs.array(image_id, "gt_classes", np.int64, 1)
            kept[image_id] = thin_negatives(boxes, gt_classes, max_overlap).astype(np.int32)
            bar.update(1)
        bar.close()
    return kept


def compute(ctx: Context, split: str, work: Path) -> tuple[dict[str, Path], dict]:
    layer = ctx.cfg.svm.layer
    index = ctx.unit_dir(features.NAME, split) / features.INDEX
    verify = upstream_check(ctx, features.NAME, split)
    thin = ctx.cfg.svm.neg_max_mutual_overlap
    kept = thinned_rows(ctx, index, thin, verify) if thin is not None else None
    source = functools.partial(read_images, index, layer, verify, kept)
    if ctx.cluster is None:
        model = train_class_svms(
            source, len(ctx.classes), svm_params(ctx), n_jobs=ctx.cfg.svm.n_jobs, progress=ctx.progress, class_names=ctx.classes
        )
    else:
        from rcnn.cluster.classes import joblib_on_cluster

        # One mining task per class, each reading the features from the shared store.
        ctx.cluster.note(f"{NAME}/{split}", len(ctx.classes), 0)
        with joblib_on_cluster(ctx.cluster):
            model = train_class_svms(source, len(ctx.classes), svm_params(ctx), n_jobs=len(ctx.classes), class_names=ctx.classes)
    out = work / MODEL
    model.save(out)
    per_class = {}
    for name, hist in zip(ctx.classes, model.history):
        last = hist[-1] if hist else {}
        per_class[name] = {"retrains": len(hist), **{k: v for k, v in last.items() if isinstance(v, (int, float))}}
    metrics = {"layer": layer, "feature_scale": model.feature_scale, "per_class": per_class}
    return {MODEL: out, HISTORY: SVMModel.history_path(out)}, metrics


def load(ctx: Context) -> SVMModel:
    split = ctx.cfg.data.trainval
    path, verify = ctx.unit_dir(NAME, split) / MODEL, upstream_check(ctx, NAME, split)
    verify(path)
    verify(SVMModel.history_path(path))
    return SVMModel.load(path)


def describe(manifest: dict) -> str:
    m = manifest.get("metrics", {})
    retrains = sum(c.get("retrains", 0) for c in m.get("per_class", {}).values())
    return f"{len(m.get('per_class', {}))} class SVMs on {m.get('layer')} ({retrains} retrains while mining hard negatives)"
