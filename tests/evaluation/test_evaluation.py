"""VOC AP against a plain transcription of the devkit's VOCevaldet.m and VOCap.m, and hand-worked cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rcnn.errors import UserError
from rcnn.evaluation.voc import (
    ClassGroundTruth,
    Detections,
    evaluate,
    evaluate_class,
    voc_ap,
)
from rcnn.structures.boxes import to_voc_pixels

# ---------------------------------------------------------------------------
# Oracle: VOCevaldet.m / VOCap.m (VOC devkit, Everingham et al.) line by line, in the
# devkit's own 1-based inclusive pixels with its +1 widths. Deliberately loops only.
# ---------------------------------------------------------------------------


def matlab_colon(a: float, d: float, b: float) -> list[float]:
    """MATLAB's ``a:d:b`` for d > 0: the first half is a + k*d, the second half b - (n-k)*d."""
    n = round((b - a) / d)
    values = []
    for k in range(n + 1):
        if k <= n // 2:
            values.append(a + k * d)
        else:
            values.append(b - (n - k) * d)
    return values


def matlab_max(values: list[float]) -> float | None:
    """MATLAB's ``max``: skips NaN, NaN if all are NaN, ``[]`` (None here) if empty."""
    if not values:
        return None
    best = math.nan
    for v in values:
        if math.isnan(v):
            continue
        if math.isnan(best) or v > best:
            best = v
    return best


def oracle_ap(rec: list[float], prec: list[float], metric: str) -> float:
    if metric == "voc07":
        ap = 0.0
        for t in matlab_colon(0.0, 0.1, 1.0):
            p = matlab_max([prec[i] for i in range(len(rec)) if rec[i] >= t])
            if p is None:
                p = 0.0
            ap = ap + p / 11
        return ap
    mrec = [0.0, *rec, 1.0]
    mpre = [0.0, *prec, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = matlab_max([mpre[i], mpre[i + 1]])
    ap = 0.0
    for i in range(1, len(mrec)):
        if mrec[i] != mrec[i - 1]:
            ap = ap + (mrec[i] - mrec[i - 1]) * mpre[i]
    return ap


def oracle_evaluate(dets: Detections, gt: ClassGroundTruth, minoverlap: float, metric: str):
    """Return (ap, tp, fp, rec, prec) with tp/fp/rec/prec in the devkit's sorted order."""
    gtids = list(gt.boxes)
    npos = 0
    gt_bb, gt_diff, gt_det = {}, {}, {}
    for i in gtids:
        gt_bb[i] = to_voc_pixels(gt.boxes[i]).tolist()
        gt_diff[i] = [bool(x) for x in gt.difficult[i]]
        gt_det[i] = [False] * len(gt_bb[i])
        npos = npos + sum(1 for x in gt_diff[i] if not x)

    ids = list(dets.image_ids)
    confidence = [float(s) for s in dets.scores]
    bbs = to_voc_pixels(dets.boxes).tolist()
    # Python's sorted() is stable, like MATLAB's sort(-confidence).
    si = sorted(range(len(confidence)), key=lambda d: -confidence[d])

    nd = len(confidence)
    tp = [0] * nd
    fp = [0] * nd
    for d in range(nd):
        i = ids[si[d]]
        if i not in gt_bb:
            raise UserError(f'unrecognized image "{i}"')
        bb = bbs[si[d]]
        ovmax = -math.inf
        jmax = -1
        for j in range(len(gt_bb[i])):
            bbgt = gt_bb[i][j]
            bi = [max(bb[0], bbgt[0]), max(bb[1], bbgt[1]), min(bb[2], bbgt[2]), min(bb[3], bbgt[3])]
            iw = bi[2] - bi[0] + 1
            ih = bi[3] - bi[1] + 1
            if iw > 0 and ih > 0:
                ua = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1) - iw * ih
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax = ov
                    jmax = j
        if ovmax >= minoverlap:
            if not gt_diff[i][jmax]:
                if not gt_det[i][jmax]:
                    tp[d] = 1
                    gt_det[i][jmax] = True
                else:
                    fp[d] = 1
        else:
            fp[d] = 1

    ctp, cfp, rec, prec = 0, 0, [], []
    for d in range(nd):
        ctp += tp[d]
        cfp += fp[d]
        rec.append(ctp / npos)
        prec.append(ctp / (ctp + cfp) if ctp + cfp > 0 else math.nan)
    return oracle_ap(rec, prec, metric), tp, fp, rec, prec


def assert_matches_oracle(dets, gt, iou_threshold, metric):
    result = evaluate_class(dets, gt, iou_threshold=iou_threshold, metric=metric)
    ap, tp, fp, rec, prec = oracle_evaluate(dets, gt, iou_threshold, metric)
    # Deliberate deviation: when every precision is NaN (all detections on difficult
    # objects) the devkit's 11-point loop yields NaN; we report 0.
    if math.isnan(ap):
        ap = 0.0
    assert result.npos == gt.npos
    np.testing.assert_array_equal(result.tp, np.array(tp, dtype=bool))
    np.testing.assert_array_equal(result.fp, np.array(fp, dtype=bool))
    np.testing.assert_allclose(result.recall, rec, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.precision, prec, rtol=0, atol=1e-12, equal_nan=True)
    assert result.ap == pytest.approx(ap, abs=1e-6), (result.ap, ap)


# ---------------------------------------------------------------------------
# Random cases
# ---------------------------------------------------------------------------


def random_case(seed: int) -> tuple[Detections, ClassGroundTruth, float]:
    rng = np.random.default_rng(seed)
    integer = rng.random() < 0.5
    n_images = int(rng.integers(1, 7))

    def make_boxes(n: int) -> np.ndarray:
        xy = rng.uniform(0, 100, size=(n, 2))
        wh = rng.uniform(1, 60, size=(n, 2))
        b = np.concatenate([xy, xy + wh], axis=1)
        return np.round(b) if integer else np.round(b, 2)

    gt_boxes, gt_difficult = {}, {}
    for k in range(n_images):
        n = int(rng.integers(0, 5))
        b = make_boxes(n)
        if n >= 1 and rng.random() < 0.2:
            b = np.concatenate([b, b[:1]])  # two identical objects: the first must win ties
        gt_boxes[f"{k:06d}"] = b
        gt_difficult[f"{k:06d}"] = rng.random(len(b)) < 0.3
    gt = ClassGroundTruth(gt_boxes, gt_difficult)

    ids, boxes = [], []
    for image_id, g in gt_boxes.items():
        for _ in range(int(rng.integers(0, 8))):
            kind = rng.random()
            if len(g) and kind < 0.3:
                box = g[rng.integers(len(g))].copy()  # exact copy: duplicates and IoU 1
            elif len(g) and kind < 0.75:
                box = g[rng.integers(len(g))] + rng.uniform(-8, 8, size=4)
                box = np.round(box) if integer else np.round(box, 2)
                box[2:] = np.maximum(box[2:], box[:2] + 1)
            else:
                box = make_boxes(1)[0]
            ids.append(image_id)
            boxes.append(box)
    perm = rng.permutation(len(ids))
    ids = [ids[i] for i in perm]
    boxes = np.array(boxes).reshape(-1, 4)[perm]
    if rng.random() < 0.5:
        scores = rng.integers(0, 4, size=len(ids)) / 4.0  # many ties
    else:
        scores = rng.random(len(ids))
    iou_threshold = float(rng.choice([0.5, 0.5, 0.3, 0.7]))
    return Detections(tuple(ids), scores, boxes), gt, iou_threshold


@pytest.mark.parametrize("seed", range(200))
def test_random_cases_match_devkit_oracle(seed):
    dets, gt, iou_threshold = random_case(seed)
    if gt.npos == 0:
        assert math.isnan(evaluate_class(dets, gt, iou_threshold).ap)
        return
    for metric in ("voc07", "voc10"):
        assert_matches_oracle(dets, gt, iou_threshold, metric)


@st.composite
def small_worlds(draw):
    """Integer boxes on a tiny grid, so exact IoU ties and IoU == 0.5 are common."""
    coord = st.integers(0, 12)

    def box():
        return st.tuples(coord, coord, st.integers(1, 8), st.integers(1, 8)).map(lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])

    n_images = draw(st.integers(1, 3))
    gt_boxes, gt_difficult = {}, {}
    for k in range(n_images):
        b = draw(st.lists(box(), max_size=4))
        gt_boxes[str(k)] = np.array(b, dtype=np.float32).reshape(-1, 4)
        gt_difficult[str(k)] = np.array(draw(st.lists(st.booleans(), min_size=len(b), max_size=len(b))), bool)
    dets = draw(st.lists(st.tuples(st.sampled_from(sorted(gt_boxes)), st.sampled_from([0.0, 0.5, 1.0]), box()), max_size=12))
    detections = Detections(
        tuple(d[0] for d in dets), np.array([d[1] for d in dets]), np.array([d[2] for d in dets]).reshape(-1, 4)
    )
    return detections, ClassGroundTruth(gt_boxes, gt_difficult)


@settings(max_examples=150, deadline=None)
@given(small_worlds(), st.sampled_from(["voc07", "voc10"]))
def test_small_integer_worlds_match_devkit_oracle(world, metric):
    dets, gt = world
    if gt.npos > 0:
        assert_matches_oracle(dets, gt, 0.5, metric)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["tp", "fp", "ignored"]), max_size=30), st.integers(1, 12), st.sampled_from(["voc07", "voc10"]))
def test_voc_ap_matches_devkit_oracle(outcomes, extra_npos, metric):
    ctp = np.cumsum([o == "tp" for o in outcomes], dtype=np.float64)
    cfp = np.cumsum([o == "fp" for o in outcomes], dtype=np.float64)
    n_tp = int(ctp[-1]) if len(ctp) else 0
    npos = max(1, n_tp + extra_npos - 1)  # at least every TP, sometimes exactly that
    rec = ctp / npos
    with np.errstate(invalid="ignore"):
        prec = ctp / (ctp + cfp)
    expected = oracle_ap(rec.tolist(), prec.tolist(), metric)
    expected = 0.0 if math.isnan(expected) else expected  # see assert_matches_oracle
    assert voc_ap(rec, prec, metric) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------
# Hand-worked cases. Boxes are continuous (x1, y1, x2, y2).
# ---------------------------------------------------------------------------

SQUARE = [0.0, 0.0, 10.0, 10.0]
FAR = [50.0, 50.0, 60.0, 60.0]


def gt_of(**images) -> ClassGroundTruth:
    """``image=[(box, difficult), ...]``."""
    return ClassGroundTruth(
        {k: np.array([b for b, _ in v], dtype=np.float32).reshape(-1, 4) for k, v in images.items()},
        {k: np.array([d for _, d in v], dtype=bool) for k, v in images.items()},
    )


def dets_of(*rows) -> Detections:
    """``(image_id, score, box), ...`` in file order."""
    return Detections(tuple(r[0] for r in rows), np.array([r[1] for r in rows]), np.array([r[2] for r in rows]).reshape(-1, 4))


def both(dets, gt, **kw):
    return (
        evaluate_class(dets, gt, metric="voc07", **kw).ap,
        evaluate_class(dets, gt, metric="voc10", **kw).ap,
    )


def test_duplicate_detection_is_false_positive():
    # a: TP, a again: duplicate FP, b: TP; npos = 2.
    # rec = [.5, .5, 1], prec = [1, .5, 2/3].
    # voc07: t = 0..0.5 (6 points) -> 1; t = 0.6..1 (5 points) -> 2/3; (6 + 10/3) / 11 = 28/33.
    # voc10: envelope [1, 1, 2/3]; .5 * 1 + .5 * 2/3 = 5/6.
    gt = gt_of(a=[(SQUARE, False)], b=[(SQUARE, False)])
    dets = dets_of(("a", 0.9, SQUARE), ("a", 0.8, SQUARE), ("b", 0.7, SQUARE))
    result = evaluate_class(dets, gt)
    assert result.tp.tolist() == [True, False, True]
    assert result.fp.tolist() == [False, True, False]
    assert both(dets, gt) == pytest.approx((28 / 33, 5 / 6), abs=1e-12)


def test_detection_on_difficult_object_is_ignored():
    # The 0.9 detection hits the difficult object: neither TP nor FP. The 0.8 one is a TP.
    # rec = [0, 1], prec = [nan, 1] -> AP 1 under both metrics (it would be 0.5 if the first
    # counted as an FP: prec = [0, .5]).
    gt = gt_of(a=[(SQUARE, False), (FAR, True)])
    dets = dets_of(("a", 0.9, FAR), ("a", 0.8, SQUARE))
    result = evaluate_class(dets, gt)
    assert result.npos == 1
    assert result.tp.tolist() == [False, True]
    assert result.fp.tolist() == [False, False]
    assert both(dets, gt) == pytest.approx((1.0, 1.0))


def test_best_overlap_is_taken_over_difficult_objects_too():
    # The detection overlaps the difficult object with IoU 1 and the normal one with
    # IoU 80/120 = 2/3. The devkit assigns it to the difficult one, so it is ignored and
    # the normal object stays unmatched: no TP at all, AP 0.
    normal = [0.0, 0.0, 10.0, 12.0]
    gt = gt_of(a=[(normal, False), (SQUARE, True)])
    dets = dets_of(("a", 0.9, SQUARE))
    result = evaluate_class(dets, gt)
    assert result.tp.tolist() == [False] and result.fp.tolist() == [False]
    assert both(dets, gt) == (0.0, 0.0)


def test_first_ground_truth_wins_an_exact_tie():
    # Two identical objects; the devkit's strict `ov > ovmax` keeps the first one.
    gt_first_normal = gt_of(a=[(SQUARE, False), (SQUARE, True)])
    gt_first_difficult = gt_of(a=[(SQUARE, True), (SQUARE, False)])
    dets = dets_of(("a", 0.9, SQUARE))
    assert evaluate_class(dets, gt_first_normal).tp.tolist() == [True]
    ignored = evaluate_class(dets, gt_first_difficult)
    assert ignored.tp.tolist() == [False] and ignored.fp.tolist() == [False]


def test_class_with_no_detections_has_ap_zero():
    gt = gt_of(a=[(SQUARE, False)])
    result = evaluate_class(Detections.empty(), gt)
    assert result.n_detections == 0 and result.npos == 1
    assert both(Detections.empty(), gt) == (0.0, 0.0)


def test_detections_on_image_without_ground_truth_are_false_positives():
    # b has no object: its 0.9 detection is an FP; a's 0.8 detection is a TP. npos = 1.
    # rec = [0, 1], prec = [0, .5]: voc07 = 11 * .5 / 11 = .5; voc10 = 1 * .5 = .5.
    gt = gt_of(a=[(SQUARE, False)], b=[])
    dets = dets_of(("b", 0.9, SQUARE), ("a", 0.8, SQUARE))
    result = evaluate_class(dets, gt)
    assert result.fp.tolist() == [True, False]
    assert both(dets, gt) == pytest.approx((0.5, 0.5))


def test_perfect_detector_has_ap_one():
    boxes = {"a": [SQUARE, FAR], "b": [[5.0, 5.0, 25.0, 30.0]], "c": [[1.5, 2.5, 7.25, 9.0]]}
    gt = gt_of(**{k: [(b, False) for b in v] for k, v in boxes.items()})
    rows = [(k, s, b) for (k, v), s in zip(boxes.items(), (0.9, 0.7, 0.3)) for b in v]
    dets = dets_of(*rows)
    assert both(dets, gt) == (pytest.approx(1.0), pytest.approx(1.0))


def test_voc07_and_voc10_differ():
    # npos = 3; ranked TP, FP, TP, third object missed.
    # rec = [1/3, 1/3, 2/3], prec = [1, 1/2, 2/3].
    # voc07: t = 0, .1, .2, .3 -> 1; t = .4, .5, .6 -> 2/3; t = .7 .. 1 -> 0;
    #        (4 + 3 * 2/3) / 11 = 6/11.
    # voc10: envelope [1, 2/3, 2/3]; 1/3 * 1 + 1/3 * 2/3 + 1/3 * 0 = 5/9.
    gt = gt_of(a=[(SQUARE, False), (FAR, False)], b=[(SQUARE, False)])
    dets = dets_of(("a", 0.9, SQUARE), ("b", 0.8, FAR), ("b", 0.7, SQUARE))
    assert both(dets, gt) == pytest.approx((6 / 11, 5 / 9), abs=1e-12)


def test_voc07_recall_of_exactly_0_3_misses_matlabs_0_3_threshold():
    # MATLAB's 0:0.1:1 has 3*0.1 = 0.30000000000000004 as its 4th value. npos = 10;
    # ranked 3 TP, 3 FP, 1 TP: rec = .1 .2 .3 .3 .3 .3 .4, last prec = 4/7.
    # t = 0, .1, .2 -> 1; t = "0.3" -> only rec .4 qualifies -> 4/7; t = .4 -> 4/7; rest 0.
    # (3 + 8/7) / 11 = 29/77 (it would be 32/77 with t = 0.3 exactly).
    objects = [[10.0 * k, 0.0, 10.0 * k + 5, 5.0] for k in range(10)]
    gt = gt_of(a=[(b, False) for b in objects])
    rows = [("a", 1.0 - 0.01 * k, objects[k]) for k in range(3)]
    rows += [("a", 0.5 - 0.01 * k, [200.0, 200.0, 210.0, 210.0]) for k in range(3)]
    rows += [("a", 0.1, objects[3])]
    assert evaluate_class(dets_of(*rows), gt).ap == pytest.approx(29 / 77, abs=1e-12)


def test_tied_scores_keep_file_order():
    # Same score: the FP comes first in the file, so it ranks first: prec = [0, .5] -> AP .5.
    # (Ranked the other way round it would be 1.)
    gt = gt_of(a=[(SQUARE, False)])
    dets = dets_of(("a", 0.5, FAR), ("a", 0.5, SQUARE))
    assert evaluate_class(dets, gt).order.tolist() == [0, 1]
    assert both(dets, gt) == pytest.approx((0.5, 0.5))


def test_touching_boxes_never_match_even_at_threshold_zero():
    # The devkit skips objects with no positive intersection (iw > 0 & ih > 0).
    gt = gt_of(a=[(SQUARE, False)])
    dets = dets_of(("a", 0.9, [10.0, 0.0, 20.0, 10.0]))
    assert evaluate_class(dets, gt, iou_threshold=0.0).fp.tolist() == [True]


def test_iou_of_exactly_the_threshold_matches():
    # Half the object: IoU = 50/100 = 0.5 >= 0.5.
    gt = gt_of(a=[(SQUARE, False)])
    dets = dets_of(("a", 0.9, [0.0, 0.0, 5.0, 10.0]))
    assert evaluate_class(dets, gt).tp.tolist() == [True]
    assert evaluate_class(dets, gt, iou_threshold=0.51).fp.tolist() == [True]


def test_only_difficult_hits_give_ap_zero():
    # Every precision is 0/0; the devkit's 11-point loop would give NaN, we give 0.
    gt = gt_of(a=[(SQUARE, False), (FAR, True)])
    dets = dets_of(("a", 0.9, FAR))
    assert both(dets, gt) == (0.0, 0.0)


def test_unknown_image_raises_user_error_naming_it():
    gt = gt_of(a=[(SQUARE, False)])
    with pytest.raises(UserError, match="'zzz'"):
        evaluate_class(dets_of(("zzz", 0.9, SQUARE)), gt)
    with pytest.raises(UserError, match="class 'dog'.*'zzz'"):
        evaluate({"dog": dets_of(("zzz", 0.9, SQUARE))}, {"dog": gt})


def test_evaluate_means_over_classes_with_objects_and_writes_json():
    gt_cat = gt_of(a=[(SQUARE, False)])
    gt_dog = gt_of(a=[(FAR, True)])  # npos = 0: AP nan, left out of the mean
    gt_cow = gt_of(a=[(FAR, False)])  # no detections: AP 0
    result = evaluate({"cat": dets_of(("a", 0.9, SQUARE))}, {"cat": gt_cat, "dog": gt_dog, "cow": gt_cow})
    assert result.per_class["cat"].ap == 1.0
    assert math.isnan(result.per_class["dog"].ap)
    assert result.per_class["cow"].ap == 0.0
    assert result.mAP == pytest.approx(0.5)
    doc = result.to_json()
    assert doc == {"metric": "voc07", "mAP": 0.5, "per_class": {"cat": 1.0, "dog": None, "cow": 0.0}}
    json.dumps(doc, allow_nan=False)


def test_evaluate_rejects_detections_for_unknown_class():
    with pytest.raises(UserError, match="zebra"):
        evaluate({"zebra": Detections.empty()}, {"cat": gt_of(a=[(SQUARE, False)])})


def test_unknown_metric_is_rejected():
    with pytest.raises(ValueError, match="voc07"):
        voc_ap(np.zeros(1), np.zeros(1), metric="coco")


def test_detections_from_dict_and_validation():
    d = Detections.from_dict({"a": (np.array([SQUARE, FAR]), np.array([0.1, 0.2])), "b": (np.zeros((0, 4)), [])})
    assert d.image_ids == ("a", "a") and len(d) == 2
    assert d.boxes.dtype == np.float32 and d.scores.dtype == np.float64
    assert len(Detections.from_dict({})) == 0
    with pytest.raises(ValueError):
        Detections(("a",), np.array([0.1, 0.2]), np.array([SQUARE, FAR]))
    with pytest.raises(ValueError):
        Detections(("a",), np.array([np.nan]), np.array([SQUARE]))
    with pytest.raises(ValueError):
        ClassGroundTruth({"a": np.array([SQUARE])}, {"a": np.array([False, True])})


def test_iou_threshold_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError, match="iou_threshold"):
        evaluate_class(Detections.empty(), gt_of(a=[(SQUARE, False)]), iou_threshold=-0.1)
