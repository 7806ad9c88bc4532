"""Training R-CNN's class-specific ridge box regressors from cached features (CVPR 2014, appendix C)."""

from __future__ import annotations

import numpy as np

from rcnn.learners.bbox_regression import BBoxRegParams, BBoxRegressor, fit_target_whitening, select_examples, whiten_targets
from rcnn.structures.box_coding import encode
from rcnn.structures.boxes import as_boxes


def train_bbox_regressors(
    features: np.ndarray,
    proposals: np.ndarray,
    gt_boxes: np.ndarray,
    classes: np.ndarray,
    overlaps: np.ndarray,
    num_classes: int,
    params: BBoxRegParams,
    feature_scale: float,
) -> BBoxRegressor:
    """Fit one ridge box regressor per class, following R-CNN's rcnn_train_bbox_regressor.m.

    For class ``c`` the examples are the rows with ``classes == c`` and
    ``overlaps >= params.min_overlap``; their targets are
    ``encode(proposals, gt_boxes)``, centred and decorrelated with
    :func:`fit_target_whitening`, and ``sklearn.linear_model.Ridge(alpha=ridge_lambda,
    fit_intercept=True)`` is fit on ``feature_scale * features``. R-CNN appended a
    constant-1 feature and so penalised the bias as well; sklearn leaves the intercept
    unpenalised, which only matters when a class has few examples. Both minimise the
    summed (not averaged) squared error plus ``lambda * ||w||^2``, so R-CNN's lambda
    carries over unchanged.

    Ground-truth boxes as examples: R-CNN's feature cache held the ground-truth boxes
    alongside the proposals, with overlap 1, so they were trained on with zero targets,
    which pulls the regressor toward leaving good boxes alone. This function has no
    features of its own, so it does not add them: include the ground-truth rows in the
    inputs (``proposals == gt_boxes``, ``overlaps == 1``) to reproduce R-CNN.

    Memory: ``features`` is read, not copied whole; each class's rows are gathered
    into one float32 copy (the caller's float32 array stays float32), scaled in place and
    centred in place by sklearn (``copy_X=False``); the Cholesky solver adds a
    ``D x D`` (or ``n x n``, whichever is smaller) Gram matrix. For VOC with pool5
    (``D = 9216``) that is about 0.35 GB on top of the largest class's rows.

    Args:
        features: ``[N, D]`` raw features (float32 preferred), one row per proposal.
        proposals: ``[N, 4]`` in ``(x1, y1, x2, y2)``, continuous pixel coordinates.
        gt_boxes: ``[N, 4]`` the best-overlapping ground truth of each row, same convention.
        classes: int ``[N]`` class of that ground truth in ``[0, num_classes)``, or -1 for
            rows not to be used.
        overlaps: ``[N]`` IoU of each proposal with its ``gt_boxes`` row.
        num_classes: number of classes ``C``.
        params: :class:`BBoxRegParams`.
        feature_scale: positive scalar applied to the features, at training and at
            prediction (see :func:`mean_norm_scale`).

    Returns:
        A :class:`BBoxRegressor`; classes with fewer than ``params.min_examples``
        examples keep the identity (``trained[c] == False``, zero deltas).
    """
    # Imported here: sklearn's import is slow and only training needs it.
    from sklearn.linear_model import Ridge

    features = np.asarray(features)
    if features.dtype not in (np.float32, np.float64):
        features = features.astype(np.float32)
    if features.ndim != 2:
        raise ValueError(f"features must have shape [N, D], got {features.shape}")
    n, dim = features.shape
    proposals = as_boxes(proposals)
    gt_boxes = as_boxes(gt_boxes)
    classes = np.asarray(classes).reshape(-1)
    overlaps = np.asarray(overlaps, dtype=np.float64).reshape(-1)
    if classes.dtype.kind not in "iu":
        raise ValueError(f"classes must be integers, got dtype {classes.dtype}")
    for name, arr in (("proposals", proposals), ("gt_boxes", gt_boxes), ("classes", classes), ("overlaps", overlaps)):
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} rows but features has {n}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if n and (classes.min() < -1 or classes.max() >= num_classes):
        raise ValueError(f"classes must lie in [-1, {num_classes}), got {classes.min()}..{classes.max()}")

    model = BBoxRegressor.identity(num_classes, dim, feature_scale, params)
    coef = np.array(model.coef)
    intercept = np.array(model.intercept)
    target_mean = np.array(model.target_mean)
    target_transform = np.array(model.target_transform)
    target_inverse = np.array(model.target_inverse)
    num_examples = np.zeros(num_classes, np.int64)
    trained = np.zeros(num_classes, bool)

    for c in range(num_classes):
        rows = select_examples(classes, overlaps, c, params.min_overlap)
        num_examples[c] = len(rows)
        if len(rows) < max(params.min_examples, 1):
            continue
        targets = encode(proposals[rows], gt_boxes[rows])
        mean, transform, inverse = fit_target_whitening(targets)
        y = whiten_targets(targets, mean, transform).astype(features.dtype)
        x = features[rows]  # fancy indexing: already a private copy, safe to modify
        x *= features.dtype.type(model.feature_scale)
        ridge = Ridge(alpha=float(params.ridge_lambda), fit_intercept=True, copy_X=False)
        ridge.fit(x, y)
        del x
        coef[c] = ridge.coef_
        intercept[c] = ridge.intercept_
        target_mean[c], target_transform[c], target_inverse[c] = mean, transform, inverse
        trained[c] = True

    return BBoxRegressor(
        coef=coef,
        intercept=intercept,
        target_mean=target_mean,
        target_transform=target_transform,
        target_inverse=target_inverse,
        num_examples=num_examples,
        trained=trained,
        feature_scale=feature_scale,
        params=params,
    )
