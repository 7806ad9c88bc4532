"""Stage `train-bbox`: class-specific ridge box regressors from cached pool5 features (R-CNN appendix C)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rcnn.config import fingerprint_params
from rcnn.learners.bbox_regression import BBoxRegParams, BBoxRegressor, mean_norm_scale
from rcnn.learners.bbox_training import train_bbox_regressors
from rcnn.training.regions import regression_rows

from . import features
from .context import Context
from .provenance import upstream_check, upstream_digest

NAME = "train-bbox"
SCHEMA_VERSION = 1
MODEL = "bbox.npz"


def splits(ctx: Context) -> tuple[str, ...]:
    return (ctx.cfg.data.trainval,)


def params(ctx: Context) -> dict:
    return {**fingerprint_params(ctx.cfg.bbox), "classes": list(ctx.classes), "target_norm": ctx.cfg.svm.target_norm}


def inputs(ctx: Context, split: str) -> dict[str, str]:
    return {
        f"data/{split}": ctx.dataset(split).fingerprint,
        f"features/{split}": upstream_digest(ctx, "features", split),
        **features.layer_inputs(ctx, split, ctx.cfg.bbox.layer),
    }


def training_rows(ctx: Context, split: str) -> dict[str, np.ndarray]:
    """Rows overlapping a usable ground truth by at least ``min_overlap``, ground-truth rows included
    (:func:`rcnn.training.regions.regression_rows`, the rule stage `features` caches them by too).

    The features go straight into one float32 array, sized by a first pass over the small arrays: at
    SPP-net's 25,600-d pyramid that array is 3.3 GB on voc07-mini, and a list of per-image arrays joined
    and converted afterwards held it three times.
    """
    b = ctx.cfg.bbox
    dataset = ctx.dataset(split)
    chosen_rows, props, gts, classes, overlaps = [], [], [], [], []
    with features.load(ctx, split) as rs, features.layer_reader(ctx, split, b.layer) as layer:
        for image_id in rs.ids:
            ann = dataset.annotation(image_id)
            best_gt = rs.array(image_id, "best_gt", np.int64, 1)
            ov = rs.array(image_id, "overlaps", np.float32, 2)
            chosen = regression_rows(ann, best_gt, ov, ctx.classes, b.min_overlap, ctx.cfg.data.use_difficult)
            rows = chosen.rows
            if len(rows) == 0:
                continue
            chosen_rows.append((image_id, rows))
            props.append(rs.array(image_id, "boxes", np.float32, 2)[rows])
            gts.append(ann.boxes[best_gt[rows]])
            classes.append(chosen.classes)
            overlaps.append(chosen.overlaps)
        if not chosen_rows:
            return {}
        total, at, feats = sum(len(rows) for _, rows in chosen_rows), 0, None
        for (image_id, rows), boxes in zip(chosen_rows, props):
            x = layer.rows(rs, image_id, rows, boxes)
            if feats is None:
                feats = np.empty((total, x.shape[1]), np.float32)
            feats[at : at + len(x)] = x
            at += len(x)
    return {
        "features": feats,
        "proposals": np.concatenate(props),
        "gt_boxes": np.concatenate(gts),
        "classes": np.concatenate(classes).astype(np.int64),
        "overlaps": np.concatenate(overlaps),
    }


def compute(ctx: Context, split: str, work: Path) -> tuple[dict[str, Path], dict]:
    b = ctx.cfg.bbox
    rows = training_rows(ctx, split)
    bp = BBoxRegParams(min_overlap=b.min_overlap, ridge_lambda=b.ridge_lambda)
    if rows:
        scale = mean_norm_scale(rows["features"], ctx.cfg.svm.target_norm)
        if ctx.cluster is None:
            model = train_bbox_regressors(**rows, num_classes=len(ctx.classes), params=bp, feature_scale=scale)
        else:
            from rcnn.cluster.classes import fit_per_class

            fit = train_bbox_regressors
            model = fit_per_class(ctx.cluster, f"{NAME}/{split}", fit, rows, len(ctx.classes), params=bp, feature_scale=scale)
    else:
        with features.load(ctx, split) as rs, features.layer_reader(ctx, split, b.layer) as layer:
            dim = layer.rows(rs, rs.ids[0], np.zeros(0, np.int64), np.zeros((0, 4), np.float32)).shape[1]
        model = BBoxRegressor.identity(len(ctx.classes), dim, 1.0, bp)
    out = work / MODEL
    model.save(out)
    metrics = {
        "layer": b.layer,
        "examples": dict(zip(ctx.classes, model.num_examples.tolist())),
        "trained": dict(zip(ctx.classes, model.trained.tolist())),
    }
    return {MODEL: out}, metrics


def load(ctx: Context) -> BBoxRegressor:
    path = ctx.unit_dir(NAME, ctx.cfg.data.trainval) / MODEL
    upstream_check(ctx, NAME, ctx.cfg.data.trainval)(path)
    return BBoxRegressor.load(path)


def describe(manifest: dict) -> str:
    m = manifest.get("metrics", {})
    n = sum(m.get("examples", {}).values())
    trained = sum(m.get("trained", {}).values())
    return f"{trained}/{len(m.get('trained', {}))} classes regressed from {m.get('layer')}, {n} training boxes"
