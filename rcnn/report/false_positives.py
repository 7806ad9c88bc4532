"""The report's false-positive section: what each run's top-ranked false positives are (badly placed boxes,
other classes' objects, background), without and with box regression, as R-CNN's Figure 4 shows them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rcnn.errors import UserError
from rcnn.evaluation.detfiles import read_devkit_file
from rcnn.evaluation.errors import TYPES, false_positive_types, type_shares
from rcnn.report import figures as figs
from rcnn.report.render import Table
from rcnn.report.runs import RunSummary

MULTIPLES = (0.25, 0.5, 1, 2, 4, 8)  # false positives taken per class, in multiples of its objects
VARIANTS = {"without box regression": "detections", "with box regression": "detections_bbox"}


def _errors(label: str, run: RunSummary, folder: str, data: figs.TestData, r: int) -> dict | None:
    files, anns = getattr(run, folder), data.annotations(r)
    if not files or anns is None:
        return None
    try:
        dets = {name: read_devkit_file(path) for name, path in files.items()}
        return false_positive_types(dets, anns, run.classes)
    except UserError as err:
        data.notes.append(f"{label}: cannot sort its false positives by type ({err})")
        return None


def shares_figure(path: Path, labels: list[str], shares: list[list[np.ndarray | None]]) -> Path:
    """One panel per run: the share of each type among the top-ranked false positives of the box-regressed
    detections, against how many are taken per class (in multiples of its objects)."""
    fig = figs.new_figure(max(4.0, 3.4 * len(labels)), 4.0)
    axes = np.atleast_1d(fig.subplots(1, len(labels), sharey=True))
    colours = ("#4477aa", "#ee8866", "#bbbbbb")
    for ax, label, run_shares in zip(axes, labels, shares):
        ax.set(title=label, xscale="log", xlabel="false positives per class / its objects", ylim=(0, 1))
        known = [(m, s) for m, s in zip(MULTIPLES, run_shares) if s is not None]
        if not known:
            ax.text(0.5, 0.5, "no detections", ha="center", transform=ax.transAxes)
            continue
        x = [m for m, _ in known]
        ax.stackplot(x, np.array([s for _, s in known]).T, labels=TYPES, colors=colours, alpha=0.9)
        ax.set_xticks(x, [f"{m:g}" for m in x])
        ax.minorticks_off()
        ax.set_xlim(x[0], x[-1])
    axes[0].set_ylabel("share of false positives")
    handles, names = next(((h, n) for ax in axes for h, n in [ax.get_legend_handles_labels()] if h), ([], []))
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncol=len(TYPES), fontsize=8, frameon=False)
    return figs.save_figure(fig, path)


def section_false_positives(
    labels: list[str],
    runs: list[RunSummary],
    data: figs.TestData,
    figure_dir: Path,
    figures: dict[str, Path],
    first_seed: bool = False,
) -> list:
    """The table of false-positive types at one false positive per object, both variants, and the figure."""
    blocks: list = [("h2", "False positives by type")]
    rows, figure_shares = [], []
    for r, (label, run) in enumerate(zip(labels, runs)):
        for variant, folder in VARIANTS.items():
            errors = _errors(label, run, folder, data, r)
            at = [None if errors is None else type_shares(errors, m) for m in MULTIPLES]
            one = at[MULTIPLES.index(1)]
            rows.append([label, variant, *(["n/a"] * len(TYPES) if one is None else [f"{100 * v:.1f} %" for v in one])])
            if folder == "detections_bbox":
                figure_shares.append(at)
    text = (
        "Each class's false positives (the VOC matching at IoU 0.5), best scored first, sorted as Hoiem et al. (ECCV "
        "2012) and R-CNN's Figure 4 sort them: localisation (its class's object at IoU 0.1 to 0.5, or one already "
        "detected), confusion (another class's object at IoU ≥ 0.1) or background. The table takes from each class as "
        "many false positives as it has objects, pooled over the classes; the figure takes more or fewer (box-regressed "
        "detections). Box regression moves boxes, so it can turn localisation errors into hits."
    ) + (" Each run's first seed run." if first_seed else "")
    blocks += [("p", text), ("table", Table(["run", "detections", *TYPES], rows))]
    if any(s is not None for run_shares in figure_shares for s in run_shares):
        figures["false_positives"] = shares_figure(figure_dir / "false_positives.png", labels, figure_shares)
        caption = "Share of each type among the top-ranked false positives, box-regressed detections, one panel per run."
        blocks.append(("figure", "false_positives", caption))
    return blocks
