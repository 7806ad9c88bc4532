"""COCO's box AP of detections on a VOC-layout split, computed by the COCO API's own evaluation (``pycocotools``'
``COCOeval``; Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014), so the numbers are COCO's.

AP is averaged over IoU thresholds 0.50:0.05:0.95 and 101 recall points, at most 100 detections per image and class
(the highest scored; the pipelines keep as many, ``evaluate.top_per_image``). Objects marked difficult are given to
COCO as crowd regions: detections on them count neither way, as in VOC (COCO matches a crowd region by the share of
the detection inside it, VOC a difficult object by IoU). Area ranges (small up to 32², medium 32² to 96², large from
96² pixels, bounds included as pycocotools has them) use box areas; COCO's own annotations use mask areas there.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from rcnn.data.datasets import ImageAnnotation
from rcnn.errors import UserError
from rcnn.evaluation.voc import Detections

#: ``COCOeval.stats`` in its order: AP over IoU .50:.95, at .50 and .75, by area; then AR at 1, 10, 100 detections and by area.
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
INSTALL = "the COCO metric needs pycocotools: python -m pip install pycocotools (or the coco extra, -e '.[coco]')"


@dataclass(frozen=True)
class CocoResult:
    stats: dict[str, float]  # STATS over all classes (-1 where COCO has nothing to score, as it prints)
    per_class: dict[str, dict[str, float]]  # class -> AP, AP50, AP75 (nan without objects)
    objects: dict[str, int]  # per class, objects not marked difficult
    detections: dict[str, int]

    @property
    def mAP(self) -> float:
        """AP over the classes; nan where no class has an object to score (COCO's -1)."""
        return self.stats["AP"] if self.stats["AP"] >= 0 else float("nan")

    def to_json(self) -> dict:
        """``{"metric": "coco", "mAP", "stats", "per_class": {class: AP}, "per_class_AP50", "per_class_AP75"}``,
        ``nan`` written as ``None``."""

        def finite(x: float) -> float | None:
            return float(x) if np.isfinite(x) else None

        out = {"metric": "coco", "mAP": finite(self.mAP), "stats": {k: finite(v) for k, v in self.stats.items()}}
        for key, suffix in (("AP", ""), ("AP50", "_AP50"), ("AP75", "_AP75")):
            out[f"per_class{suffix}"] = {name: finite(ap[key]) for name, ap in self.per_class.items()}
        return out


def coco_api():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise UserError(INSTALL) from None
    return COCO, COCOeval


def _dataset(api, images: list[dict], categories: list[dict], annotations: list[dict]):
    coco = api()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
        coco.createIndex()
    return coco


def _xywh(box) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def coco_evaluate(
    detections: Mapping[str, Detections], annotations: list[ImageAnnotation], classes: tuple[str, ...]
) -> CocoResult:
    """Score ``detections`` (per class; boxes in continuous pixels, image ids those of ``annotations``) with COCO's AP.

    A class without objects (not marked difficult) scores nan and stays out of the means, as in COCO.
    """
    COCO, COCOeval = coco_api()
    number = {ann.image_id: k + 1 for k, ann in enumerate(annotations)}
    images = [{"id": number[ann.image_id], "width": ann.width, "height": ann.height} for ann in annotations]
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(classes)]
    category = {name: k + 1 for k, name in enumerate(classes)}
    truth, objects = [], dict.fromkeys(classes, 0)
    for ann in annotations:
        for box, name, hard in zip(ann.boxes, ann.labels, ann.difficult.tolist()):
            if name not in category:
                continue
            xywh = _xywh(box)
            crowd = int(hard)
            truth.append({"id": len(truth) + 1, "image_id": number[ann.image_id], "category_id": category[name]})
            truth[-1].update(bbox=xywh, area=xywh[2] * xywh[3], iscrowd=crowd, ignore=crowd)
            objects[name] += 1 - crowd
    found, counts = [], dict.fromkeys(classes, 0)
    for name, dets in detections.items():
        if name not in category:
            continue
        counts[name] = len(dets)
        for image_id, score, box in zip(dets.image_ids, dets.scores.tolist(), dets.boxes):
            if image_id not in number:
                raise UserError(f"a detection of class {name} is of image '{image_id}', which the split does not list")
            xywh = _xywh(box)
            found.append({"id": len(found) + 1, "image_id": number[image_id], "category_id": category[name], "score": score})
            found[-1].update(bbox=xywh, area=xywh[2] * xywh[3], iscrowd=0)
    gt = _dataset(COCO, images, categories, truth)
    dt = _dataset(COCO, images, categories, found)
    run = COCOeval(gt, dt, iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        run.evaluate()
        run.accumulate()
        run.summarize()
    precision = run.eval["precision"]  # [IoU thresholds, recall points, classes, area ranges, max detections]
    per_class = {}
    for k, name in enumerate(classes):
        p = precision[:, :, k, 0, -1]  # every area, 100 detections
        ap = [float(q[q > -1].mean()) if (q > -1).any() else float("nan") for q in (p, p[0], p[5])]
        per_class[name] = dict(zip(("AP", "AP50", "AP75"), ap))
    return CocoResult(dict(zip(STATS, (float(v) for v in run.stats))), per_class, objects, counts)


def format_coco_table(result: CocoResult, title: str = "") -> str:
    """Per-class AP, AP50 and AP75 with object and detection counts, then COCO's summary figures."""
    lines = [title] if title else []
    lines.append(f"  {'class':<16}{'AP':>8}{'AP50':>8}{'AP75':>8}{'objects':>9}{'detections':>12}")
    fmt = lambda v: "n/a" if np.isnan(v) else f"{v:.4f}"  # noqa: E731
    for name, ap in result.per_class.items():
        lines.append(
            f"  {name:<16}{fmt(ap['AP']):>8}{fmt(ap['AP50']):>8}{fmt(ap['AP75']):>8}"
            f"{result.objects[name]:>9}{result.detections[name]:>12}"
        )
    s = {key: float("nan") if value < 0 else value for key, value in result.stats.items()}  # COCO's -1: nothing to score
    lines.append(f"  {'mAP':<16}{fmt(s['AP']):>8}{fmt(s['AP50']):>8}{fmt(s['AP75']):>8}   (COCO AP, IoU 0.50:0.05:0.95)")
    lines.append(
        f"  by box area: small {fmt(s['APs'])}, medium {fmt(s['APm'])}, large {fmt(s['APl'])} (n/a: no objects of that size)"
    )
    return "\n".join(lines)
