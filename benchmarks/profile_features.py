"""Where a feature image's time goes: decoding, warping or pooling, the CNN, copies back and the record write.

Runs a pipeline's features as its detector computes them (R-CNN: every region warped and run through the
whole CNN; SPP-net: the conv trunk once per scale, pyramid pooling, the fc layers) on the first images of a
split, on the boxes the features stage would compute (ground truth and the proposals `rcnn proposals` wrote
into the runs folder), and writes each image's cached layers to record files as the features stage does;
all under torch.profiler. Prints, per image, each phase's host time (and on a GPU, where kernels run after the
host has queued them, the device time of its kernels and its span on the device), the wall time and the
operators that take longest; --trace writes a Chrome trace (gzipped when the name ends in .gz) to open in
https://ui.perfetto.dev.

The phases are the ``record_function`` ranges of the library's feature code: ``rcnn.to_rgb``,
``rcnn.upload``, ``rcnn.warp``, ``rcnn.resize``, ``rcnn.conv``, ``rcnn.pool``, ``rcnn.cnn`` / ``rcnn.fc`` and
``rcnn.to_host`` (which waits for the device's queued work), and this script's ``rcnn.decode`` and ``rcnn.write``.
The network has the pipeline's starting weights (random where it names another pipeline's), which changes no timing.

    rcnn proposals demo && python benchmarks/profile_features.py demo --images 10
    python benchmarks/profile_features.py voc07-mini --images 20 --device cuda --trace trace.json.gz
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_info, machine_line, network, pipeline_options, rcnn_command, run_script, synchronize
from torch.profiler import ProfilerActivity, profile, record_function

from rcnn.config import PipelineFile
from rcnn.config.loading import default_pipelines_file
from rcnn.data.datasets import load_image
from rcnn.errors import UserError
from rcnn.modeling.models import device_for
from rcnn.runtime import strict_float32
from rcnn.stages import features, proposals
from rcnn.stages.context import Context
from rcnn.stages.methods import build_method
from rcnn.stages.prepare import ensure_data
from rcnn.store import records
from rcnn.training.regions import image_regions


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline", help="a pipeline whose proposals are in the runs folder")
    ap.add_argument("--images", type=int, default=20, help="images profiled (default: 20)")
    ap.add_argument("--warmup", type=int, default=2, help="images run before profiling starts (default: 2)")
    ap.add_argument("--split", help="split whose first images are used (default: the pipeline's test split)")
    pipeline_options(ap, "the runs folder holding the proposals")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the network runs (default: model.device)")
    ap.add_argument("--top", type=int, default=12, help="operators listed (default: 12)")
    ap.add_argument("--trace", type=Path, metavar="FILE", help="write the Chrome trace here (.gz: gzipped)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    return run_script("profile_features.py", run, parse_args(argv))


def run(args) -> int:
    cfg = PipelineFile(args.pipelines_file or default_pipelines_file()).load(args.pipeline, tuple(args.overrides))
    ctx = Context(cfg=cfg, runs_dir=args.runs_dir, progress=False, log=lambda _: None)
    ensure_data(ctx)
    split = args.split or cfg.data.test
    if not (ctx.unit_dir(proposals.NAME, split) / proposals.OUTPUT).is_file():
        raise UserError(f"no proposals of '{split}' in {args.runs_dir}: run `{rcnn_command('proposals', args)}` first")
    device = device_for(args.device or cfg.model.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA GPU is available")
    method = build_method(cfg)
    detector = method.test_features(cfg, network(ctx, device))
    layers, sparse, _, copied = features.layer_plan(ctx, split)  # what the features stage copies out and caches
    dataset = ctx.dataset(split)
    ids = dataset.ids[: args.warmup + args.images]
    if len(ids) <= args.warmup:
        raise UserError(f"'{split}' has {len(ids)} images: fewer than --warmup {args.warmup} plus one")
    boxes_per_image = []

    with proposals.load(ctx, split) as props, tempfile.TemporaryDirectory(prefix="rcnn-profile-") as tmp:
        writer = records.RecordWriter(Path(tmp), features.KIND, chunk_size=features.PART_SIZE)

        def one(image_id: str) -> None:
            ann = dataset.annotation(image_id)
            with record_function("rcnn.decode"):
                image = load_image(ann)
            regions = image_regions(ann, props.array(image_id, "boxes", np.float32, 2), ctx.classes, cfg.data.use_difficult)
            feats = detector(image, regions.boxes, copied)
            arrays = {"boxes": regions.boxes, "overlaps": regions.overlaps, **{k: feats[k] for k in layers if k != sparse}}
            with record_function("rcnn.write"):
                writer.add(image_id, arrays)
            boxes_per_image.append(len(regions.boxes))

        # float32 means float32 on a GPU too, not TF32, as stages/runner.py runs the features stage
        with torch.no_grad(), strict_float32(cfg.model.precision == "float32"):
            for image_id in ids[: args.warmup]:
                one(image_id)
            with record_function("rcnn.write"):
                writer.flush()
            synchronize(device)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            measured = ids[args.warmup :]
            with profile(activities=activities) as prof:
                tick = time.perf_counter()
                for image_id in measured:
                    one(image_id)
                with record_function("rcnn.write"):
                    writer.flush()
                synchronize(device)
                wall = time.perf_counter() - tick
    n = len(measured)
    print(f"{args.pipeline} ({method.name}), split {split}, device {device}: {n} images after {args.warmup} untimed, "
          f"{np.mean(boxes_per_image[args.warmup:]):.0f} boxes per image, layers copied out {', '.join(copied)}")  # fmt: skip
    print(phase_table(prof, n, device))
    print(f"wall time: {1000 * wall / n:.1f} ms per image (profiler running)")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top))
    print(machine_line(machine_info(device)))
    if args.trace:
        write_trace(prof, args.trace)
        print(f"trace: {args.trace}")
    return 0


def _device_us(event) -> float:
    # torch >= 2.4 names it device_time_total; older ones cuda_time_total.
    value = getattr(event, "device_time_total", None)
    if value is None:
        value = getattr(event, "cuda_time_total", 0.0)
    return float(value or 0.0)


def phase_table(prof, images: int, device: torch.device) -> str:
    """Milliseconds per image of each ``rcnn.*`` range: host time and, on a GPU, the device time of the kernels
    it queued and the range's span on the device (from its first kernel's start to its last one's end)."""
    phases = [e for e in prof.key_averages() if e.key.startswith("rcnn.")]
    # With ProfilerActivity.CUDA each range is there twice: its CPU row (host time, and the device time of the
    # kernels it queued) and a gpu_user_annotation row of device type CUDA (its span on the device, no host time).
    rows = [e for e in phases if e.device_type == torch.autograd.DeviceType.CPU]
    span = {e.key: _device_us(e) for e in phases if e.device_type != torch.autograd.DeviceType.CPU}
    rows.sort(key=lambda e: -e.cpu_time_total)
    gpu = device.type == "cuda"
    head = f"{'phase':<16} {'host ms/img':>12}"
    if gpu:
        head += f" {'device ms/img':>14} {'device span ms/img':>19}"
    head += f" {'calls/img':>10}"
    lines = [head, "-" * len(head)]
    for e in rows:
        line = f"{e.key:<16} {e.cpu_time_total / 1000 / images:>12.2f}"
        if gpu:
            line += f" {_device_us(e) / 1000 / images:>14.2f} {span.get(e.key, 0.0) / 1000 / images:>19.2f}"
        lines.append(line + f" {e.count / images:>10.1f}")
    return "\n".join(lines)


def write_trace(prof, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix != ".gz":
        prof.export_chrome_trace(str(path))
        return
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)


if __name__ == "__main__":
    sys.exit(main())
