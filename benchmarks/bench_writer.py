"""Writing the feature cache while the device computes: the features stage's record writer, parts written in
the caller's thread against parts written by a background thread, in one process and one run.

The device is a stand-in: each image "computes" for ``--device-ms`` (20 ms, the GPU target for R-CNN's
features at 2000 boxes) by sleeping, as a process waiting on a GPU does (it holds no lock). Each image's
records have the sizes of R-CNN's cache at the papers' settings under ``features.bbox_rows: regression``
(2000 boxes: fc7 4096-d float16, pool5 9216-d float16 of 20 regression rows, boxes and overlaps), 16 images per
part as the stage writes them, each part fsynced. What it shows: how much of the writing the device's time
can hide on this machine's disk. It says nothing about a GPU's speed.

    python benchmarks/bench_writer.py --images 64 --device-ms 20
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine_info, machine_line

from rcnn.store import records

PART_SIZE = 16  # stages/features.py
SYNC, BACKGROUND = "caller's thread", "background thread"


def image_arrays(rng: np.random.Generator, boxes: int, classes: int, rows: int) -> dict[str, np.ndarray]:
    return {
        "boxes": rng.uniform(0, 500, (boxes, 4)).astype(np.float32),
        "gt_classes": np.full(boxes, -1, np.int64),
        "overlaps": rng.uniform(0, 1, (boxes, classes)).astype(np.float32),
        "best_gt": np.zeros(boxes, np.int64),
        "fc7": rng.standard_normal((boxes, 4096)).astype(np.float16),
        "pool5": rng.standard_normal((rows, 9216)).astype(np.float16),
        "pool5_rows": np.arange(rows, dtype=np.int32),
    }


def run(folder: Path, images: list[dict], device_s: float, background: bool) -> float:
    """Seconds per image of the whole loop: compute stand-in, hand the records over, the last part written."""
    start = time.perf_counter()
    with records.RecordWriter(folder, "features", chunk_size=PART_SIZE, background=background) as writer:
        for k, arrays in enumerate(images):
            time.sleep(device_s)
            writer.add(f"{k:06d}", arrays)
    # Kept until the end: deleting a run's files would hand the next run their freed pages, which makes its
    # writes several times faster than a stage's (which writes fresh files all along).
    return (time.perf_counter() - start) / len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--device-ms", type=float, default=20.0)
    ap.add_argument("--boxes", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=20, help="regression rows per image (pool5 kept)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    # A few distinct images, reused: what is written, not how it was made, is measured.
    distinct = [image_arrays(rng, args.boxes, 20, args.rows) for _ in range(4)]
    images = [distinct[k % len(distinct)] for k in range(args.images)]
    mb = sum(a.nbytes for a in images[0].values()) / 1e6
    tmp = Path(tempfile.mkdtemp(prefix="bench-writer-"))
    try:
        # Taking turns; every round is printed, as writing speed moves with the state of the page cache.
        times: dict[str, list[float]] = {SYNC: [], BACKGROUND: []}
        for r in range(args.repeats):
            times[SYNC].append(run(tmp / f"sync-{r}", images, args.device_ms / 1000, False))
            times[BACKGROUND].append(run(tmp / f"bg-{r}", images, args.device_ms / 1000, True))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(machine_line(machine_info()))
    print(f"{args.images} images of {mb:.1f} MB ({args.boxes} boxes, {args.rows} pool5 rows), {PART_SIZE} per part, "
          f"device stand-in {args.device_ms:g} ms per image; {args.repeats} rounds; temporary folder on {tmp.parent}")  # fmt: skip
    median = {k: float(np.median(v)) for k, v in times.items()}
    for way, s in median.items():
        rounds = ", ".join(f"{1000 * x:.1f}" for x in times[way])
        print(f"{way:18s}: median {1000 * s:6.1f} ms per image ({1000 * s - args.device_ms:5.1f} beyond the device's); rounds: {rounds}")
    print(f"{BACKGROUND} against {SYNC}: {median[SYNC] / median[BACKGROUND]:.2f}x faster (medians)")


if __name__ == "__main__":
    main()
