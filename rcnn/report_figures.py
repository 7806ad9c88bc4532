"""The PNG figures of the ``rcnn compare`` report, drawn with matplotlib's Agg canvas.

Figures are built as plain :class:`matplotlib.figure.Figure` objects, never through
pyplot, so drawing a report leaves no global matplotlib state behind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from rcnn.datasets import ImageAnnotation
from rcnn.evaluation import ClassResult, Detections

DPI = 100
TIME_PARTS = ("proposals", "features", "classification")
_TIME_COLOURS = {"proposals": "#4c72b0", "features": "#dd8452", "classification": "#55a868"}


def run_colour(index: int) -> str:
    """The colour of the ``index``-th run, the same in every figure."""
    return f"C{index % 10}"


def class_colour(index: int) -> tuple[float, float, float, float]:
    from matplotlib import colormaps

    return colormaps["tab20"](index % 20)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    # A reader of the report folder must never see half a PNG: write beside it, then rename.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)
    return path


def ap_bars(
    path: Path,
    labels: Sequence[str],
    classes: Sequence[str],
    aps: Sequence[Mapping[str, Mapping[str, float | None]]],
    metric: str,
) -> Path:
    """Grouped bars of per-class AP and mAP, one bar per run, without and with box regression.

    ``aps[r]`` maps ``"plain"`` and ``"bbox"`` to ``{class or "mAP": AP or None}``.
    """
    groups = [*classes, "mAP"]
    n = len(labels)
    width = 0.8 / n
    fig = _figure(max(6.0, 0.35 * n * len(groups) + 2.5), 6.2)
    axes = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(groups), dtype=float)
    # The mAP group stands apart from the classes.
    x[-1] += 0.5
    titles = {"plain": "without box regression", "bbox": "with box regression"}
    for ax, variant in zip(axes, ("plain", "bbox")):
        for r, label in enumerate(labels):
            values = [aps[r].get(variant, {}).get(g) for g in groups]
            heights = [np.nan if v is None else v for v in values]
            bars = ax.bar(x + (r - (n - 1) / 2) * width, heights, width * 0.95, color=run_colour(r), label=label)
            if len(groups) * n <= 48:
                ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1, rotation=90 if n > 2 else 0)
        ax.set_ylim(0, 1.15)
        ax.set_ylabel(f"AP ({metric})")
        ax.set_title(titles[variant], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[-1].set_xticks(x, groups, rotation=45 if len(groups) > 8 else 0, ha="right" if len(groups) > 8 else "center")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncols=min(n, 4), fontsize=9)
    fig.suptitle("Average precision per class", fontsize=11)
    return _save(fig, path)


def pr_grid(
    path: Path,
    labels: Sequence[str],
    classes: Sequence[str],
    curves: Sequence[Mapping[str, ClassResult] | None],
) -> Path:
    """One subplot per class with every run's precision-recall curve (runs without curves are skipped)."""
    cols = min(len(classes), 5)
    rows = math.ceil(len(classes) / cols)
    fig = _figure(3.0 * cols + 0.4, 2.9 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, classes):
        npos = None
        for r, label in enumerate(labels):
            result = (curves[r] or {}).get(name)
            if result is None:
                continue
            npos = result.npos
            keep = ~np.isnan(result.precision) & ~np.isnan(result.recall)
            if result.npos and keep.any():
                # Start at recall 0 so that a curve with one detection is still a visible line.
                rec = np.concatenate([[0.0], result.recall[keep]])
                prec = np.concatenate([[result.precision[keep][0]], result.precision[keep]])
                ax.plot(rec, prec, color=run_colour(r), lw=1.4, label=f"{label} (AP {result.ap:.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1.03), xlabel="recall", ylabel="precision")
        ax.set_title(name if npos is None else f"{name} ({npos} objects)", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(loc="lower left", fontsize=7)
        else:
            ax.text(0.5, 0.5, "no curve", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in axes[len(classes) :]:
        ax.set_visible(False)
    fig.suptitle("Precision-recall per class (with box regression)", fontsize=11)
    return _save(fig, path)


def time_bars(path: Path, labels: Sequence[str], parts: Sequence[Mapping[str, float | None]]) -> Path:
    """Stacked horizontal bars of test seconds per image: proposals, features, classification."""
    n = len(labels)
    fig = _figure(8.0, 1.2 + 0.65 * n)
    ax = fig.subplots()
    y = np.arange(n)
    totals = [sum(p.get(k) or 0.0 for k in TIME_PARTS) for p in parts]
    span = max(totals) if totals and max(totals) > 0 else 1.0
    left = np.zeros(n)
    for key in TIME_PARTS:
        widths = np.array([parts[r].get(key) or 0.0 for r in range(n)])
        bars = ax.barh(y, widths, left=left, height=0.6, color=_TIME_COLOURS[key], label=key)
        # Only label a segment wide enough to hold its number.
        texts = [f"{w:.3g}" if w > 0.08 * span else "" for w in widths]
        ax.bar_label(bars, labels=texts, label_type="center", fontsize=8, color="white")
        left += widths
    for r in range(n):
        incomplete = any(parts[r].get(k) is None for k in TIME_PARTS)
        text = f" {totals[r]:.3g} s" + (" (incomplete)" if incomplete else "")
        ax.text(left[r], y[r], text, va="center", fontsize=9)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, span * 1.3)
    ax.set_xlabel("seconds per test image")
    ax.set_title("Test time per image", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="lower right", fontsize=8, ncols=3)
    return _save(fig, path)


def top_detections(dets: Mapping[str, Detections], image_ids: Sequence[str], k: Mapping[str, int]) -> dict[str, list]:
    """The ``k[image]`` best-scoring detections of each image over all classes.

    Returns ``image_id -> [(score, class, box (x1, y1, x2, y2))]``, best first.
    """
    wanted = set(image_ids)
    found: dict[str, list] = {i: [] for i in image_ids}
    for name, d in dets.items():
        for j, image_id in enumerate(d.image_ids):
            if image_id in wanted:
                found[image_id].append((float(d.scores[j]), name, d.boxes[j]))
    return {i: sorted(found[i], key=lambda t: -t[0])[: k[i]] for i in image_ids}


def detection_grid(
    path: Path,
    labels: Sequence[str],
    images: Sequence[tuple[ImageAnnotation, np.ndarray]],
    top: Sequence[Mapping[str, list] | None],
    classes: Sequence[str],
) -> Path:
    """One row per image, one column per run: the run's top detections in colour, ground truth in white.

    ``images`` holds ``(annotation, RGB uint8 [H, W, 3])``; ``top[r]`` is :func:`top_detections`
    of run ``r`` (``None`` where the run has no detections). Boxes are ``(x1, y1, x2, y2)``.
    """
    rows, cols = len(images), len(labels)
    colour = {name: class_colour(i) for i, name in enumerate(classes)}
    fig = _figure(3.2 * cols + 0.3, 3.2 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, (ann, rgb) in enumerate(images):
        for r in range(cols):
            ax = axes[i, r]
            ax.imshow(rgb)
            ax.set_xticks([])
            ax.set_yticks([])
            for box in ann.boxes:
                ax.add_patch(_rect(box, "white", 0.8, ":"))
            if top[r] is None:
                ax.text(0.5, 0.5, "no detections", ha="center", va="center", transform=ax.transAxes, color="red")
            else:
                for score, name, box in top[r].get(ann.image_id, []):
                    c = colour.get(name, "yellow")
                    ax.add_patch(_rect(box, c, 1.6, "-"))
                    ax.text(
                        box[0] + 1, box[1] + 1, f"{name} {score:.2f}", fontsize=6.5, color="black", va="top",
                        bbox={"facecolor": c, "alpha": 0.75, "pad": 0.8, "edgecolor": "none"}, clip_on=True,
                    )  # fmt: skip
            ax.set_xlim(0, ann.width)
            ax.set_ylim(ann.height, 0)
            if i == 0:
                ax.set_title(labels[r], fontsize=10)
            if r == 0:
                ax.set_ylabel(f"{ann.image_id} ({len(ann.boxes)} objects)", fontsize=9)
    fig.suptitle("Top detections with box regression (ground truth dotted white)", fontsize=11)
    return _save(fig, path)


def _rect(box: np.ndarray, colour, lw: float, style: str) -> Rectangle:
    x1, y1, x2, y2 = (float(v) for v in box)
    return Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, lw=lw, ls=style)
