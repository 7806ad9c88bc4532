"""Ridge box regression: synthetic linear problem, R-CNN's target whitening, example selection, files."""

from __future__ import annotations

import numpy as np
import pytest

from rcnn.errors import UserError
from rcnn.learners.bbox_regression import (
    BBoxRegParams,
    BBoxRegressor,
    fit_target_whitening,
    mean_norm_scale,
    select_examples,
    unwhiten_targets,
    whiten_targets,
)
from rcnn.learners.bbox_training import train_bbox_regressors
from rcnn.structures.box_coding import decode, encode
from rcnn.structures.boxes import box_iou

D = 24


def paired_iou(a, b) -> np.ndarray:
    return np.diag(box_iou(a, b)).astype(np.float64)


def synthetic(rng, n, weights, noise=0.01):
    """Proposals whose true deltas to their ground truth are ``features @ weights + noise``."""
    features = rng.normal(0, 1, size=(n, D)).astype(np.float32)
    deltas = features.astype(np.float64) @ weights + rng.normal(0, noise, size=(n, 4))
    xy = rng.uniform(0, 300, size=(n, 2))
    wh = rng.uniform(20, 120, size=(n, 2))
    proposals = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    gt = decode(proposals, deltas)
    return features, proposals, gt, paired_iou(proposals, gt).astype(np.float32)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    # Small deltas (a few percent of the box per feature) keep most IoUs above 0.6.
    weights = rng.normal(0, 0.03, size=(D, 4))
    weights[:, 0] += 0.01  # correlated targets, so decorrelation has work to do
    train = synthetic(rng, 3000, weights)
    test = synthetic(rng, 500, weights)
    return weights, train, test


def test_regressor_moves_proposals_toward_ground_truth(problem):
    _, (x, p, g, ov), (xt, pt, gt, ovt) = problem
    classes = np.zeros(len(x), np.int64)
    scale = mean_norm_scale(x)
    model = train_bbox_regressors(x, p, g, classes, ov, 1, BBoxRegParams(), scale)
    assert model.trained.tolist() == [True]
    assert model.num_examples[0] == (ov >= 0.6).sum() > 1000
    refined = model.predict(xt, pt, 0)
    assert refined.dtype == np.float32 and refined.shape == pt.shape
    before = ovt.mean()
    after = paired_iou(refined, gt).mean()
    assert after > before + 0.1 and after > 0.9, (before, after)


def test_matches_closed_form_ridge(problem):
    # Independent oracle: ridge with an unpenalised intercept, solved in float64 numpy.
    _, (x, p, g, ov), (xt, _, _, _) = problem
    params = BBoxRegParams(min_overlap=0.6, ridge_lambda=50.0)
    scale = 0.7
    model = train_bbox_regressors(x, p, g, np.zeros(len(x), np.int64), ov, 1, params, scale)
    rows = ov >= 0.6
    xs = x[rows].astype(np.float64) * scale
    mu_t, t, t_inv = fit_target_whitening(encode(p[rows], g[rows]))
    y = whiten_targets(encode(p[rows], g[rows]), mu_t, t)
    x_mean, y_mean = xs.mean(0), y.mean(0)
    w = np.linalg.solve((xs - x_mean).T @ (xs - x_mean) + 50.0 * np.eye(D), (xs - x_mean).T @ (y - y_mean))
    expected = unwhiten_targets((xt * scale - x_mean) @ w + y_mean, mu_t, t_inv)
    np.testing.assert_allclose(model.predict_deltas(xt, 0), expected, atol=2e-4)


def test_identity_classes(problem):
    _, (x, p, g, ov), (xt, pt, _, _) = problem
    n = len(x)
    classes = np.full(n, -1, np.int64)
    classes[:1000] = 0
    # Class 1: ground-truth rows only (proposal == gt, overlap 1), as R-CNN's cache held them.
    classes[1000:1500] = 1
    g = g.copy()
    g[1000:1500] = p[1000:1500]
    ov = ov.copy()
    ov[1000:1500] = 1.0
    # Class 2: three examples, below min_examples. Class 3: none at all.
    classes[1500:1503] = 2
    ov[1500:1503] = 0.9
    model = train_bbox_regressors(x, p, g, classes, ov, 4, BBoxRegParams(), 1.0)
    assert model.trained.tolist() == [True, True, False, False]
    assert model.num_examples.tolist() == [int((ov[:1000] >= 0.6).sum()), 500, 3, 0]
    for c in (1, 2, 3):
        np.testing.assert_allclose(model.predict_deltas(xt, c), 0, atol=1e-6)
    np.testing.assert_allclose(model.predict(xt, pt, 2), pt)
    assert np.abs(model.predict_deltas(xt, 0)).mean() > 0.01


def test_per_row_labels_match_per_class_calls(problem):
    _, (x, p, g, ov), (xt, pt, _, _) = problem
    classes = np.arange(len(x)) % 3
    model = train_bbox_regressors(x, p, g, classes, ov, 3, BBoxRegParams(), 0.5)
    labels = np.arange(len(xt)) % 3
    by_row = model.predict(xt, pt, labels)
    for c in range(3):
        np.testing.assert_array_equal(by_row[labels == c], model.predict(xt[labels == c], pt[labels == c], c))
    with pytest.raises(ValueError, match="class indices"):
        model.predict(xt, pt, 3)
    with pytest.raises(ValueError, match=r"\[N, 24\]"):
        model.predict(xt[:, :5], pt, 0)


def test_whitening_round_trips_and_decorrelates():
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(4, 4))
    targets = rng.normal(size=(5000, 4)) @ mix + rng.normal(size=4)
    mean, t, t_inv = fit_target_whitening(targets)
    np.testing.assert_allclose(t @ t_inv, np.eye(4), atol=1e-10)
    white = whiten_targets(targets, mean, t)
    np.testing.assert_allclose(white.mean(0), 0, atol=1e-10)
    # Covariance becomes D / (D + 0.001): the identity up to R-CNN's eigenvalue padding.
    np.testing.assert_allclose(np.cov(white.T, bias=True), np.eye(4), atol=1e-2)
    np.testing.assert_allclose(unwhiten_targets(white, mean, t_inv), targets, atol=1e-10)


def test_whitening_of_constant_targets_is_finite():
    mean, t, t_inv = fit_target_whitening(np.tile([0.1, -0.2, 0.3, 0.0], (10, 1)))
    assert np.isfinite(t).all() and np.isfinite(t_inv).all()
    np.testing.assert_allclose(t, np.eye(4) / np.sqrt(0.001), atol=1e-9)


def test_select_examples_honours_class_and_min_overlap():
    classes = np.array([0, 0, 1, 0, -1, 0, 1])
    overlaps = np.array([0.9, 0.59, 0.95, 0.6, 0.99, 0.7, 0.3], np.float32)
    assert select_examples(classes, overlaps, 0, 0.6).tolist() == [0, 3, 5]
    assert select_examples(classes, overlaps, 1, 0.6).tolist() == [2]
    assert select_examples(classes, overlaps, 0, 0.8).tolist() == [0]


def test_training_ignores_rows_below_min_overlap(problem):
    # Rows below the threshold carry garbage targets; they must not reach the fit.
    _, (x, p, g, ov), (xt, _, _, _) = problem
    keep = ov >= 0.6
    clean = train_bbox_regressors(x[keep], p[keep], g[keep], np.zeros(keep.sum(), np.int64), ov[keep], 1, BBoxRegParams(), 1.0)
    g_bad = g.copy()
    g_bad[~keep] = g[~keep] + np.float32(500)
    noisy = train_bbox_regressors(x, p, g_bad, np.zeros(len(x), np.int64), ov, 1, BBoxRegParams(), 1.0)
    np.testing.assert_allclose(noisy.predict_deltas(xt, 0), clean.predict_deltas(xt, 0), atol=1e-5)


def test_mean_norm_scale():
    x = np.array([[3, 4], [0, 10]], np.float32)  # norms 5 and 10
    assert mean_norm_scale(x) == pytest.approx(20 / 7.5)


def test_save_load_round_trip(problem, tmp_path):
    _, (x, p, g, ov), (xt, pt, _, _) = problem
    classes = np.where(np.arange(len(x)) < 2000, 0, -1)
    model = train_bbox_regressors(x, p, g, classes, ov, 2, BBoxRegParams(min_overlap=0.7, ridge_lambda=10.0), 0.25)
    path = tmp_path / "bbox_reg.npz"
    model.save(path)
    loaded = BBoxRegressor.load(path)
    assert loaded.params == model.params and loaded.feature_scale == model.feature_scale
    for name in ("coef", "intercept", "target_mean", "target_transform", "target_inverse", "num_examples", "trained"):
        a, b = getattr(model, name), getattr(loaded, name)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.predict(xt, pt, 0), model.predict(xt, pt, 0))
    assert not (tmp_path / "bbox_reg.npz.tmp").exists()


def test_model_arrays_are_read_only():
    model = BBoxRegressor.identity(2, 3)
    with pytest.raises(ValueError):
        model.coef[0, 0, 0] = 1.0


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.npz"
    BBoxRegressor.identity(3, 5, feature_scale=2.0).save(path)
    with np.load(path, allow_pickle=False) as npz:
        return path, {k: npz[k] for k in npz.files}


@pytest.mark.parametrize(
    "tamper, needle",
    [
        (lambda d: d.update(coef=d["coef"][0]), "coef must have shape [C, 4, D]"),
        (lambda d: d.update(intercept=d["intercept"][:2]), "intercept"),
        (lambda d: d.update(target_transform=d["target_transform"].astype(np.float32)), "target_transform"),
        (lambda d: d.update(trained=d["trained"].astype(np.int64)), "trained"),
        (lambda d: d.pop("target_inverse"), "missing arrays: target_inverse"),
        (lambda d: d.update(format=np.array("something.else")), "not a rcnn.bbox_regressor"),
        (lambda d: d.update(format_version=np.array(99, np.int64)), "version"),
        (lambda d: d.update(feature_scale=np.array(-1.0)), "feature_scale"),
        (lambda d: d.update(target_mean=np.full((3, 4), np.nan)), "non-finite"),
        (lambda d: d.update(extra=np.zeros(3)), "unexpected arrays: extra"),
    ],
)
def test_tampered_file_rejected(saved, tmp_path, tamper, needle):
    path, data = saved
    tamper(data)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **data)
    with pytest.raises(UserError, match="corrupt box regressor") as e:
        BBoxRegressor.load(bad)
    assert needle in str(e.value)


def test_load_checks_expected_sizes(saved):
    path, _ = saved
    assert BBoxRegressor.load(path, num_classes=3, feature_dim=5).feature_dim == 5
    with pytest.raises(UserError, match="feature_dim 5, expected 4096"):
        BBoxRegressor.load(path, feature_dim=4096)
    with pytest.raises(UserError, match="3 classes, expected 20"):
        BBoxRegressor.load(path, num_classes=20)


def test_unreadable_files_rejected(saved, tmp_path):
    path, data = saved
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:200])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{**data, "coef": np.array([{"evil": 1}], dtype=object)})
    for bad in (truncated, garbage, pickled):
        with pytest.raises(UserError, match="box regressor"):
            BBoxRegressor.load(bad)
    with pytest.raises(UserError, match="not found"):
        BBoxRegressor.load(tmp_path / "absent.npz")


def test_training_input_validation():
    x = np.zeros((4, 3), np.float32)
    boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (4, 1))
    ok = dict(features=x, proposals=boxes, gt_boxes=boxes, classes=np.zeros(4, np.int64), overlaps=np.ones(4, np.float32))
    with pytest.raises(ValueError, match="classes must lie"):
        train_bbox_regressors(
            **{**ok, "classes": np.array([0, 0, 2, 0])}, num_classes=2, params=BBoxRegParams(), feature_scale=1.0
        )
    with pytest.raises(ValueError, match="overlaps has 3 rows"):
        train_bbox_regressors(**{**ok, "overlaps": np.ones(3)}, num_classes=2, params=BBoxRegParams(), feature_scale=1.0)
    with pytest.raises(ValueError, match="feature_scale"):
        train_bbox_regressors(**ok, num_classes=2, params=BBoxRegParams(), feature_scale=0.0)
