"""Feature extraction per test image: SPP-net against R-CNN, on the same images and proposals.

For each image, both methods compute what their detector scores: R-CNN warps every
proposal and runs the whole CNN on each crop (pool5 and fc7); SPP-net runs the conv
trunk once per image and scale, pools every proposal's pyramid from those maps and
runs the fc layers. Image decoding is counted on both sides; proposals (shared) and
disk caching are not. The two alternate on every image, each repeated; the median per
image is kept, and the ratio R-CNN / SPP-net is printed with the absolute times.

Networks are built as the pipelines configure them. Pretrained weights are loaded
from files when the pipeline names one; a trunk taken from another pipeline's run
(`pipeline:NAME`) is randomly initialised here, which changes no timing.

    python benchmarks/bench_features.py --rcnn voc07-mini-cpu --spp voc07-mini-spp-cpu --images 10
    python benchmarks/bench_features.py --rcnn demo --spp demo-spp --images 20
    python benchmarks/bench_features.py --rcnn demo --spp demo-spp --images 20 --set proposals.max_proposals=500
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    REPO,
    exit_in_one_line,
    machine_info,
    machine_line,
    network,
    rcnn_image_features,
    spp_image_features,
    synchronize,
)

from rcnn.config import PipelineFile
from rcnn.data.datasets import load_image
from rcnn.methods.spp_regions import as_map_tensors, image_maps, pool_windows
from rcnn.modeling.inference import inference_autocast, to_float16
from rcnn.modeling.models import device_for
from rcnn.modeling.spp_geometry import image_scales
from rcnn.proposals.selective_search import selective_search
from rcnn.runtime import keep_freed_memory, strict_float32
from rcnn.stages.context import Context
from rcnn.stages.prepare import ensure_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rcnn", default="voc07-mini-cpu", help="R-CNN pipeline")
    ap.add_argument("--spp", default="voc07-mini-spp-cpu", help="SPP-net pipeline (same data and proposals)")
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a value of both pipelines, e.g. --set proposals.max_proposals=500",
    )
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc as it is, instead of keeping freed memory as the rcnn command does",
    )
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the networks run (default: model.device)")
    args = ap.parse_args()
    if args.images < 1 or args.repeats < 1:
        ap.error(f"--images and --repeats must be at least 1, got {args.images} and {args.repeats}")
    allocator = "glibc default" if args.default_malloc else "freed memory kept" if keep_freed_memory() else "default"
    os.environ.setdefault("RCNN_VOC07_MINI", str(REPO.parent / "shared" / "data" / "voc07-mini"))
    os.environ.setdefault("RCNN_BCCD", str(REPO.parent / "shared" / "data" / "bccd"))
    os.environ.setdefault("RCNN_SQUEEZENET_WEIGHTS", str(REPO.parent / "shared" / "weights" / "squeezenet1_0-imagenet.pth"))

    pfile = PipelineFile(REPO / "pipelines.yaml")
    with tempfile.TemporaryDirectory() as runs:
        rc = Context(cfg=pfile.load(args.rcnn, tuple(args.overrides)), runs_dir=Path(runs), progress=False, log=lambda _: None)
        sp = Context(cfg=pfile.load(args.spp, tuple(args.overrides)), runs_dir=Path(runs), progress=False, log=lambda _: None)
        ensure_data(rc)
        dataset = rc.dataset(rc.cfg.data.test)
        device = device_for(args.device or rc.cfg.model.device)
        r_net, s_net = network(rc, device), network(sp, device)
        p, s = rc.cfg.proposals, sp.cfg.spp
        times: dict[str, list[float]] = {"R-CNN": [], "SPP-net": []}
        parts: dict[str, list[float]] = {}
        n_boxes = []
        with torch.no_grad():
            for image_id in dataset.ids[: args.images]:
                ann = dataset.annotation(image_id)
                boxes = selective_search(
                    load_image(ann), p.mode, p.resize_width, p.min_size, p.max_proposals, p.seed, p.max_pixels
                )
                n_boxes.append(len(boxes))

                # float32 means float32 on a GPU too, not TF32, as stages/runner.py runs the stages
                def rcnn(ann=ann, boxes=boxes):
                    with strict_float32(rc.cfg.model.precision == "float32"):
                        rcnn_image_features(r_net, load_image(ann), boxes, rc.cfg.finetune.context_pad)

                def spp(ann=ann, boxes=boxes):
                    with strict_float32(sp.cfg.model.precision == "float32"):
                        spp_image_features(s_net, load_image(ann), boxes, s.scales, s.max_side, s.target_size)

                def spp_parts(ann=ann, boxes=boxes) -> dict[str, float]:
                    # spp_region_features again, its parts timed apart: trunk (resize, normalise, conv, float16
                    # maps), pooling (placing windows, dropping repeats, pyramids), fc layers (and float16 features)
                    tick = time.perf_counter()
                    factors = image_scales(ann.height, ann.width, s.scales, s.max_side)
                    maps = image_maps(s_net, load_image(ann), factors)
                    trunk = time.perf_counter()
                    stride = s_net.spec.stride
                    maps = as_map_tensors(maps, device)
                    offset = s_net.spec.offset
                    pooled, inverse = pool_windows(maps, factors, boxes, stride, s.levels, s.target_size, None, offset)
                    synchronize(device)
                    pool = time.perf_counter()
                    with inference_autocast(s_net):
                        out = s_net.head(pooled, ("fc7",))
                    [to_float16(x)[inverse] for x in (pooled, out["fc7"])]
                    return {"conv trunk": trunk - tick, "pooling": pool - trunk, "fc layers": time.perf_counter() - pool}

                per_image: dict[str, list[float]] = {"R-CNN": [], "SPP-net": []}
                per_part: dict[str, list[float]] = {}
                rcnn(), spp()  # warm-up
                for _ in range(args.repeats):
                    for name, fn in (("R-CNN", rcnn), ("SPP-net", spp)):
                        start = time.perf_counter()
                        fn()
                        per_image[name].append(time.perf_counter() - start)
                    with strict_float32(sp.cfg.model.precision == "float32"):
                        spp_seconds = spp_parts()
                    for part, seconds in spp_seconds.items():
                        per_part.setdefault(part, []).append(seconds)
                for name in times:
                    times[name].append(statistics.median(per_image[name]))
                for part, seconds in per_part.items():
                    parts.setdefault(part, []).append(statistics.median(seconds))
    r, q = float(np.mean(times["R-CNN"])), float(np.mean(times["SPP-net"]))
    print(f"{len(n_boxes)} test images of {args.rcnn} / {args.spp}, {np.mean(n_boxes):.0f} proposals per image")
    print(f"networks on {device}")
    print(f"R-CNN   {r * 1000:8.1f} ms/image ({rc.cfg.model.backbone}, {r_net.spec.input_size} px crops)")
    print(f"SPP-net {q * 1000:8.1f} ms/image ({sp.cfg.model.backbone}, scales {list(s.scales)}, levels {list(s.levels)})")
    print(f"ratio R-CNN / SPP-net: {r / q:.2f}x")
    breakdown = ", ".join(f"{k} {1000 * np.mean(v):.1f} ms" for k, v in parts.items())
    print(f"SPP-net's parts, timed apart (median per image): {breakdown}")
    print(machine_line(machine_info(device)))
    print(f"allocator: {allocator}; peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    sys.exit(exit_in_one_line("bench_features.py", main))
