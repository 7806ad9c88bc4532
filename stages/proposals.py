"""Stage `proposals`: selective search boxes for every image of both splits.

Output per split: ``proposals.h5`` with one record per image (``boxes`` float32
``[N, 4]`` in (x1, y1, x2, y2) pixels, in the search's ranking) and the recall /
MABO of the ground truth in the manifest.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np
from joblib import Parallel, delayed

from rcnn.config import ProposalsConfig, fingerprint_params
from rcnn.data.datasets import ImageAnnotation, load_image
from rcnn.proposals.recall import recall_summary
from rcnn.proposals.selective_search import image_seed, search_size, selective_search
from rcnn.store import records

from .context import Context
from .provenance import upstream_check
from .runner import pending_images, progress_bar

NAME = "proposals"
SCHEMA_VERSION = 1
OUTPUT = "proposals.h5"
KIND = "proposals"


def splits(ctx: Context) -> tuple[str, ...]:
    return ctx.splits


def params(ctx: Context) -> dict:
    return fingerprint_params(ctx.cfg.proposals)


def inputs(ctx: Context, split: str) -> dict[str, str]:
    return {f"data/{split}": ctx.dataset(split).fingerprint}


def _propose(ann: ImageAnnotation, p: ProposalsConfig) -> tuple[str, np.ndarray, float, str | None]:
    """One image's boxes, the seconds they took, and a note when the image was over ``max_pixels``."""
    # One OpenCV thread per worker: the processes already use every core.
    cv2.setNumThreads(1)
    start = time.perf_counter()
    image = load_image(ann)
    boxes = selective_search(
        image, p.mode, p.resize_width, p.min_size, p.max_proposals, image_seed(p.seed, ann.image_id), p.max_pixels
    )
    h, w = image.shape[:2]
    sh, sw = search_size(h, w, p.resize_width, p.max_pixels)
    note = None
    if (sh, sw) != search_size(h, w, p.resize_width):
        note = f"image {ann.image_id} ({w} x {h}) is over proposals.max_pixels = {p.max_pixels}: "
        note += f"searched at {sw} x {sh}, boxes mapped back"
    return ann.image_id, boxes, time.perf_counter() - start, note


def image_records(ctx: Context, split: str, ids: list[str]):
    """One cluster shard's records, in the order of ``ids``: ``(image_id, {"boxes": ...}, info)``."""
    dataset, p = ctx.dataset(split), ctx.cfg.proposals
    for image_id in ids:
        _, boxes, took, note = _propose(dataset.annotation(image_id), p)
        yield image_id, {"boxes": boxes}, {"images": 1, "seconds": took, **({"note": f"{NAME}/{split}: {note}"} if note else {})}


def n_workers(n_jobs: int) -> int:
    return max(1, os.cpu_count() or 1) if n_jobs in (-1, 0) else max(1, n_jobs)


def compute(ctx: Context, split: str, work: Path) -> tuple[dict[str, Path], dict]:
    dataset = ctx.dataset(split)
    # Every later stage needs these checks; failing here saves the hours of search.
    dataset.check(ctx.classes)
    parts = work / "parts"
    start = time.perf_counter()
    if ctx.cluster is not None:
        from rcnn.cluster.shards import run_image_shards

        # Parts of two images balance the shards; named apart from a local run's, as this stage joins them anyway.
        totals = run_image_shards(ctx, NAME, split, parts, dataset.ids, KIND, part_size=2, prefix="c")
        done, seconds = int(totals.get("images", 0)), totals.get("seconds", 0.0)
    else:
        done, seconds = _compute_here(ctx, split, parts)
    wall = time.perf_counter() - start
    out = work / OUTPUT
    records.consolidate(parts, out, dataset.ids, KIND)
    metrics = _quality(ctx, split, out)
    metrics["images_computed"] = done
    metrics["images_per_s"] = done / wall if done and wall > 0 else None
    metrics["seconds_per_image_worker"] = seconds / done if done else None
    return {OUTPUT: out}, metrics


def _compute_here(ctx: Context, split: str, parts: Path) -> tuple[int, float]:
    """The proposals of the images without a record in ``parts``, in ``proposals.n_jobs`` processes of
    this machine; returns how many images were done and their summed seconds."""
    dataset, p = ctx.dataset(split), ctx.cfg.proposals
    todo = [dataset.annotation(i) for i in pending_images(ctx, f"{NAME}/{split}", parts, dataset.ids)]
    seconds = []
    if todo:
        jobs = n_workers(p.n_jobs)
        tasks = (delayed(_propose)(a, p) for a in todo)
        runner = Parallel(n_jobs=jobs, return_as="generator_unordered", batch_size=1) if jobs > 1 else None
        results = runner(tasks) if runner is not None else (f(*a, **k) for f, a, k in tasks)
        bar = progress_bar(ctx, len(todo), f"proposals {split}")
        try:
            with records.RecordWriter(parts, KIND, chunk_size=16, max_seconds=15.0) as writer:
                for image_id, boxes, took, note in results:
                    if note:
                        ctx.log(f"{NAME}/{split}: {note}")
                    # Timings stay out of the records so that outputs are byte-identical across runs.
                    writer.add(image_id, {"boxes": boxes})
                    seconds.append(took)
                    bar.update(1)
                    bar.set_postfix(boxes=len(boxes))
        except KeyboardInterrupt:
            # Closing the results makes joblib kill the workers now, where Ctrl-C found the loop
            # outside its wait for them (the writer, the bar); left open, the interpreter's exit
            # would wait for every queued image. The writer has saved each finished image on its
            # way out; the count is read back from disk, as the rerun will find it.
            results.close()
            kept = len(records.completed_parts(parts))
            ctx.log(f"{NAME}/{split}: interrupted; the proposals of {kept} of {len(dataset.ids)} images are kept")
            raise
        finally:
            bar.close()
    return len(todo), float(np.sum(seconds))


def _quality(ctx: Context, split: str, path: Path) -> dict:
    dataset = ctx.dataset(split)
    counts = []

    def items():
        with records.RecordFile(path, KIND) as f:
            for image_id in dataset.ids:
                ann = dataset.annotation(image_id)
                boxes = f.array(image_id, "boxes", np.float32, 2)
                counts.append(len(boxes))
                yield ann.boxes, ann.labels, ann.difficult, boxes

    summary = recall_summary(items())
    return {"images": len(dataset), "boxes_per_image": float(np.mean(counts)) if counts else 0.0, **summary}


def load(ctx: Context, split: str) -> records.RecordFile:
    """Open the proposals of ``split`` for reading by later stages."""
    return records.RecordFile(ctx.unit_dir(NAME, split) / OUTPUT, KIND, verify=upstream_check(ctx, NAME, split))


def describe(manifest: dict) -> str:
    """One line of the stage's results for the terminal."""
    m = manifest.get("metrics", {})
    o = m.get("overall", {})
    rate = m.get("images_per_s")
    rate_text = f", {rate:.2f} img/s" if rate else ""
    computed = m.get("images_computed")
    if rate and computed is not None and computed < m.get("images", 0):  # a resumed run timed only what it computed
        rate_text += f" over the {computed} images computed (start-up included; the rest resumed)"
    return (
        f"{m.get('images', 0)} images, {m.get('boxes_per_image', 0):.0f} boxes/image, "
        f"recall {o.get('recall@0.5', float('nan')):.3f} @0.5 / {o.get('recall@0.7', float('nan')):.3f} @0.7, "
        f"MABO {o.get('mabo', float('nan')):.3f}{rate_text}"
    )
