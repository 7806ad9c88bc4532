"""Proposal throughput: the `proposals` stage against calling OpenCV directly.

Both sides run Uijlings' fast configuration (HSV + Lab, k = 50/100, two
strategies) over the same images with the same number of joblib worker processes.
The baseline is the bare loop a user would write (read image, selective search,
keep the rectangles); the stage adds everything it owes the user: hashing the
data, seeding, filtering, per-image records, the consolidated HDF5, recall and
the manifest. Runs alternate and the median of each is reported.

    python benchmarks/bench_proposals.py --data ../shared/data/voc07-mini --images 40
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
from common import exit_in_one_line, machine_info, machine_line, subset, subset_options
from joblib import Parallel, delayed

from rcnn.config import PipelineFile
from rcnn.stages import proposals
from rcnn.stages.context import Context
from rcnn.stages.runner import run_stage


def opencv_direct(path: str) -> int:
    """The baseline: plain OpenCV, configured by hand, no bookkeeping."""
    cv2.setNumThreads(1)
    seg = cv2.ximgproc.segmentation
    image = cv2.imread(path)
    ss = seg.createSelectiveSearchSegmentation()
    ss.setBaseImage(image)
    ss.clearImages()
    ss.addImage(cv2.cvtColor(image, cv2.COLOR_BGR2HSV))
    ss.addImage(cv2.cvtColor(image, cv2.COLOR_BGR2Lab))
    ss.clearGraphSegmentations()
    for k in (50, 100):
        ss.addGraphSegmentation(seg.createGraphSegmentation(0.8, float(k), k))
    ss.clearStrategies()
    c, t = seg.createSelectiveSearchSegmentationStrategyColor, seg.createSelectiveSearchSegmentationStrategyTexture
    s, f = seg.createSelectiveSearchSegmentationStrategySize, seg.createSelectiveSearchSegmentationStrategyFill
    ss.addStrategy(seg.createSelectiveSearchSegmentationStrategyMultiple(c(), t(), s(), f()))
    ss.addStrategy(seg.createSelectiveSearchSegmentationStrategyMultiple(t(), s(), f()))
    return len(ss.process())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subset_options(ap)
    ap.add_argument("--jobs", type=int, default=os.cpu_count(), help="worker processes, both sides (default: every core)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds of each side; medians reported (default: 3)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-proposals-"))
    try:
        ids = subset(args.data, args.split, args.images, tmp / "voc")
        paths = [str(tmp / "voc" / "JPEGImages" / f"{i}.jpg") for i in ids]
        pfile = tmp / "p.yaml"
        pfile.write_text(
            "pipelines:\n  bench:\n"
            f"    data: {{root: {tmp / 'voc'}, trainval: bench, test: bench}}\n"
            f"    proposals: {{mode: fast, min_size: 20, n_jobs: {args.jobs}}}\n"
        )
        cfg = PipelineFile(pfile).load("bench")
        # Warm the worker pool once so neither side pays process start-up alone.
        Parallel(n_jobs=args.jobs)(delayed(opencv_direct)(p) for p in paths[: args.jobs])

        base_t, stage_t = [], []
        for r in range(args.repeats):
            t = time.perf_counter()
            Parallel(n_jobs=args.jobs, batch_size=1)(delayed(opencv_direct)(p) for p in paths)
            base_t.append(time.perf_counter() - t)

            ctx = Context(cfg=cfg, runs_dir=tmp / f"runs{r}", progress=False, log=lambda _: None)
            t = time.perf_counter()
            # Both splits name the same file, so the second is a skip: one pass over the images.
            run_stage(ctx, proposals)
            stage_t.append(time.perf_counter() - t)

        b, s = statistics.median(base_t), statistics.median(stage_t)
        n = len(paths)
        print(machine_line(machine_info()))
        print(f"jobs={args.jobs}")
        print(f"images: {len(paths)} from {args.data} [{args.split}], repeats: {args.repeats}")
        print(f"opencv direct : {len(paths) / b:6.2f} img/s  (median {b:.2f} s; runs {', '.join(f'{x:.2f}' for x in base_t)})")
        print(f"proposals stage: {n / s:6.2f} img/s  (median {s:.2f} s; runs {', '.join(f'{x:.2f}' for x in stage_t)})")
        print(f"stage / direct throughput ratio: {(n / s) / (len(paths) / b):.3f}  (goal >= 0.85)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(exit_in_one_line("bench_proposals.py", main))
