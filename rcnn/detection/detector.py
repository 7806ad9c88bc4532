"""The trained detector at test time: proposals -> the method's region features -> SVM scores -> box regression -> NMS
(Fast R-CNN: the network's own scores and box deltas in place of the SVMs and regressors)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from rcnn.detection.nms import nms
from rcnn.learners.bbox_regression import BBoxRegressor
from rcnn.learners.svm import SVMModel
from rcnn.proposals.selective_search import selective_search
from rcnn.structures.boxes import clip_boxes


@dataclass
class ClassDetections:
    """Detections of one image, per class: ``boxes[c]`` float32 ``[K, 4]`` (x1, y1, x2, y2), ``scores[c]`` ``[K]``.

    ``candidates[c]`` holds the scores of the boxes that went into class ``c``'s NMS (empty when not kept).
    """

    boxes: list[np.ndarray]
    scores: list[np.ndarray]
    candidates: list[np.ndarray] = field(default_factory=list)

    def at_least(self, thresholds: np.ndarray) -> ClassDetections:
        """The detections of each class ``c`` scoring at least ``thresholds[c]`` (``thresholds``: float32 ``[C]``)."""
        keep = [s >= t for s, t in zip(self.scores, thresholds.tolist())]
        return ClassDetections([b[k] for b, k in zip(self.boxes, keep)], [s[k] for s, k in zip(self.scores, keep)])


def top_by_score(scores: np.ndarray, top: int | None) -> np.ndarray | slice:
    """The ``top`` highest of ``scores [N]`` (ties to the earlier box), as indices in their original order; every
    box (a slice) when ``top`` is None or not below N."""
    if top is None or top >= len(scores):
        return slice(None)
    return np.sort(np.argsort(-scores, kind="stable")[:top])


def per_class_nms(
    scores: np.ndarray,
    boxes: np.ndarray,
    width: int,
    height: int,
    nms_threshold: float,
    max_per_image: int,
    refine: Callable[[int], np.ndarray] | None = None,
    top: int | None = None,
) -> ClassDetections:
    """Per class: the ``top`` best-scoring boxes, regressed by ``refine``, through greedy NMS; the ``max_per_image``
    best survivors kept. R-CNN's ``rcnn_test.m`` keeps the 100 best per class and image before regression and NMS.

    Args:
        scores: ``[N, C]`` class scores of ``boxes [N, 4]`` (x1, y1, x2, y2).
        refine: optional ``refine(c) -> [N, 4]``, the boxes regressed for class ``c``
            (clipped to the image before NMS).
        top: boxes per class that enter NMS; None: all.
    """
    out = ClassDetections([], [], [])
    for c in range(scores.shape[1]):
        sel = top_by_score(scores[:, c], top)
        b = (boxes if refine is None else clip_boxes(refine(c), width, height))[sel]
        s = scores[sel, c]
        keep = nms(b, s, nms_threshold)[:max_per_image]
        out.boxes.append(b[keep])
        out.scores.append(s[keep].astype(np.float32))
        out.candidates.append(s.astype(np.float32))
    return out


def set_thresholds(candidates: Iterable[list[np.ndarray]], num_classes: int, limit: int) -> np.ndarray:
    """Per class, the ``limit``-th best candidate score over all images (``candidates``: per image, per class,
    the scores that entered NMS), or -inf where there are no more than ``limit``: detections scoring below it
    are dropped, R-CNN's cap of 40 boxes per test image and class on average over the set (``rcnn_test.m``)."""
    per_class: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    for image in candidates:
        for c, s in enumerate(image):
            per_class[c].append(s)
    out = np.full(num_classes, -np.inf, np.float32)
    for c, parts in enumerate(per_class):
        s = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if len(s) > limit:
            out[c] = np.partition(s, len(s) - limit)[len(s) - limit]
    return out


# ``features(image_bgr, boxes, layers)``: each layer's float16 ``[N, D]`` for the boxes ``[N, 4]`` (x1, y1, x2, y2)
# of one BGR image; the detection method's test-time half (:class:`rcnn.methods.rcnn_regions.WarpedRegionFeatures`,
# :class:`rcnn.methods.spp_regions.PooledRegionFeatures`), which also owns the network.
RegionFeatures = Callable[[np.ndarray, np.ndarray, tuple[str, ...]], dict[str, np.ndarray]]


@dataclass
class Detector:
    """Everything a trained pipeline needs to detect objects in a new image: proposals, the method's region
    features, the SVMs, the optional box regressors and NMS."""

    features: RegionFeatures
    svm: SVMModel | None  # None where the network scores the boxes itself (``scored``)
    bbox: BBoxRegressor | None
    classes: tuple[str, ...]
    svm_layer: str = "fc7"
    bbox_layer: str = "pool5"
    proposal_mode: str = "fast"
    resize_width: int | None = None
    max_pixels: int | None = 1_000_000  # as ProposalsConfig.max_pixels
    min_size: float = 20.0
    max_proposals: int | None = None
    nms_threshold: float = 0.3
    max_per_image: int = 100
    top_per_image: int | None = 100  # R-CNN's rcnn_test.m
    # Fast R-CNN: the network scores and moves the boxes itself, ``scored(features, boxes) -> (scores [N, C],
    # refine(c) or None)`` from the feature layers ``scored_layers``, in place of the SVMs and box regressors.
    scored: Callable[[dict[str, np.ndarray], np.ndarray], tuple] | None = None
    scored_layers: tuple[str, ...] = ()

    def __call__(self, image_bgr: np.ndarray, seed: int = 0) -> ClassDetections:
        """Detections of one BGR image ``[H, W, 3]``."""
        h, w = image_bgr.shape[:2]
        proposals = selective_search(
            image_bgr, self.proposal_mode, self.resize_width, self.min_size, self.max_proposals, seed, self.max_pixels
        )
        if self.scored is not None:
            scores, refine = self.scored(self.features(image_bgr, proposals, self.scored_layers), proposals)
            return per_class_nms(scores, proposals, w, h, self.nms_threshold, self.max_per_image, refine, self.top_per_image)
        layers = tuple(dict.fromkeys([self.svm_layer] + ([self.bbox_layer] if self.bbox else [])))
        feats = self.features(image_bgr, proposals, layers)
        scores = self.svm.scores(feats[self.svm_layer])
        refine = None
        if self.bbox is not None:
            pool5 = feats[self.bbox_layer].astype(np.float32)
            refine = lambda c: self.bbox.predict(pool5, proposals, c)  # noqa: E731
        return per_class_nms(scores, proposals, w, h, self.nms_threshold, self.max_per_image, refine, self.top_per_image)


@dataclass(frozen=True)
class FileResult:
    """What :func:`detect_files` made of one input: its output name and detections, or why it has none."""

    path: str | Path
    # Outputs are ``<output>.det.jpg`` and ``<output>.json``; None when the image could not be read.
    output: str | None
    detections: list[dict]
    error: str | None = None


def output_names(paths: Iterable[str | Path]) -> list[str]:
    """One distinct output name per input: its file name's stem, ``-2``, ``-3``, ... added to later equal ones.

    Names are compared case-blind, so that no two collide on a case-insensitive filesystem either;
    characters that are not printable become ``_``.
    """
    used: set[str] = set()
    names = []
    for path in paths:
        stem = "".join(c if c.isprintable() else "_" for c in Path(path).stem).strip() or "image"
        while len(stem.encode()) > 200:  # room for the suffixes within 255 bytes
            stem = stem[:-1]
        name, k = stem, 1
        while name.casefold() in used:
            k += 1
            name = f"{stem}-{k}"
        used.add(name.casefold())
        names.append(name)
    return names


def detect_files(
    detector: Detector, paths: Sequence[str | Path], out: Path, threshold: float, seed: int = 0
) -> Iterator[FileResult]:
    """Run ``detector`` on each image file; write ``<name>.det.jpg`` (boxes drawn) and ``<name>.json`` to ``out``.

    ``<name>`` is the file's stem, made distinct within the batch by :func:`output_names`, so
    that no output replaces another. An image that cannot be read or decoded is reported in
    its :class:`FileResult` (``error``) and the others are still processed. Yields one result
    per path, in order, with the detections scoring at least ``threshold`` (class, score, box).
    Selective search is seeded per image from ``seed`` and the file's stem, as the proposals stage seeds it
    from ``proposals.seed`` and the image id, so an image of the dataset gets the proposals its stage kept.
    """
    from rcnn.data.datasets import decode_image
    from rcnn.data.filenames import child_path
    from rcnn.errors import UserError
    from rcnn.proposals.selective_search import image_seed
    from rcnn.runtime import one_blas_thread
    from rcnn.store.artifacts import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    with one_blas_thread():  # numpy's idle BLAS threads would slow torch's (see rcnn.runtime)
        for path, name in zip(paths, output_names(paths)):
            try:
                image = decode_image(Path(path))
            except UserError as e:
                yield FileResult(path, None, [], str(e))
                continue
            dets = detector(image, seed=image_seed(seed, Path(path).stem))
            canvas, found = draw_detections(image, dets, detector.classes, threshold)
            ok, jpeg = cv2.imencode(".jpg", canvas)
            if not ok:
                raise RuntimeError(f"OpenCV could not encode the drawn detections of {path}")
            child_path(out, f"{name}.det.jpg").write_bytes(jpeg.tobytes())
            info = {"image": str(path), "width": image.shape[1], "height": image.shape[0], "threshold": threshold}
            write_json_atomic(child_path(out, f"{name}.json"), {**info, "detections": found})
            yield FileResult(path, name, found)


def draw_detections(
    image_bgr: np.ndarray, dets: ClassDetections, classes: tuple[str, ...], threshold: float
) -> tuple[np.ndarray, list[dict]]:
    """The image with every detection scoring at least ``threshold`` drawn and labelled, and those detections."""
    canvas = image_bgr.copy()
    found = []
    palette = _palette(len(classes))
    for c, name in enumerate(classes):
        for box, score in zip(dets.boxes[c], dets.scores[c]):
            if score < threshold:
                continue
            found.append({"class": name, "score": float(score), "box": [round(float(v), 1) for v in box]})
    thickness = max(1, round(max(image_bgr.shape[:2]) / 300))
    for det in sorted(found, key=lambda d: d["score"]):
        x1, y1, x2, y2 = (int(round(v)) for v in det["box"])
        colour = palette[classes.index(det["class"])]
        cv2.rectangle(canvas, (x1, y1), (x2 - 1, y2 - 1), colour, thickness)
        label = f"{det['class']} {det['score']:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        ty = max(y1, th + base + 2)
        cv2.rectangle(canvas, (x1, ty - th - base - 2), (x1 + tw + 2, ty), colour, -1)
        cv2.putText(canvas, label, (x1 + 1, ty - base - 1), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    found.sort(key=lambda d: -d["score"])
    return canvas, found


def _palette(n: int) -> list[tuple[int, int, int]]:
    hsv = np.stack([np.linspace(0, 179, n, endpoint=False), np.full(n, 200), np.full(n, 200)], 1).astype(np.uint8)
    bgr = cv2.cvtColor(hsv[None], cv2.COLOR_HSV2BGR)[0]
    return [tuple(int(v) for v in c) for c in bgr]
