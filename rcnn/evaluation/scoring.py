"""Scoring detections of a VOC split: ground truth per class, devkit files in, AP table out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rcnn.data.datasets import ImageAnnotation, VOCDataset, close_class
from rcnn.errors import ConfigError, UserError
from rcnn.evaluation.detfiles import detection_file_classes, read_detections
from rcnn.evaluation.voc import ClassGroundTruth, Detections, EvalResult, evaluate


def ground_truth_by_class(annotations: list[ImageAnnotation], classes: tuple[str, ...]) -> dict[str, ClassGroundTruth]:
    """Per-class ground truth over a split; every image appears for every class (maybe with no boxes)."""
    out = {}
    for name in classes:
        boxes, difficult = {}, {}
        for ann in annotations:
            keep = np.array([label == name for label in ann.labels], dtype=bool)
            boxes[ann.image_id] = ann.boxes[keep] if len(keep) else ann.boxes
            difficult[ann.image_id] = ann.difficult[keep] if len(keep) else ann.difficult
        out[name] = ClassGroundTruth(boxes=boxes, difficult=difficult)
    return out


def score_devkit_detections(
    data_root: Path, split: str, detections: Path, metric: str = "voc07", classes: tuple[str, ...] | None = None
) -> EvalResult:
    """Score devkit result files in ``detections`` against ``split`` of the VOC folder ``data_root``.

    ``classes`` None scores the classes of the split's objects and those the files name; a class
    without objects in the split has AP nan (the devkit's n/a) and stays out of the mean. Given
    ``classes``, the files of other classes in a folder are left out (:func:`devkit_inputs`).
    """
    annotations, classes, dets = devkit_inputs(data_root, split, detections, classes)
    return score_detections(dets, annotations, classes, metric)


def score_detections(
    dets: dict[str, Detections], annotations: list[ImageAnnotation], classes: tuple[str, ...], metric: str = "voc07"
) -> EvalResult:
    """The VOC scores of ``dets`` (per class) against ``annotations``, the classes that have detections."""
    gt = ground_truth_by_class(annotations, classes)
    return evaluate(dets, {name: gt[name] for name in dets}, metric=metric)


def devkit_inputs(
    data_root: Path, split: str, detections: Path, classes: tuple[str, ...] | None = None
) -> tuple[list[ImageAnnotation], tuple[str, ...], dict[str, Detections]]:
    """The annotations of ``split`` of ``data_root``, the classes to score and their detections read from the devkit
    files in ``detections``: the classes asked for, else those of the split's objects and of the files.

    Raises:
        ConfigError: a class of ``classes`` is neither an object of the split nor named by a file (a typo
            would otherwise score as n/a, out of the mean, unnoticed).
        UserError: the data or the files are missing or malformed.
    """
    dataset = VOCDataset(data_root, split)
    if not Path(detections).exists():
        raise UserError(f"detections path {detections} does not exist")
    known = sorted(set(dataset.classes()) | set(detection_file_classes(detections, split)))
    if classes is None:
        classes = tuple(known)
    unknown = [name for name in classes if name not in known]
    if unknown:
        which = f"class {unknown[0]!r} is" if len(unknown) == 1 else f"classes {', '.join(map(repr, unknown))} are"
        close = {name: other for name in unknown if (other := close_class(name, tuple(known)))}
        if len(unknown) == 1 and close:
            hint = f"; did you mean {close[unknown[0]]!r}?"
        else:
            hint = "; did you mean " + ", ".join(f"{c!r} for {u!r}" for u, c in close.items()) + "?" if close else ""
        raise ConfigError(
            f"{which} to be scored but neither an object of split '{split}' of {data_root} nor named by a file in {detections} "
            f"(known: {', '.join(known)}){hint}"
        )
    return dataset.annotations(), classes, read_detections(detections, split, classes)


def format_ap_table(result: EvalResult, title: str = "") -> str:
    """Per-class AP, detection and object counts, and the mean, as a plain-text table."""
    lines = [title] if title else []
    lines.append(f"  {'class':<16}{'AP':>8}{'objects':>9}{'detections':>12}")
    for name, r in result.per_class.items():
        ap = "n/a" if np.isnan(r.ap) else f"{r.ap:.4f}"
        lines.append(f"  {name:<16}{ap:>8}{r.npos:>9}{r.n_detections:>12}")
    label = {"voc07": "VOC07 11-point", "voc10": "VOC10 all-point"}.get(result.metric, result.metric)
    lines.append(f"  {'mAP':<16}{result.mAP:>8.4f}   ({label}, IoU >= {result.iou_threshold:g})")
    return "\n".join(lines)
