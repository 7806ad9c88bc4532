"""What a detector's false positives are: the analysis of Hoiem, Chodpathumwan and Dai ("Diagnosing Error in Object
Detectors", ECCV 2012) that R-CNN's Figure 4 applies (Girshick et al. 2014), with its similar- and other-class
confusions counted as one type, since which classes are similar is known for VOC only.

Each false positive of the VOC matching (IoU 0.5) is, in this order:

- **localisation**: of the right class but placed badly, IoU in [0.1, 0.5) with an object of its class, or a
  duplicate of an object already detected;
- **confusion**: on an object of another class (IoU ≥ 0.1);
- **background**: on neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from rcnn.data.datasets import ImageAnnotation
from rcnn.evaluation.scoring import ground_truth_by_class
from rcnn.evaluation.voc import Detections, evaluate_class
from rcnn.structures.boxes import box_iou

TYPES = ("localisation", "confusion", "background")
NEAR = 0.1  # Hoiem et al.'s overlap for a false positive to be "on" an object


@dataclass(frozen=True)
class ClassErrors:
    """One class's false positives in decreasing-score order, as indices into :data:`TYPES`, and its objects."""

    types: np.ndarray  # int8 [F]
    objects: int  # not marked difficult

    def counts(self, first: int) -> np.ndarray:
        """How many of the ``first`` top-ranked false positives are of each type, ``[len(TYPES)]``."""
        return np.bincount(self.types[:first], minlength=len(TYPES))


def false_positive_types(
    detections: Mapping[str, Detections], annotations: list[ImageAnnotation], classes: tuple[str, ...]
) -> dict[str, ClassErrors]:
    """Each class's false positives by type (classes without detections have none)."""
    truth = {ann.image_id: ann for ann in annotations}
    gt = ground_truth_by_class(annotations, classes)
    out = {}
    for name in classes:
        dets = detections.get(name)
        if dets is None:
            out[name] = ClassErrors(np.zeros(0, np.int8), gt[name].npos)
            continue
        result = evaluate_class(dets, gt[name])
        rows = result.order[result.fp]  # the false positives, best score first
        types = np.full(len(rows), 2, np.int8)  # background unless on an object
        images = np.array([dets.image_ids[row] for row in rows], dtype=str)
        _, inverse = np.unique(images, return_inverse=True)
        by_image = np.argsort(inverse, kind="stable")
        for k in np.split(by_image, np.flatnonzero(np.diff(inverse[by_image])) + 1):  # one IoU matrix per image
            if not len(k):
                continue
            ann = truth[str(images[k[0]])]
            if not len(ann.boxes):
                continue
            near = box_iou(dets.boxes[rows[k]].astype(np.float64), ann.boxes.astype(np.float64)) >= NEAR
            same = np.array([label == name for label in ann.labels], bool)
            # a duplicate overlaps its object by 0.5 or more, a badly placed box by 0.1 to 0.5
            types[k[near[:, ~same].any(axis=1)]] = 1
            types[k[near[:, same].any(axis=1)]] = 0
        out[name] = ClassErrors(types, gt[name].npos)
    return out


def type_shares(errors: Mapping[str, ClassErrors], multiple: float) -> np.ndarray | None:
    """The share of each type among the top-ranked false positives of every class pooled, taking from each class
    its first ``multiple`` times its number of objects (at least one); None where there are none."""
    total = np.zeros(len(TYPES), np.int64)
    for e in errors.values():
        if e.objects > 0:
            total += e.counts(max(1, int(round(multiple * e.objects))))
    return total / total.sum() if total.sum() else None
