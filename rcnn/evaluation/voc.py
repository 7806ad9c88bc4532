"""PASCAL VOC detection average precision, reproducing the official devkit.

Follows ``VOCevaldet.m`` and ``VOCap.m`` of the VOC development kit
(Everingham et al., "The PASCAL Visual Object Classes (VOC) Challenge", IJCV 2010).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from rcnn.errors import UserError
from rcnn.structures.boxes import as_boxes, box_iou

METRICS = ("voc07", "voc10")
"""``voc07``: the 11-point interpolated AP of VOC2007; ``voc10``: the all-point AP of VOC2010+."""

# The devkit loops over MATLAB's ``0:0.1:1``, and MATLAB's colon operator builds the
# first half of a range as ``a + k*d`` and the second half as ``b - k*d``. Its fourth
# value is therefore 3*0.1 = 0.30000000000000004, so a recall of exactly 0.3 does not
# reach that threshold. We keep MATLAB's values to reproduce the devkit's numbers.
VOC07_RECALL_THRESHOLDS: tuple[float, ...] = tuple([k * 0.1 for k in range(6)] + [1.0 - k * 0.1 for k in range(4, -1, -1)])


@dataclass(frozen=True, eq=False)
class Detections:
    """All detections of one class, in file order (order breaks score ties).

    Attributes:
        image_ids: ``K`` image ids, one per detection.
        scores: float64 ``[K]`` confidences; higher is more confident.
        boxes: float32 ``[K, 4]`` in ``(x1, y1, x2, y2)``, continuous pixel coordinates.
    """

    image_ids: tuple[str, ...]
    scores: np.ndarray
    boxes: np.ndarray

    def __post_init__(self) -> None:
        image_ids = tuple(str(i) for i in np.asarray(self.image_ids, dtype=object).reshape(-1))
        # float64 keeps ties exactly as in the devkit's text files; float32 could create ties.
        scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        boxes = as_boxes(self.boxes)
        if not (len(image_ids) == len(scores) == len(boxes)):
            raise ValueError(
                f"Detections need one image id, score and box each; got {len(image_ids)} ids, "
                f"{len(scores)} scores and {len(boxes)} boxes"
            )
        if np.isnan(scores).any():
            raise ValueError("Detections scores contain NaN, which has no place in a ranking")
        object.__setattr__(self, "image_ids", image_ids)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "boxes", boxes)

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Detections:
        """No detections."""
        return cls((), np.zeros(0, np.float64), np.zeros((0, 4), np.float32))

    @classmethod
    def from_dict(cls, per_image: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Detections:
        """Build from ``image_id -> (boxes [N, 4] (x1, y1, x2, y2), scores [N])``, in mapping order."""
        ids: list[str] = []
        boxes: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        for image_id, (b, s) in per_image.items():
            b = as_boxes(b)
            s = np.asarray(s, dtype=np.float64).reshape(-1)
            if len(b) != len(s):
                raise ValueError(f"image {image_id!r}: {len(b)} boxes but {len(s)} scores")
            ids.extend([image_id] * len(b))
            boxes.append(b)
            scores.append(s)
        if not ids:
            return cls.empty()
        return cls(tuple(ids), np.concatenate(scores), np.concatenate(boxes))


@dataclass(frozen=True, eq=False)
class ClassGroundTruth:
    """Ground truth of one class over a whole split.

    Attributes:
        boxes: image id -> float32 ``[N, 4]`` in ``(x1, y1, x2, y2)``, continuous pixel
            coordinates. Every image of the split is present, with ``N = 0`` where the
            image has no object of this class.
        difficult: image id -> bool ``[N]``, the VOC "difficult" flags of those boxes.
    """

    boxes: dict[str, np.ndarray]
    difficult: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        if set(self.boxes) != set(self.difficult):
            missing = sorted(set(self.boxes) ^ set(self.difficult))
            raise ValueError(f"boxes and difficult must cover the same images; mismatch on {missing[:5]}")
        boxes = {str(k): as_boxes(v) for k, v in self.boxes.items()}
        difficult = {str(k): np.asarray(self.difficult[k], dtype=bool).reshape(-1) for k in self.boxes}
        for image_id, b in boxes.items():
            if len(b) != len(difficult[image_id]):
                raise ValueError(f"image {image_id!r}: {len(b)} boxes but {len(difficult[image_id])} difficult flags")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "difficult", difficult)

    @property
    def npos(self) -> int:
        """Number of non-difficult objects: the denominator of recall."""
        return int(sum(int((~d).sum()) for d in self.difficult.values()))


@dataclass(frozen=True, eq=False)
class ClassResult:
    """Evaluation of one class. Arrays are ``[K]``, in decreasing-score order.

    Attributes:
        ap: average precision; ``nan`` when ``npos == 0`` (recall is undefined).
        recall: cumulative recall after each detection (``nan`` when ``npos == 0``).
        precision: cumulative precision after each detection; ``nan`` before the first
            detection that is counted at all (leading detections on difficult objects).
        tp, fp: bool, whether each detection is a true / false positive. A detection
            matched to a difficult object is neither.
        order: int64 indices into the input :class:`Detections` giving this order.
        npos: number of non-difficult ground-truth objects.
    """

    ap: float
    recall: np.ndarray
    precision: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    order: np.ndarray
    npos: int

    @property
    def n_detections(self) -> int:
        return len(self.order)


@dataclass(frozen=True, eq=False)
class EvalResult:
    """Evaluation of all classes of a split.

    ``mAP`` averages the AP of classes that have at least one non-difficult object;
    classes with ``npos == 0`` have AP ``nan`` and are left out of the mean.
    """

    metric: str
    iou_threshold: float
    per_class: dict[str, ClassResult]

    @property
    def mAP(self) -> float:
        aps = [r.ap for r in self.per_class.values() if r.npos > 0]
        return float(np.mean(aps)) if aps else float("nan")

    def to_json(self) -> dict:
        """``{"metric", "mAP", "per_class": {class: ap}}`` with ``nan`` written as ``None``."""

        def finite_or_none(x: float) -> float | None:
            return None if np.isnan(x) else float(x)

        return {
            "metric": self.metric,
            "mAP": finite_or_none(self.mAP),
            "per_class": {name: finite_or_none(r.ap) for name, r in self.per_class.items()},
        }


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown AP metric {metric!r}; expected one of {', '.join(METRICS)}")


def voc_ap(recall: np.ndarray, precision: np.ndarray, metric: str = "voc07") -> float:
    """Average precision from a ranked list's cumulative ``recall [K]`` and ``precision [K]``.

    ``voc07``: mean over the devkit's 11 recall thresholds ``t`` of ``max(precision[recall >= t])``
    (0 where no point reaches ``t``). ``voc10``: ``VOCap.m``, the area under the precision
    envelope, precision made non-increasing from the right. NaN precisions are skipped, as
    MATLAB's ``max`` skips them; where the devkit's 11-point AP would be NaN because every
    precision is NaN, this returns 0.
    """
    _check_metric(metric)
    rec = np.asarray(recall, dtype=np.float64).reshape(-1)
    prec = np.asarray(precision, dtype=np.float64).reshape(-1)
    if rec.shape != prec.shape:
        raise ValueError(f"recall {rec.shape} and precision {prec.shape} differ in shape")
    if metric == "voc07":
        total = 0.0
        for t in VOC07_RECALL_THRESHOLDS:
            p = prec[(rec >= t) & ~np.isnan(prec)]
            total += p.max() if p.size else 0.0
        return float(total / len(VOC07_RECALL_THRESHOLDS))
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.fmax.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def _best_overlaps(
    det_boxes: np.ndarray, det_image: np.ndarray, gt: ClassGroundTruth, image_names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """For each detection: its best IoU over its image's ground truth and that GT's index.

    ``det_image [K]`` indexes ``image_names``; the returned GT index ``[K]`` counts over all
    images' boxes concatenated in ``image_names`` order (-1 where no GT overlaps at all).
    """
    best_iou = np.full(len(det_boxes), -np.inf)
    best_gt = np.full(len(det_boxes), -1, dtype=np.int64)
    if len(det_boxes) == 0:
        return best_iou, best_gt
    offsets = np.cumsum([0] + [len(gt.boxes[name]) for name in image_names])
    by_image = np.argsort(det_image, kind="stable")
    starts = np.flatnonzero(np.diff(det_image[by_image], prepend=-1))
    for rows in np.split(by_image, starts[1:]):
        image = int(det_image[rows[0]])
        gt_boxes = gt.boxes[image_names[image]]
        if len(gt_boxes) == 0:
            continue
        iou = box_iou(det_boxes[rows].astype(np.float64), gt_boxes.astype(np.float64))
        # The devkit only looks at GT that truly intersects (iw > 0 and ih > 0), so a
        # non-overlapping GT can never be matched, even with a threshold of 0.
        iou = np.where(iou > 0, iou, -np.inf)
        # argmax keeps the first maximum, as the devkit's strict `ov > ovmax` does.
        j = iou.argmax(axis=1)
        best_iou[rows] = iou[np.arange(len(rows)), j]
        best_gt[rows] = np.where(np.isfinite(best_iou[rows]), offsets[image] + j, -1)
    return best_iou, best_gt


def evaluate_class(
    dets: Detections,
    gt: ClassGroundTruth,
    iou_threshold: float = 0.5,
    metric: str = "voc07",
) -> ClassResult:
    """Match one class's detections to its ground truth and compute AP as ``VOCevaldet.m``.

    Detections are ranked by decreasing score with a stable sort (ties keep input order,
    as MATLAB's ``sort`` does). Each is assigned to the ground truth of its image with the
    highest IoU, difficult objects included. With IoU >= ``iou_threshold`` it is ignored if
    that object is difficult, a true positive if the object is not yet matched, else a
    false positive (a duplicate); below the threshold it is a false positive. Boxes of
    ``dets`` and ``gt`` are ``(x1, y1, x2, y2)`` in continuous pixel coordinates, for which
    IoU equals the devkit's inclusive-pixel IoU.

    Raises:
        UserError: a detection is on an image id that ``gt`` does not have.
    """
    _check_metric(metric)
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    order = np.argsort(-dets.scores, kind="stable")
    ranked_ids = [dets.image_ids[i] for i in order]
    image_names = list(gt.boxes)
    index = {name: i for i, name in enumerate(image_names)}
    for image_id in ranked_ids:
        if image_id not in index:
            raise UserError(f"detection on image {image_id!r}, which is not in the ground truth set")
    det_image = np.array([index[i] for i in ranked_ids], dtype=np.int64)

    best_iou, best_gt = _best_overlaps(dets.boxes[order], det_image, gt, image_names)
    # The trailing False is what best_gt == -1 (no overlapping GT) looks up.
    difficult = np.concatenate([gt.difficult[name] for name in image_names] + [np.zeros(1, bool)])
    hit = best_iou >= iou_threshold
    counted = hit & ~difficult[best_gt]
    # The matched GT never depends on what was matched before (the devkit does not fall
    # back to the next-best object), so a counted detection is a true positive exactly
    # when it is the first, in rank order, to claim its object.
    tp = np.zeros(len(order), dtype=bool)
    counted_rows = np.flatnonzero(counted)
    _, first = np.unique(best_gt[counted_rows], return_index=True)
    tp[counted_rows[first]] = True
    fp = ~hit | (counted & ~tp)

    npos = gt.npos
    ctp = np.cumsum(tp, dtype=np.float64)
    cfp = np.cumsum(fp, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = ctp / npos if npos > 0 else np.full(len(order), np.nan)
        precision = ctp / (ctp + cfp)
    ap = voc_ap(recall, precision, metric) if npos > 0 else float("nan")
    return ClassResult(
        ap=float(ap),
        recall=recall,
        precision=precision,
        tp=tp,
        fp=fp,
        order=order.astype(np.int64),
        npos=npos,
    )


def evaluate(
    dets_by_class: Mapping[str, Detections],
    gt_by_class: Mapping[str, ClassGroundTruth],
    metric: str = "voc07",
    iou_threshold: float = 0.5,
) -> EvalResult:
    """Evaluate every class of ``gt_by_class``; a class absent from ``dets_by_class`` has AP 0.

    Raises:
        UserError: detections for a class with no ground truth, or on an unknown image.
    """
    _check_metric(metric)
    unknown = sorted(set(dets_by_class) - set(gt_by_class))
    if unknown:
        raise UserError(f"detections for classes with no ground truth: {', '.join(unknown)}")
    per_class: dict[str, ClassResult] = {}
    for name, gt in gt_by_class.items():
        dets = dets_by_class.get(name, Detections.empty())
        try:
            per_class[name] = evaluate_class(dets, gt, iou_threshold=iou_threshold, metric=metric)
        except UserError as err:
            raise UserError(f"class {name!r}: {err}") from err
    return EvalResult(metric=metric, iou_threshold=float(iou_threshold), per_class=per_class)
