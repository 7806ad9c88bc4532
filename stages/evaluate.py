"""Stage `evaluate`: detect on the test split and score it as the VOC devkit does.

Test proposals are scored by the class SVMs (Fast R-CNN: by the network's softmax, its boxes moved by
the network's own deltas); for each class the ``top_per_image`` best
(R-CNN: 100) go through greedy NMS at IoU 0.3, once as proposed and once after box
regression, and over the whole split only the ``top_per_set`` best per image on average
are kept (R-CNN's ``rcnn_test.m``). Both sets are written as devkit result files and
scored (per-class AP and mAP); precision-recall curves are drawn per class.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import numpy as np

from rcnn.data.filenames import child_path
from rcnn.detection.detector import ClassDetections, per_class_nms, set_thresholds
from rcnn.evaluation.detfiles import devkit_filename, write_devkit_file
from rcnn.evaluation.scoring import ground_truth_by_class
from rcnn.evaluation.voc import Detections, EvalResult, evaluate
from rcnn.learners.bbox_regression import BBoxRegressor
from rcnn.learners.svm import SVMModel
from rcnn.methods.fast_regions import OUTPUTS, scored_boxes
from rcnn.runtime import one_blas_thread, quiet_matplotlib
from rcnn.store import records
from rcnn.store.artifacts import write_json_atomic

from . import features, train_bbox, train_svm
from .context import Context
from .image_records import write_image_records
from .methods import Method, build_method
from .provenance import upstream_digest

NAME = "evaluate"
SCHEMA_VERSION = 1
VARIANTS = {"plain": "detections", "bbox": "detections-bbox"}
RESULTS = "results.json"
KIND = "detections"
PART_SIZE = 16  # images per part file


def splits(ctx: Context) -> tuple[str, ...]:
    return (ctx.cfg.data.test,)


def params(ctx: Context) -> dict:
    e = ctx.cfg.evaluate
    return {
        "nms_threshold": e.nms_threshold,
        "top_per_image": e.top_per_image,
        "top_per_set": e.top_per_set,
        "max_per_image": e.max_per_image,
        "metric": e.metric,
        "svm_layer": ctx.cfg.svm.layer,
        "bbox_layer": ctx.cfg.bbox.layer,
        "classes": list(ctx.classes),
    }


def inputs(ctx: Context, split: str) -> dict[str, str]:
    trainval = ctx.cfg.data.trainval
    common = {f"data/{split}": ctx.dataset(split).fingerprint, f"features/{split}": upstream_digest(ctx, "features", split)}
    if not uses_svms(ctx):
        return common
    return {
        **common,
        "train-svm": upstream_digest(ctx, "train-svm", trainval),
        "train-bbox": upstream_digest(ctx, "train-bbox", trainval),
        **features.layer_inputs(ctx, split, ctx.cfg.bbox.layer),
    }


def uses_svms(ctx: Context) -> bool:
    """Whether the pipeline's test boxes are scored by SVMs and moved by ridge regressors (R-CNN, SPP-net), or
    by the network's own outputs, cached by stage `features` (Fast R-CNN)."""
    return "train-svm" not in build_method(ctx.cfg).skipped_stages


def detections_by_class(per_image: dict[str, ClassDetections], classes: tuple[str, ...]) -> dict[str, Detections]:
    return {
        name: Detections.from_dict({i: (d.boxes[c], d.scores[c]) for i, d in per_image.items()}) for c, name in enumerate(classes)
    }


def image_records(ctx: Context, split: str, ids: list[str]):
    """The detections of ``ids``, in their order: ``(image_id, arrays, info)``, the arrays holding each
    variant's kept boxes, scores and classes (:func:`pack`), info the seconds of classifying (SVMs, box
    regression, NMS) and of feature work done here (what this process or a cluster worker runs)."""
    e = ctx.cfg.evaluate
    dataset = ctx.dataset(split)
    with features.load(ctx, split) as rs, scorer(ctx, split) as score, one_blas_thread():
        for image_id in ids:
            ann = dataset.annotation(image_id)
            proposal = rs.array(image_id, "gt_classes", np.int64, 1) < 0
            boxes = rs.array(image_id, "boxes", np.float32, 2)[proposal]
            scores, refine, pooling, start = score(rs, image_id, proposal, boxes)
            refined = per_class_nms(
                scores, boxes, ann.width, ann.height, e.nms_threshold, e.max_per_image, refine=refine, top=e.top_per_image
            )
            seconds = time.perf_counter() - start
            plain = per_class_nms(scores, boxes, ann.width, ann.height, e.nms_threshold, e.max_per_image, top=e.top_per_image)
            arrays = {**pack(plain, "plain"), **pack(refined, "bbox")}
            if e.top_per_set is not None:  # the scores that entered NMS, class by class: the cap over the split reads them
                arrays["candidates"] = np.stack(plain.candidates)
            yield image_id, arrays, {"images": 1, "classify": seconds, "features": pooling}


@contextlib.contextmanager
def scorer(ctx: Context, split: str):
    """``score(rs, image_id, proposal, boxes)``: the class scores ``[N, C]`` of an image's proposals ``boxes``
    (rows ``proposal`` of its features record), ``refine(c)`` giving them moved for class ``c``, the seconds of
    feature work that took, and the time the classifying began (what `rcnn detect` does next: scores, box
    regression and NMS, timed from there)."""
    if not uses_svms(ctx):  # Fast R-CNN: the network's log-probabilities and deltas, cached by stage features

        def network(rs, image_id, proposal, boxes):
            outputs = {k: rs.array(image_id, k, np.float16, 2)[proposal] for k in OUTPUTS}
            start = time.perf_counter()
            return *scored_boxes(outputs, boxes), 0.0, start

        yield network
        return
    svm: SVMModel = train_svm.load(ctx)
    reg: BBoxRegressor = train_bbox.load(ctx)
    with features.layer_reader(ctx, split, ctx.cfg.bbox.layer) as bbox_layer:

        def svms(rs, image_id, proposal, boxes):
            # Reading cached features is not timed: a detector has them in memory. What box regression reads
            # and the features stage did not cache is computed here: SPP-net's pyramid pooled again from the
            # conv maps, R-CNN's pool5 under features.bbox_rows: regression warped again through the CNN.
            # That is feature work, timed apart. Then what `rcnn detect` does next: SVM scores, box
            # regression and NMS.
            fc7 = rs.array(image_id, ctx.cfg.svm.layer, np.float16, 2)[proposal]
            pool5 = bbox_layer.rows(rs, image_id, proposal, boxes)
            pooling = bbox_layer.compute_seconds
            start = time.perf_counter()
            return svm.scores(fc7), lambda c, f=pool5, b=boxes: reg.predict(f, b, c), pooling, start

        yield svms


def pack(found: ClassDetections, variant: str) -> dict[str, np.ndarray]:
    """One variant's detections of an image as three arrays (class by class, each in NMS order)."""
    counts = [len(s) for s in found.scores]
    return {
        f"{variant}_boxes": np.concatenate(found.boxes).reshape(-1, 4),
        f"{variant}_scores": np.concatenate(found.scores).astype(np.float32),
        f"{variant}_classes": np.repeat(np.arange(len(counts)), counts).astype(np.int64),
    }


def unpack(rs: records.RecordSet, image_id: str, variant: str, num_classes: int) -> ClassDetections:
    """The inverse of :func:`pack`: one variant's detections of an image, from its record in ``rs``."""
    boxes, scores = rs.array(image_id, f"{variant}_boxes", ndim=2), rs.array(image_id, f"{variant}_scores", np.float32, 1)
    classes = rs.array(image_id, f"{variant}_classes", np.int64, 1)
    return ClassDetections([boxes[classes == c] for c in range(num_classes)], [scores[classes == c] for c in range(num_classes)])


def compute(ctx: Context, split: str, work: Path) -> tuple[dict[str, Path], dict]:
    e = ctx.cfg.evaluate
    dataset = ctx.dataset(split)
    # The detection pass writes each image's detections as records (in shards on a cluster), so that a killed
    # run resumes where it stopped; they are read back here and scored.
    parts = work / "parts"
    totals = write_image_records(ctx, sys.modules[__name__], split, parts, dataset.ids, f"evaluate {split}")
    done = int(totals.get("images", 0))
    index = work / "index.json"
    records.write_index(parts, index, dataset.ids, KIND)
    results: dict[str, dict[str, ClassDetections]] = {v: {} for v in VARIANTS}
    candidates = []
    with records.RecordSet(index, KIND) as rs:
        for image_id in dataset.ids:
            for v in VARIANTS:
                results[v][image_id] = unpack(rs, image_id, v, len(ctx.classes))
            if e.top_per_set is not None:
                candidates.append(list(rs.array(image_id, "candidates", np.float32, 2)))
    if e.top_per_set is not None:  # the same scores in both variants: regression moves boxes, not scores
        limit = e.top_per_set * len(dataset.ids)
        thresholds = set_thresholds(candidates, len(ctx.classes), limit)
        results = {v: {i: d.at_least(thresholds) for i, d in found.items()} for v, found in results.items()}
    gt = ground_truth_by_class(dataset.annotations(), ctx.classes)
    outputs: dict[str, Path] = {}
    evals: dict[str, EvalResult] = {}
    for variant, folder in VARIANTS.items():
        dets = detections_by_class(results[variant], ctx.classes)
        for name, d in dets.items():
            path = work / folder / devkit_filename(split, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_devkit_file(path, d.image_ids, d.scores, d.boxes)
            outputs[f"{folder}/{path.name}"] = path
        evals[variant] = evaluate(dets, gt, metric=e.metric)
    summary = {
        "metric": e.metric,
        "mAP": evals["plain"].mAP,
        "mAP_bbox": evals["bbox"].mAP,
        "per_class": evals["plain"].to_json()["per_class"],
        "per_class_bbox": evals["bbox"].to_json()["per_class"],
        # per image computed in this run (a resumed run's first images are not timed)
        "seconds_per_image_classify": totals["classify"] / done if done else None,
        # feature work done here (box regression's layer where not cached: SPP-net's pyramid from the cached conv
        # maps, R-CNN's pool5 under features.bbox_rows: regression)
        "seconds_per_image_features": totals["features"] / done if done else 0.0,  # 0 for cached layers
    }
    write_json_atomic(work / RESULTS, summary)
    outputs[RESULTS] = work / RESULTS
    outputs.update(plot_pr_curves(evals, work / "pr", build_method(ctx.cfg).variant_labels))
    return outputs, summary


@quiet_matplotlib()
def plot_pr_curves(evals: dict[str, EvalResult], folder: Path, labels: dict[str, str] | None = None) -> dict[str, Path]:
    """One PNG per class with the precision-recall curves of both variants (named by ``labels``; by default the
    SVM methods' names), plus an AP bar chart."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = labels or Method.variant_labels
    out = {}
    for name in evals["plain"].per_class:
        fig, ax = _axes(4.5, 4)
        for variant, ev in evals.items():
            r = ev.per_class[name]
            if r.npos and len(r.recall):
                ax.plot(r.recall, np.nan_to_num(r.precision), label=f"{labels[variant]} (AP {r.ap:.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=f"{name}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
        path = child_path(folder, f"{name}.png")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        out[f"pr/{name}.png"] = path
    names = list(evals["plain"].per_class)
    fig, ax = _axes(max(5, 0.45 * len(names) + 2), 3.5)
    x = np.arange(len(names))
    for k, (variant, ev) in enumerate(evals.items()):
        aps = [np.nan_to_num(ev.per_class[n].ap) for n in names]
        ax.bar(x + (k - 0.5) * 0.4, aps, 0.4, label=f"{labels[variant]} (mAP {ev.mAP:.3f})")
    ax.set_xticks(x, names, rotation=60, ha="right")
    ax.set(ylim=(0, 1), ylabel=f"AP ({evals['plain'].metric})")
    ax.legend(fontsize=8)
    path = folder / "ap.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    out["pr/ap.png"] = path
    return out


def _axes(width: float, height: float):
    """A figure on its own Agg canvas and its one axes: matplotlib's object API, as rcnn.report.figures draws.

    Not pyplot, whose global figure registry and backend switch would reach into any program that imports the stage.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def describe(manifest: dict) -> str:
    m = manifest.get("metrics", {})
    return f"mAP {m.get('mAP', float('nan')):.4f} ({m.get('metric')}), with box regression {m.get('mAP_bbox', float('nan')):.4f}"


def table(ctx: Context, manifest: dict) -> str:
    """The per-class AP table of both variants."""
    m = manifest["metrics"]
    lines = [f"  {'class':<16}{'AP':>8}{'AP bbox':>9}"]
    for name in ctx.classes:
        a, b = m["per_class"].get(name), m["per_class_bbox"].get(name)
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"  {name:<16}{fmt(a):>8}{fmt(b):>9}")
    lines.append(f"  {'mAP':<16}{m['mAP']:>8.4f}{m['mAP_bbox']:>9.4f}   ({m['metric']})")
    return "\n".join(lines)


def check_trained(ctx: Context, bbox: bool = True) -> None:
    """Refuse, in one line, a trained pipeline that is not current up the whole chain (what ``rcnn detect`` runs):
    never SVMs or box regressors trained on the features of another network, other proposals or other code."""
    if not uses_svms(ctx):  # Fast R-CNN: the fine-tuned network is the whole detector
        upstream_digest(ctx, "finetune", ctx.cfg.data.trainval)
        return
    upstream_digest(ctx, "train-svm", ctx.cfg.data.trainval)
    if bbox:
        upstream_digest(ctx, "train-bbox", ctx.cfg.data.trainval)
