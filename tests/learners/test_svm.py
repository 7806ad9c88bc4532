"""SVM training with hard-negative mining, checked against plain scikit-learn fits and hand-built cases."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.svm import LinearSVC

from rcnn.errors import UserError
from rcnn.learners.svm import (
    LOKY_RECYCLED,
    ImageFeatures,
    SVMModel,
    SVMParams,
    feature_scale,
    mine_hard_negatives,
    train_class_svms,
    train_plain_svm,
)

EXHAUSTIVE = SVMParams(hard_threshold=-np.inf, evict_threshold=-np.inf, retrain_limit=10**9)


def make_images(seed=0, n_images=10, n_props=40, dim=16, num_classes=3) -> list[ImageFeatures]:
    """Gaussian features around one mean per class; a proposal's feature moves towards its class's mean with its IoU."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim)) * 2.0
    images = []
    for _ in range(n_images):
        gt = rng.integers(0, num_classes, size=rng.integers(1, 3))
        prop_cls = rng.integers(0, num_classes, size=n_props)
        iou = rng.uniform(0, 1, size=n_props)
        overlaps = np.zeros((len(gt) + n_props, num_classes), np.float32)
        overlaps[np.arange(len(gt)), gt] = 1.0
        overlaps[len(gt) + np.arange(n_props), prop_cls] = iou
        features = np.concatenate([means[gt], iou[:, None] * means[prop_cls]]) + rng.normal(size=(len(overlaps), dim))
        gt_classes = np.concatenate([gt, -np.ones(n_props, np.int64)])
        images.append(ImageFeatures(features.astype(np.float32), gt_classes, overlaps))
    return images


def positives_of(images, c, scale=1.0):
    return np.concatenate([im.features[im.gt_classes == c] for im in images]) * np.float32(scale)


def negatives_of(images, c, scale=1.0, neg_overlap=0.3):
    return np.concatenate([im.features[(im.overlaps[:, c] < neg_overlap) & (im.gt_classes != c)] for im in images]) * np.float32(
        scale
    )


def reference_fit(X_pos, X_neg) -> LinearSVC:
    """liblinear -s 3 -c 0.001 -w1 2 -B 10 (rcnn_train.m), with liblinear's default -e 0.1."""
    weights = {1: 2.0, -1: 1.0}
    svc = LinearSVC(C=0.001, loss="hinge", dual=True, intercept_scaling=10.0, class_weight=weights, tol=0.1, random_state=0)
    return svc.fit(np.concatenate([X_pos, X_neg]), np.r_[np.ones(len(X_pos)), -np.ones(len(X_neg))])


def objective(w, b, X_pos, X_neg, p: SVMParams) -> float:
    """liblinear's primal objective for -s 3 -w1 -B: hinge losses plus 0.5 |(w, b / bias_mult)|^2."""
    w, b = w.astype(np.float64), float(b)
    pos = p.C * p.pos_loss_weight * np.maximum(0, 1 - (X_pos @ w + b)).sum()
    neg = p.C * np.maximum(0, 1 + (X_neg @ w + b)).sum()
    return pos + neg + 0.5 * w @ w + 0.5 * (b / p.bias_mult) ** 2


def record_retrains():
    events = []

    def on_retrain(cls, image, w, b, keys, scores):
        events.append(dict(cls=cls, image=image, w=w.copy(), b=b, keys=keys, scores=scores.copy()))

    return events, on_retrain


def test_plain_svm_is_liblinear_with_rcnn_options():
    images = make_images()
    X_pos, X_neg = positives_of(images, 0), negatives_of(images, 0)
    w, b = train_plain_svm(X_pos, X_neg)
    ref = reference_fit(X_pos, X_neg)
    np.testing.assert_allclose(w, ref.coef_[0], atol=1e-6)
    # scikit-learn's intercept_ already includes the bias multiplier: it is 10 x the appended feature's weight.
    assert b == pytest.approx(ref.intercept_[0], abs=1e-5)
    assert ref.intercept_scaling == 10.0


def test_mining_without_thresholds_equals_one_plain_fit():
    images = make_images()
    model = train_class_svms(images, 3, EXHAUSTIVE, scale=1.0)
    for c in range(3):
        X_pos, X_neg = positives_of(images, c), negatives_of(images, c)
        ref = reference_fit(X_pos, X_neg)
        np.testing.assert_allclose(model.weights[:, c], ref.coef_[0], atol=1e-6)
        assert model.biases[c] == pytest.approx(ref.intercept_[0], abs=1e-5)
        assert [h["image"] for h in model.history[c]] == [0, 9]
        assert model.history[c][-1]["num_neg"] == len(X_neg)


def test_mined_objective_is_close_to_plain_fit_and_cache_follows_the_thresholds():
    images = make_images(seed=1, n_images=12, n_props=60)
    params = SVMParams(retrain_limit=40, tol=1e-4, max_iter=100_000)
    scale = feature_scale([im.features for im in images])
    events, on_retrain = record_retrains()
    svms = mine_hard_negatives(images, {c: positives_of(images, c, scale) for c in range(3)}, params, scale, on_retrain)
    features = [im.features * np.float32(scale) for im in images]
    for c in range(3):
        X_pos, X_neg = positives_of(images, c, scale), negatives_of(images, c, scale)
        w, b = train_plain_svm(X_pos, X_neg, params)
        mined, plain = objective(svms[c].weight, svms[c].bias, X_pos, X_neg, params), objective(w, b, X_pos, X_neg, params)
        assert 0.999 * plain <= mined <= 1.05 * plain
        mine = [e for e in events if e["cls"] == c]
        assert len(mine) >= 3, "the retrain limit should trigger retrains between the first and last image"
        assert sum(h["num_evicted"] for h in svms[c].history) > 0
        # Evicted negatives scored below evict_threshold at eviction; the others stayed.
        for before, after in zip(mine, mine[1:] + [None]):
            kept = {tuple(k) for k, s in zip(before["keys"], before["scores"]) if s >= params.evict_threshold}
            later = {tuple(k) for k in (after["keys"] if after else svms[c].cache_keys)}
            assert {k for k in later if k[0] <= before["image"]} == kept
        # Negatives added after the first image scored above hard_threshold under the model in force then.
        for image, row in svms[c].cache_keys:
            if image > 0:
                model = [e for e in mine if e["image"] < image][-1]
                assert features[image][row] @ model["w"] + np.float32(model["b"]) > params.hard_threshold


def hand_built_image(n_neg: int) -> ImageFeatures:
    """One ground truth of class 0 and ``n_neg`` background proposals (overlap 0)."""
    rng = np.random.default_rng(n_neg)
    features = np.concatenate([np.full((1, 4), 3.0), rng.normal(size=(n_neg, 4))]).astype(np.float32)
    return ImageFeatures(features, np.r_[0, -np.ones(n_neg, np.int64)], np.r_[[[1.0]], np.zeros((n_neg, 1))])


@pytest.mark.parametrize(("limit", "retrains"), [(4, [0, 1, 2, 3]), (7, [0, 2, 3]), (100, [0, 3])])
def test_retrains_after_first_image_over_the_limit_and_after_last_image(limit, retrains):
    images = [hand_built_image(n) for n in (5, 5, 5, 3)]
    params = dataclasses.replace(EXHAUSTIVE, retrain_limit=limit)
    events, on_retrain = record_retrains()
    svms = mine_hard_negatives(images, {0: images[0].features[:1]}, params, on_retrain=on_retrain)
    assert [e["image"] for e in events] == retrains
    np.testing.assert_array_equal(events[0]["keys"], [[0, r] for r in range(1, 6)])
    assert [h["num_neg"] for h in svms[0].history] == [5 * (i + 1) if i < 3 else 18 for i in retrains]


def test_first_image_takes_all_its_negatives_under_default_thresholds():
    images = make_images(seed=2)
    events, on_retrain = record_retrains()
    mine_hard_negatives(images, {c: positives_of(images, c) for c in range(3)}, SVMParams(), on_retrain=on_retrain)
    first = images[0]
    for c in range(3):
        expected = np.flatnonzero((first.overlaps[:, c] < 0.3) & (first.gt_classes != c))
        event = next(e for e in events if e["cls"] == c)
        assert event["image"] == 0
        np.testing.assert_array_equal(event["keys"], np.stack([np.zeros_like(expected), expected], axis=1))


def test_negatives_are_rows_below_the_overlap_threshold_including_other_classes_ground_truth():
    overlaps = np.array([[1.0, 0.1], [0.2, 1.0], [0.29, 0.5], [0.3, 0.0], [0.5, 0.1], [0.0, 0.0]], np.float32)
    gt_classes = np.array([0, 1, -1, -1, -1, 1])  # the last row is a class-1 ground truth with a (bad) zero overlap
    image = ImageFeatures(np.random.default_rng(0).normal(size=(6, 4)), gt_classes, overlaps)
    events, on_retrain = record_retrains()
    positives = {c: image.features[gt_classes == c] for c in (0, 1)}
    mine_hard_negatives([image], positives, EXHAUSTIVE, on_retrain=on_retrain)
    keys = {e["cls"]: e["keys"][:, 1].tolist() for e in events if e["image"] == 0}
    assert keys == {0: [1, 2, 5], 1: [0, 3, 4]}


def test_feature_scale_gives_the_target_mean_norm():
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32) * 7
    s = feature_scale(x)
    assert np.linalg.norm(x * s, axis=1).mean() == pytest.approx(20.0, rel=1e-5)
    assert feature_scale([x[:100], x[100:]], target_norm=5.0) == pytest.approx(s / 4, rel=1e-6)
    model = train_class_svms(make_images(), 3)
    assert model.feature_scale == pytest.approx(feature_scale([im.features for im in make_images()]), rel=1e-6)


def test_result_does_not_depend_on_n_jobs_or_the_kind_of_source():
    images = make_images(seed=3)
    params = SVMParams(retrain_limit=30)
    one = train_class_svms(images, 3, params, n_jobs=1)
    two = train_class_svms(lambda: iter(images), 3, params, n_jobs=2)
    np.testing.assert_array_equal(one.weights, two.weights)
    np.testing.assert_array_equal(one.biases, two.biases)
    assert one.history == two.history
    with pytest.raises(TypeError, match="one-shot"):
        train_class_svms(iter(images), 3, params)


def test_loky_replacing_a_grown_worker_is_not_reported_as_a_leak(monkeypatch):
    """loky warns from its manager thread when it replaces a worker past 300 MB (as mining's are on real data);
    that warning is kept from the user, any other still reaches them, and the SVMs are the same."""
    import threading
    import warnings

    import joblib

    real = joblib.Parallel

    class Recycling(real):
        def __call__(self, calls):
            for text in (LOKY_RECYCLED + ". This can be caused by a too short worker timeout or by a memory leak.", "other"):
                thread = threading.Thread(target=warnings.warn, args=(text, UserWarning))
                thread.start()
                thread.join()
            return real(n_jobs=1)(calls)

    images = make_images(seed=5)
    expected = train_class_svms(images, 3, SVMParams(), n_jobs=1)
    monkeypatch.setattr(joblib, "Parallel", Recycling)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = train_class_svms(images, 3, SVMParams(), n_jobs=2)
    assert [str(w.message) for w in caught] == ["other"]
    np.testing.assert_array_equal(got.weights, expected.weights)


def test_scores_apply_the_feature_scale():
    images = make_images()
    model = train_class_svms(images, 3)
    x = images[0].features
    np.testing.assert_allclose(model.scores(x), (x * model.feature_scale) @ model.weights + model.biases, rtol=1e-5, atol=1e-5)


def test_class_without_positives_is_a_user_error():
    images = [dataclasses.replace(im, gt_classes=np.where(im.gt_classes == 2, -1, im.gt_classes)) for im in make_images()]
    with pytest.raises(UserError, match=r"^class 2: no ground-truth box"):
        train_class_svms(images, 3)
    # Named, not numbered, when the names are known.
    with pytest.raises(UserError, match=r"^cow: no ground-truth box"):
        train_class_svms(images, 3, class_names=("cat", "dog", "cow"))


def test_save_load_round_trip_and_rejects_damaged_files(tmp_path):
    model = train_class_svms(make_images(), 3)
    path = tmp_path / "svm.npz"
    model.save(path)
    loaded = SVMModel.load(path)
    np.testing.assert_array_equal(loaded.weights, model.weights)
    np.testing.assert_array_equal(loaded.biases, model.biases)
    assert loaded.feature_scale == model.feature_scale
    assert loaded.history == model.history

    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError):
        SVMModel.load(path)
    for bad in (
        dict(biases=model.biases[:2]),
        dict(weights=model.weights.astype(np.float64)),
        dict(weights=model.weights[0]),
        dict(feature_scale=np.array([1.0, 2.0])),
    ):
        arrays = dict(format=np.array("rcnn.svm/1"), weights=model.weights, biases=model.biases, feature_scale=np.array(1.0))
        np.savez(path, **{**arrays, **bad})
        with pytest.raises(UserError):
            SVMModel.load(path)
    SVMModel.history_path(path).write_text("[[], []]")
    np.savez(path, format=np.array("rcnn.svm/1"), weights=model.weights, biases=model.biases, feature_scale=np.array(1.0))
    with pytest.raises(UserError, match="history"):
        SVMModel.load(path)
    with pytest.raises(UserError, match="missing"):
        SVMModel.load(tmp_path / "nope.npz")


def test_thin_negatives_hand_case():
    from rcnn.learners.svm import thin_negatives

    boxes = np.array(
        [
            [0, 0, 10, 10],  # ground truth: always kept
            [0, 0, 10, 10],  # first proposal: kept
            [0, 0, 10, 11],  # IoU 100/110 = 0.91 with the previous proposal: dropped
            [0, 0, 10, 14],  # IoU 100/140 = 0.71 with proposal 1: dropped
            [0, 0, 10, 15],  # IoU 100/150 = 0.67 with proposal 1, 140/150 with a dropped one: kept
            [20, 20, 30, 30],
        ],
        np.float32,
    )
    gt_classes = np.array([2, -1, -1, -1, -1, -1])
    assert thin_negatives(boxes, gt_classes, 0.7).tolist() == [0, 1, 4, 5]
    assert thin_negatives(boxes, gt_classes, 0.95).tolist() == [0, 1, 2, 3, 4, 5]
    assert thin_negatives(boxes[:1], gt_classes[:1], 0.7).tolist() == [0]


def test_thin_negatives_matches_a_slow_greedy_loop():
    from rcnn.learners.svm import thin_negatives
    from rcnn.structures.boxes import box_iou

    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 50, size=(60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, size=(60, 2))], axis=1).astype(np.float32)
    gt_classes = np.where(rng.random(60) < 0.1, 0, -1)
    kept = []
    for i in range(60):
        if gt_classes[i] >= 0:
            continue
        if all(box_iou(boxes[i : i + 1], boxes[j : j + 1])[0, 0] <= 0.7 for j in kept):
            kept.append(i)
    expected = sorted(kept + np.flatnonzero(gt_classes >= 0).tolist())
    assert thin_negatives(boxes, gt_classes, 0.7).tolist() == expected
