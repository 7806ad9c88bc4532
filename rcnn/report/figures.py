"""The PNG figures of the ``rcnn compare`` report, and the test data they are drawn from.

Figures are plain matplotlib ``Figure`` objects on the Agg canvas, never pyplot, so no global state is left behind.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from rcnn.data.datasets import ImageAnnotation, VOCDataset, decode_image
from rcnn.errors import UserError
from rcnn.evaluation.detfiles import read_devkit_file
from rcnn.evaluation.scoring import ground_truth_by_class
from rcnn.evaluation.voc import ClassResult, Detections, evaluate
from rcnn.runtime import quiet_matplotlib

if TYPE_CHECKING:
    from rcnn.report.runs import RunSummary

DPI = 100
CELL_INCHES = 3.2  # one image of the detection grid
LABEL_POINTS = 6.5
TIME_PARTS = ("proposals", "features", "classification")
_TIME_COLOURS = {"proposals": "#4c72b0", "features": "#dd8452", "classification": "#55a868"}


def run_colour(index: int) -> str:
    """The colour of the ``index``-th run, the same in every figure."""
    return f"C{index % 10}"


def class_colour(index: int, n_classes: int) -> tuple[float, float, float, float]:
    """Distinct colours for up to 10 classes; tab20's paired light shades only beyond that."""
    from matplotlib import colormaps

    return colormaps["tab10" if n_classes <= 10 else "tab20"](index % 20)


class TestData:
    """Each run's test ground truth and box-regressed detections, read once; what cannot be read goes to ``notes``."""

    def __init__(self, runs: Sequence[RunSummary], labels: Sequence[str]):
        self.runs, self.labels = runs, labels
        self.notes: list[str] = []
        self._annotations: dict[tuple, list[ImageAnnotation] | None] = {}
        self._detections: dict[int, dict[str, Detections] | None] = {}

    def annotations(self, r: int) -> list[ImageAnnotation] | None:
        run = self.runs[r]
        key = (run.data_root, run.test_split)
        if key not in self._annotations:
            self._annotations[key] = None
            if run.data_root is None or run.test_split is None:
                self.notes.append(f"{self.labels[r]}: the manifests do not say where the test data is")
            else:
                try:
                    # clipped as data.clip_boxes clips: boxes past the edge are drawn at it (a run refused them otherwise)
                    self._annotations[key] = VOCDataset(run.data_root, run.test_split, clip=True).annotations()
                except UserError as err:
                    self.notes.append(f"{self.labels[r]}: cannot read the test data ({err})")
        return self._annotations[key]

    def detections(self, r: int) -> dict[str, Detections] | None:
        """Run ``r``'s box-regressed detections per class, or None if it has none to read."""
        if r not in self._detections:
            self._detections[r] = None
            if self.runs[r].detections_bbox:
                try:
                    self._detections[r] = {c: read_devkit_file(p) for c, p in self.runs[r].detections_bbox.items()}
                except UserError as err:
                    self.notes.append(f"{self.labels[r]}: {err}")
        return self._detections[r]


def recompute_curves(data: TestData) -> list[dict[str, ClassResult] | None]:
    """Each run's per-class precision-recall, scored from its devkit files as the devkit does (None if impossible)."""
    curves: list[dict[str, ClassResult] | None] = []
    for r, run in enumerate(data.runs):
        dets, anns = data.detections(r), data.annotations(r)
        result = None
        if dets is not None and anns is not None:
            try:
                metric = (run.results or {}).get("metric", "voc07")
                result = evaluate(dets, ground_truth_by_class(anns, run.classes), metric=metric).per_class
            except (UserError, ValueError) as err:
                data.notes.append(f"{data.labels[r]}: cannot score its detections against the test data ({err})")
        curves.append(result)
    return curves


def grid_contents(data: TestData, n_images: int) -> tuple[list, list] | None:
    """The first ``n_images`` test images with objects, as ``(annotation, RGB)``, and each run's
    :func:`top_detections` on them (k = objects + 2); None when there is nothing to draw."""
    anns = next((a for r in range(len(data.runs)) if (a := data.annotations(r)) is not None), None)
    dets = [data.detections(r) for r in range(len(data.runs))]
    if anns is None or all(d is None for d in dets):
        return None
    chosen = [a for a in anns if len(a.boxes)][:n_images]
    k = {a.image_id: len(a.boxes) + 2 for a in chosen}
    top = [None if d is None else top_detections(d, list(k), k) for d in dets]
    try:
        images = [(a, decode_image(a.path)[:, :, ::-1]) for a in chosen]
    except UserError as err:
        data.notes.append(f"detection grid: {err}")
        return None
    return images, top


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _suptitle(fig: Figure, text: str, points: float = 11) -> None:
    """The figure's title, on as many lines as its width needs: one run's detection column or one class's
    curves are narrower than a one-line title."""
    chars = max(16, int(fig.get_figwidth() * 72 / (0.6 * points)))  # a character is about 0.6 em wide
    fig.suptitle(textwrap.fill(text, chars), fontsize=points)


@quiet_matplotlib()
def save_figure(fig: Figure, path: Path) -> Path:
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
    errors: Sequence[Mapping[str, Mapping[str, float | None]]] | None = None,
) -> Path:
    """Grouped bars of per-class AP and mAP, one bar per run, without and with box regression.

    ``aps[r]`` maps ``"plain"`` and ``"bbox"`` to ``{class or "mAP": AP or None}``; ``errors``, laid out
    the same, draws an error bar of that half-length on each bar (the spread over seeds).
    """
    groups = [*classes, "mAP"]
    n = len(labels)
    width = 0.8 / n
    fig = new_figure(max(6.0, 0.35 * n * len(groups) + 2.5), 6.2)
    axes = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(groups), dtype=float)
    # The mAP group stands apart from the classes.
    x[-1] += 0.5
    titles = {"plain": "without box regression", "bbox": "with box regression"}
    for ax, variant in zip(axes, ("plain", "bbox")):
        for r, label in enumerate(labels):
            values = [aps[r].get(variant, {}).get(g) for g in groups]
            heights = [np.nan if v is None else v for v in values]
            shown = label if any(v is not None for v in values) else f"{label} (no results)"
            yerr = None
            if errors is not None:
                yerr = [np.nan if e is None else e for e in (errors[r].get(variant, {}).get(g) for g in groups)]
            bars = ax.bar(
                x + (r - (n - 1) / 2) * width, heights, width * 0.95, yerr=yerr, capsize=2, color=run_colour(r), label=shown
            )
            if len(groups) * n <= 48:
                ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1, rotation=90 if n > 2 else 0)
        ax.set_ylim(0, 1.15)
        ax.set_ylabel(f"AP ({metric})")
        ax.set_title(titles[variant], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[-1].set_xticks(x, groups, rotation=45 if len(groups) > 8 else 0, ha="right" if len(groups) > 8 else "center")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(n, 4), fontsize=9)
    _suptitle(fig, "Average precision per class")
    return save_figure(fig, path)


def pr_grid(
    path: Path,
    labels: Sequence[str],
    classes: Sequence[str],
    curves: Sequence[Mapping[str, ClassResult] | None],
) -> Path:
    """One subplot per class with every run's precision-recall curve (runs without curves are skipped)."""
    cols = min(len(classes), 5)
    rows = math.ceil(len(classes) / cols)
    fig = new_figure(3.0 * cols + 0.4, 2.9 * rows + 0.6)
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
    _suptitle(fig, "Precision-recall per class (with box regression)")
    return save_figure(fig, path)


def time_bars(path: Path, labels: Sequence[str], parts: Sequence[Mapping[str, float | None]]) -> Path:
    """Stacked horizontal bars of test seconds per image: proposals, features, classification."""
    n = len(labels)
    fig = new_figure(8.0, 1.5 + 0.65 * n)
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
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize=8, ncols=3)
    return save_figure(fig, path)


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
    colour = {name: class_colour(i, len(classes)) for i, name in enumerate(classes)}
    fig = new_figure(CELL_INCHES * cols + 0.3, CELL_INCHES * rows + 0.4)
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
                # Label size in data units, to keep labels of neighbouring boxes from covering each other.
                px = 0.9 * CELL_INCHES * DPI / max(ann.width, ann.height)
                placed: list[tuple[float, float, float, float]] = []
                for score, name, box in top[r].get(ann.image_id, []):
                    c = colour.get(name, "yellow")
                    ax.add_patch(_rect(box, c, 1.6, "-"))
                    text = f"{name} {score:.2f}"
                    x, y = _label_position(box, (len(text) * 5.0 + 3) / px, 12 / px, placed)
                    ax.text(
                        x, y, text, fontsize=LABEL_POINTS, color="black", va="top", clip_on=True,
                        bbox={"facecolor": c, "alpha": 0.75, "pad": 0.8, "edgecolor": "none"},
                    )  # fmt: skip
            ax.set_xlim(0, ann.width)
            ax.set_ylim(ann.height, 0)
            if i == 0:
                ax.set_title(labels[r], fontsize=10)
            if r == 0:
                ax.set_ylabel(f"{ann.image_id} ({len(ann.boxes)} objects)", fontsize=9)
    _suptitle(fig, "Top detections with box regression (ground truth dotted white)")
    return save_figure(fig, path)


def _rect(box: np.ndarray, colour, lw: float, style: str) -> Rectangle:
    x1, y1, x2, y2 = (float(v) for v in box)
    return Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, lw=lw, ls=style)


def _label_position(box: np.ndarray, w: float, h: float, placed: list) -> tuple[float, float]:
    """Top-left corner for a ``w x h`` label of ``box``: inside its top, above it, or inside its bottom,
    whichever first misses the labels already ``placed`` (which it joins)."""
    x1, y1, _, y2 = (float(v) for v in box)
    candidates = [(x1 + 1, y1 + 1), (x1, y1 - h - 1), (x1 + 1, y2 - h - 1)]
    for x, y in candidates:
        if not any(x < px + pw and px < x + w and y < py + ph and py < y + h for px, py, pw, ph in placed):
            break
    else:
        x, y = candidates[0]
    placed.append((x, y, w, h))
    return x, y
