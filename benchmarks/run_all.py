"""Every speed figure of the library against its stock PyTorch baseline, in one process and one run.

Each measurement runs one part of the library (the stages' own code paths) and the same work written
in plain PyTorch, torchvision and scikit-learn as a careful user would (benchmarks/stock.py), on the
same images, boxes and device, taking turns; it prints both figures and their ratio, stock / ours
for times and sizes and ours / stock for rates, so above 1 means the library is faster or smaller.
Networks have random weights (AlexNet always; SqueezeNet unless --weights names a file): timing does
not depend on them, and nothing here is accurate or meant to be.

Without --data the images are synthetic (rcnn.data.synth, in a temporary folder); the boxes stand in for
proposals (--proposals ss runs selective search instead). The full run uses the papers' settings:
20 images, 2000 boxes per image, 227 px crops, SPP-net at 688 px and at 480..1200.

    python benchmarks/run_all.py --quick                      # a few minutes' worth of work cut to < 2 minutes
    python benchmarks/run_all.py --device cuda --json out.json
    python benchmarks/run_all.py --quick --precision bfloat16  # the library in bfloat16 on a CPU too
    python benchmarks/run_all.py --data ../shared/data/voc07-mini --weights ../shared/weights/squeezenet1_0-imagenet.pth
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from common import machine_info, machine_line, random_boxes, subset
from measures import MEASUREMENTS, Bench, Sizes

from rcnn.data.datasets import VOCDataset, load_image
from rcnn.data.synth import generate_dataset
from rcnn.errors import UserError
from rcnn.modeling.inference import inference_dtype
from rcnn.modeling.models import device_for
from rcnn.proposals.selective_search import selective_search
from rcnn.runtime import keep_freed_memory

FULL = Sizes(images=20, boxes=2000, squeezenet_crop=227, scale=688, scales=(480, 576, 688, 864, 1200), image_size=500,
             finetune_batch=128, finetune_steps=20, svm_images=10, svm_repeats=1, svm_dim=4096, repeats=3)  # fmt: skip
QUICK = Sizes(images=3, boxes=200, squeezenet_crop=128, scale=384, scales=(192, 256, 320, 384, 448), image_size=256,
              finetune_batch=32, finetune_steps=8, svm_images=3, svm_repeats=3, svm_dim=4096, repeats=1)  # fmt: skip
# For the test of this script: every measurement, each doing almost nothing.
TINY = Sizes(images=1, boxes=8, squeezenet_crop=64, scale=128, scales=(96, 112, 128, 144, 160), image_size=128,
             finetune_batch=4, finetune_steps=1, svm_images=1, svm_repeats=1, svm_dim=64, repeats=1, warmup=False)  # fmt: skip

TITLES = {
    "rcnn_alexnet": "R-CNN features, AlexNet",
    "rcnn_squeezenet": "R-CNN features, SqueezeNet",
    "rcnn_alexnet_fc7": "R-CNN features, AlexNet, fc7 only",
    "spp_1_scale": "SPP-net features, 1 scale",
    "spp_5_scales": "SPP-net features, 5 scales",
    "spp_1_scale_fc7": "SPP-net features, 1 scale, fc7 only",
    "rcnn_alexnet_stream": "R-CNN features, AlexNet, images in a row",
    "spp_1_scale_stream": "SPP-net features, 1 scale, images in a row",
    "cache_rcnn": "feature cache, R-CNN",
    "cache_rcnn_regression": "feature cache, R-CNN, sparse",
    "cache_spp": "feature cache, SPP-net",
    "finetune_rcnn": "fine-tuning, R-CNN",
    "finetune_spp": "fine-tuning, SPP-net (fc)",
    "svm": "SVMs, hard-negative mining",
}


def prepare_data(args, sizes: Sizes, tmp: Path) -> tuple[Path, list, list[np.ndarray], tuple[str, ...]]:
    """A VOC folder of the measured images (split ``bench``), their annotations, decoded images and classes."""
    source, split = args.data, args.split
    if source is None:
        source, split = tmp / "synth", "trainval"
        # Two thirds of the synthetic images are trainval: enough for `images` of them.
        generate_dataset(source, n_images=2 * sizes.images + 2, seed=0, size=sizes.image_size, progress=False)
    split_file = Path(source) / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise UserError(f"--data: no split file {split_file} (a VOC folder has ImageSets/Main/<split>.txt; see --split)")
    voc = tmp / "voc"
    subset(Path(source), split, sizes.images, voc)
    dataset = VOCDataset(voc, "bench")
    dataset.check()
    anns = dataset.annotations()
    return voc, anns, [load_image(a) for a in anns], dataset.classes()


def proposals(args, sizes: Sizes, anns, images) -> list[np.ndarray]:
    """``sizes.boxes`` boxes per image: random ones (seeded) or selective search's first ones."""
    if args.proposals == "ss":
        return [selective_search(im, "fast", None, 20, sizes.boxes) for im in images]
    rng = np.random.default_rng(0)
    return [random_boxes(rng, a.width, a.height, sizes.boxes, a.boxes) for a in anns]


def ratio(fig: dict) -> float:
    """Above 1 when ours is better: stock / ours for times and sizes, ours / stock for rates."""
    return fig["stock"] / fig["ours"] if fig["lower"] else fig["ours"] / fig["stock"]


def table(results: dict[str, dict]) -> str:
    width = max([len("measurement")] + [len(fig["title"]) for fig in results.values()])
    head = f"{'measurement':<{width}} {'unit':>10} {'ours':>10} {'stock':>10} {'ratio':>7}  details"
    lines = [head, "-" * len(head)]
    for fig in results.values():
        details = ", ".join(f"{k} {v}" for k, v in fig["details"].items())
        figures = f"{fig['unit']:>10} {fig['ours']:>10.4g} {fig['stock']:>10.4g} {fig['ratio']:>6.2f}x"
        lines.append(f"{fig['title']:<{width}} {figures}  {details}")
    return "\n".join(lines)


def counted(n: int, unit: str) -> str:
    return f"one timed {unit}" if n == 1 else f"the median of {n} timed {unit}s"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both sides run (default: cpu)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: under 2 minutes on a 2-core CPU")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test's sizes
    ap.add_argument("--json", type=Path, metavar="OUT", help="also write every figure, the settings and the machine here")
    ap.add_argument("--data", type=Path, metavar="DIR", help="a VOC folder (default: synthetic images)")
    ap.add_argument("--split", default="trainval", help="split of --data whose first images are measured (default: trainval)")
    ap.add_argument("--weights", metavar="FILE", help="SqueezeNet 1.0 state dict (torchvision's names) for both sides")
    ap.add_argument("--proposals", choices=("random", "ss"), default="random",
                    help="boxes: random, half of them around objects (default), or selective search (fast mode)")  # fmt: skip
    ap.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="the library's model.precision (default auto: bfloat16 on a GPU, float32 on a CPU); "
                    "the stock side always runs under autocast")  # fmt: skip
    ap.add_argument("--only", action="append", choices=list(MEASUREMENTS), help="run only these measurements")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("run_all.py: --device cuda, but no CUDA GPU is available", file=sys.stderr)
        return 2
    if args.weights and not Path(args.weights).is_file():
        print(f"run_all.py: --weights: no file '{args.weights}'", file=sys.stderr)
        return 2
    device = device_for(args.device)
    allocator = "freed memory kept" if keep_freed_memory() else "default"  # as the rcnn command runs
    sizes, mode = (TINY, "tiny") if args.tiny else (QUICK, "quick") if args.quick else (FULL, "full")
    try:
        return run(args, device, sizes, mode, allocator, started)
    except UserError as e:
        print(f"run_all.py: {e}", file=sys.stderr)
        return 1


def write_json(args, out: dict) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(args.json)


def run(args, device: torch.device, sizes: Sizes, mode: str, allocator: str, started: float) -> int:
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}  # measurement -> the error that stopped it
    weights = f"SqueezeNet from {args.weights}, AlexNet random" if args.weights else "random (torchvision's initialisation)"
    amp = "float16" if device.type == "cuda" else "bfloat16"
    ours_precision = f"model.precision {args.precision}: " + (
        "bfloat16, features with the weights cast once, fine-tuning under autocast"
        if inference_dtype(device, args.precision) == torch.bfloat16
        else "float32"
    )
    data, images, classes = "", [], ()
    info = machine_info(device)
    # Other work on the machine slows both sides, not always alike: say how busy it was when the run started.
    when, load = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.getloadavg()[0]

    def report(complete: bool) -> dict:
        """Everything measured so far, the settings and the machine, as written to --json."""
        return {
            "mode": mode,
            "complete": complete,
            "device": str(device),
            "data": data,
            "proposals": args.proposals,
            "images": len(images),
            "classes": list(classes),
            "sizes": {k: getattr(sizes, k) for k in sizes.__dataclass_fields__},
            "weights": weights,
            "precision": {"ours": ours_precision, "stock": f"{amp} autocast"},
            "machine": info,
            "date": when,
            "load_average_at_start": load,
            "allocator": allocator,
            "seconds": time.perf_counter() - started,
            "measurements": results,
            "failed": failed,
        }

    with tempfile.TemporaryDirectory(prefix="rcnn-bench-") as tmp_name:
        tmp = Path(tmp_name)
        voc, anns, images, classes = prepare_data(args, sizes, tmp)
        boxes = proposals(args, sizes, anns, images)
        bench = Bench(device, sizes, voc, anns, images, boxes, classes, tmp, args.weights, args.precision)
        data = str(args.data) if args.data else f"synthetic {sizes.image_size} px"
        print(
            f"{mode} run on {device}: {len(images)} images ({data}), {np.mean([len(b) for b in boxes]):.0f} "
            f"{'selective-search' if args.proposals == 'ss' else 'random'} boxes per image, {len(classes)} classes"
        )
        like = "" if "bfloat16" in ours_precision or device.type == "cuda" else " (--precision bfloat16: both in bfloat16)"
        print(f"precision: ours {ours_precision.split(': ')[-1].split(',')[0]}, stock {amp} autocast{like}")
        for name in args.only or MEASUREMENTS:
            tick = time.perf_counter()
            try:
                figures = MEASUREMENTS[name](bench)
            except Exception as e:  # noqa: BLE001 - one failing measurement must not lose the others' figures
                failed[name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                print(f"  {name}: failed after {time.perf_counter() - tick:.1f} s: {failed[name]}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            else:
                for key, fig in figures.items():
                    results[key] = {"title": TITLES.get(key, key), **fig, "ratio": ratio(fig)}
                print(f"  {name}: {time.perf_counter() - tick:.1f} s", flush=True)
            if args.json:  # after every measurement, so that a run cut short keeps what it measured
                write_json(args, report(False))
    wall = time.perf_counter() - started
    print()
    print(table(results))
    for name, why in failed.items():
        print(f"{name}: failed: {why}")
    print()
    print("ratio: stock / ours for times and sizes, ours / stock for rates (above 1: the library is faster or smaller)")
    print(f"ours: the library's code paths ({ours_precision}); stock: benchmarks/stock.py (roi_align crops, roi_pool "
          f"pyramids, channels last, {amp} autocast)")  # fmt: skip
    print(f"weights: {weights}; timing does not depend on them")
    print(machine_line(info))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"allocator: {allocator}; peak resident memory {peak:.0f} MB; whole run {wall:.0f} s")
    rounds = "; ".join(f"{what}: {counted(n, unit)}" for what, n, unit in (
        ("per-image figures", sizes.repeats, "round"), ("fine-tuning", sizes.finetune_steps, "step"),
        ("SVMs", sizes.svm_repeats, "fit")))  # fmt: skip
    print(f"started {when}, load average {load:.2f} on {os.cpu_count()} cores; {rounds}")
    if args.json:
        write_json(args, report(True))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
