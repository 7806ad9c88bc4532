"""Dataset statistics for `rcnn data stats`: images, objects per class, difficult counts, box sizes; and what
it notes beside them: ids with several image files, JPEGs that decode only with the decoder's warnings, class
names that differ only in case or are alike."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from rcnn.data.datasets import VOCDataset, close_class, decode_image
from rcnn.errors import UserError
from rcnn.structures.boxes import box_area

# COCO's size buckets (Lin et al., 2014), by box area in pixels.
SIZE_BUCKETS = (("small", 0, 32**2), ("medium", 32**2, 96**2), ("large", 96**2, float("inf")))


def dataset_stats(dataset: VOCDataset) -> dict:
    """Counts per class and the distribution of box sizes over one split."""
    per_class: dict[str, dict] = {}
    sides, rel = [], []
    n_objects = 0
    empty = 0
    for ann in dataset.annotations():
        if len(ann.labels) == 0:
            empty += 1
        areas = box_area(ann.boxes)
        for name, diff, area in zip(ann.labels, ann.difficult, areas):
            c = per_class.setdefault(name, {"objects": 0, "difficult": 0, "images": set()})
            c["objects"] += 1
            c["difficult"] += int(diff)
            c["images"].add(ann.image_id)
            sides.append(float(np.sqrt(area)))
            rel.append(float(np.sqrt(area / (ann.width * ann.height))))
            n_objects += 1
    sides_a, rel_a = np.array(sides), np.array(rel)
    buckets = {name: int(((sides_a**2 >= lo) & (sides_a**2 < hi)).sum()) for name, lo, hi in SIZE_BUCKETS}
    quantiles = (0.1, 0.5, 0.9)
    return {
        "root": str(dataset.root),
        "split": dataset.split,
        "images": len(dataset),
        "images_without_objects": empty,
        "objects": n_objects,
        "difficult": sum(c["difficult"] for c in per_class.values()),
        "per_class": {
            k: {"objects": v["objects"], "difficult": v["difficult"], "images": len(v["images"])}
            for k, v in sorted(per_class.items())
        },
        "box_side_px": dict(zip(("p10", "p50", "p90"), np.quantile(sides_a, quantiles).tolist())) if n_objects else {},
        "box_side_rel": dict(zip(("p10", "p50", "p90"), np.quantile(rel_a, quantiles).tolist())) if n_objects else {},
        "size_buckets": buckets,
    }


def format_stats(s: dict) -> str:
    """The statistics as a plain-text table."""
    lines = [
        f"{s['root']} [{s['split']}]: {s['images']} images ({s['images_without_objects']} without objects), "
        f"{s['objects']} objects, {s['difficult']} difficult",
        "",
        f"  {'class':<16}{'objects':>9}{'difficult':>11}{'images':>8}",
    ]
    for name, c in s["per_class"].items():
        lines.append(f"  {name:<16}{c['objects']:>9}{c['difficult']:>11}{c['images']:>8}")
    if s["objects"]:
        px, rel = s["box_side_px"], s["box_side_rel"]
        lines += [
            "",
            "  box side sqrt(w*h):  p10 {p10:.0f} px, median {p50:.0f} px, p90 {p90:.0f} px".format(**px),
            "  relative to image:   p10 {p10:.2f}, median {p50:.2f}, p90 {p90:.2f}".format(**rel),
            "  COCO size buckets:   "
            + ", ".join(f"{k} {v}" for k, v in s["size_buckets"].items())
            + "  (small < 32^2 px, large >= 96^2 px)",
        ]
    return "\n".join(lines)


def alike_classes(names: list[str]) -> tuple[list[list[str]], list[tuple[str, str]]]:
    """Class names likely meant as one: the groups that differ only in case (``RBC``, ``rbc``: a pipeline refuses
    them as two classes), and pairs so alike that one may be misspelt (``circle``, ``circles``), each sorted."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        groups.setdefault(name.casefold(), []).append(name)
    firsts = [group[0] for group in groups.values()]
    # Stricter than the "did you mean" of an unknown class: VOC's car and chair (ratio 0.75) are not alike here.
    near = [(a, b) for i, a in enumerate(firsts) if (b := close_class(a, tuple(firsts[i + 1 :]), cutoff=0.85))]
    return [group for group in groups.values() if len(group) > 1], near


def several_files(folder: Path, ids: list[str], suffixes: tuple[str, ...]) -> dict[str, list[str]]:
    """The ids among ``ids`` with more than one image file in ``folder`` (``x.jpg`` and ``x.png``), each with
    its file names, sorted: only one of them is read, which a user who converted some images may not expect."""
    wanted, files = set(ids), {}
    for path in folder.iterdir() if folder.is_dir() else ():
        stem, suffix = os.path.splitext(path.name)
        if stem in wanted and suffix.lower() in suffixes:
            files.setdefault(stem, []).append(path.name)
    return {i: sorted(names) for i, names in files.items() if len(names) > 1}


def decoder_warnings(path: Path) -> str | None:
    """What the image decoder writes to stderr while decoding ``path`` (libjpeg's "Corrupt JPEG data: …" for a
    JPEG damaged mid-file, which decodes with grey or shifted parts and a warning that names no file); None if
    nothing, or where file descriptor 2 cannot be redirected (closed). Reads the process's file descriptor 2,
    so only for a single-threaded check."""
    if sys.stderr is not None:
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # stderr closed: the warnings would go nowhere anyway
        return None
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            decode_image(path)
        except UserError:
            pass  # named as a bad image by the caller's own check
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        text = " ".join(caught.read().decode(errors="replace").split())
    return text or None
