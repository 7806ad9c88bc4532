"""Pyramid pooling speed: the sparse-table method against torchvision's roi_pool, on real conv maps; and Fast
R-CNN's RoI pooling (one 6x6 grid at the trunk's stride) both ways.

Both methods pool the same windows of the same maps into SPP-net's {6x6, 3x3, 2x2, 1x1}
pyramid and must give identical numbers (checked here as well as in the tests). The
maps are SqueezeNet 1.0 conv maps of VOC2007 photos at SPP-net's single scale (shorter
side 688) and the windows are their selective-search proposals (the first 300 and the
first 2000), so the bin sizes are those a real run pools. The table method also runs on
the same maps in float16, the type the conv-map cache holds. Runs alternate; the median
of each is reported, with the ratios roi_pool / table.

Fast R-CNN's part pools the same proposals from the float32 conv maps at its single scale (shorter side 600,
longer at most 1000) to fc6's 6x6 grid: ``torchvision.ops.roi_pool`` against ``roi_pool_by_table``, which gives
roi_pool's numbers from the tables for the RoIs inside the map (checked here too) and is what a CPU runs.

    python benchmarks/bench_spp_pool.py --data ../shared/data/voc07-mini \\
        --weights ../shared/weights/squeezenet1_0-imagenet.pth --images 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from common import REPO, alternate, exit_in_one_line, machine_info, machine_line, split_ids
from torchvision.ops import roi_pool

from rcnn.data.datasets import decode_image
from rcnn.methods.fast_regions import rois_at
from rcnn.methods.spp_regions import as_map_tensors, image_input, image_maps
from rcnn.modeling.checkpoints import initialise
from rcnn.modeling.models import build_model
from rcnn.modeling.spp import PYRAMID_LEVELS, roi_pool_by_table, spp_pool
from rcnn.modeling.spp_geometry import image_scales, map_windows
from rcnn.proposals.selective_search import selective_search
from rcnn.runtime import keep_freed_memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data",
        type=Path,
        default=REPO.parent / "shared" / "data" / "voc07-mini",
        metavar="DIR",
        help="a VOC-layout folder whose test images are used (default: voc07-mini in the shared data folder)",
    )
    ap.add_argument(
        "--weights",
        default=str(REPO.parent / "shared" / "weights" / "squeezenet1_0-imagenet.pth"),
        metavar="FILE",
        help="SqueezeNet 1.0 state dict (default: the one in the shared weights folder)",
    )
    ap.add_argument("--images", type=int, default=6, help="how many images (default: 6)")
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds of each method; medians reported (default: 5)")
    args = ap.parse_args()
    kept = keep_freed_memory()  # as the rcnn command runs

    ids = split_ids(args.data, "test")[: args.images]
    model = build_model("squeezenet1_0", 21, spp_levels=PYRAMID_LEVELS)
    initialise(model, args.weights)
    model.eval()
    cases, fast_cases = [], []
    for image_id in ids:
        image = decode_image(args.data / "JPEGImages" / f"{image_id}.jpg")
        h, w = image.shape[:2]
        factors = image_scales(h, w, (688,))
        fmap = as_map_tensors(image_maps(model, image, factors))[0].float()  # [C, H, W], channels last in memory
        boxes = selective_search(image, "fast", min_size=20, max_proposals=2000)
        cases.append((fmap, boxes * np.float32(factors[0])))
        fast = image_scales(h, w, (600,), 1000)[0]
        with torch.no_grad():
            conv = model.trunk(image_input(model, cv2.cvtColor(image, cv2.COLOR_BGR2RGB), fast))
        fast_cases.append((conv, boxes, fast))
    print(f"{len(cases)} VOC2007 test images, SqueezeNet conv maps {tuple(cases[0][0].shape)} (C, H, W) and similar")

    for cap in (300, 2000):
        work = [(f, map_windows(b[:cap], model.spec.stride, f.shape[1], f.shape[2], model.spec.offset)) for f, b in cases]
        n_windows = sum(len(r) for _, r in work)
        for f, r in work:
            reference = spp_pool(f, r, algorithm="roi_pool")
            assert torch.equal(spp_pool(f, r, algorithm="table"), reference)
            assert torch.equal(spp_pool(f.half(), r, algorithm="table"), reference.half())
        # "table16": the same on the float16 maps the conv-map cache holds (what the stages pool)
        variants = {"roi_pool": (False, "roi_pool"), "table": (False, "table"), "table16": (True, "table")}
        times: dict[str, list[float]] = {name: [] for name in variants}
        half = [(f.half(), r) for f, r in work]
        for _ in range(args.repeats):
            for name, (use_half, method) in variants.items():
                start = time.perf_counter()
                for f, r in half if use_half else work:
                    spp_pool(f, r, algorithm=method)
                times[name].append(time.perf_counter() - start)
        med = {m: 1000 * statistics.median(t) / len(work) for m, t in times.items()}
        print(
            f"up to {cap} windows per image ({n_windows / len(work):.0f} on average): roi_pool {med['roi_pool']:.1f} ms/image, "
            f"table {med['table']:.1f} ({med['roi_pool'] / med['table']:.2f}x), "
            f"table on float16 maps {med['table16']:.1f} ({med['roi_pool'] / med['table16']:.2f}x)"
        )
    fast_rcnn(model, fast_cases, args.repeats)
    print(machine_line(machine_info()))
    print(f"allocator: {'freed memory kept' if kept else 'default'}")


def fast_rcnn(model, cases, repeats: int) -> None:
    """Fast R-CNN's RoI pooling of the first 300 and 2000 proposals: roi_pool against the tables, medians of
    alternating rounds, after checking that both give the same numbers."""
    grid, scale = model.spec.pool5_grid, 1.0 / model.spec.stride
    print(f"Fast R-CNN: conv maps at 600 px {tuple(cases[0][0].shape[1:])} (C, H, W) and similar, {grid}x{grid} RoI pooling")
    for cap in (300, 2000):
        work = [(conv, torch.from_numpy(rois_at(boxes[:cap], factor))) for conv, boxes, factor in cases]
        for conv, rois in work:
            assert torch.equal(roi_pool_by_table(conv, rois, grid, scale), roi_pool(conv, rois, (grid, grid), scale))
        ways = {
            "roi_pool": lambda work=work: [roi_pool(conv, rois, (grid, grid), scale) for conv, rois in work],
            "table": lambda work=work: [roi_pool_by_table(conv, rois, grid, scale) for conv, rois in work],
        }
        med = {name: 1000 * seconds / len(work) for name, seconds in alternate(ways, repeats, torch.device("cpu")).items()}
        rois_per_image = sum(len(r) for _, r in work) / len(work)
        print(
            f"up to {cap} RoIs per image ({rois_per_image:.0f} on average): roi_pool {med['roi_pool']:.1f} ms/image, "
            f"table {med['table']:.1f} ({med['roi_pool'] / med['table']:.2f}x)"
        )


if __name__ == "__main__":
    sys.exit(exit_in_one_line("bench_spp_pool.py", main))
