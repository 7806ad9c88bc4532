"""Fast R-CNN at test time with fc6 and fc7 as trained against their truncated SVDs (Fast R-CNN section 3.1,
``fast.svd_fc6`` / ``fast.svd_fc7``), in one process, on a pipeline's fine-tuned network and stored proposals.

For each of the first test images (decoded beforehand; decoding is not timed), three things take turns, each
repeated and the median kept: the trunk alone (resize, upload, conv layers, at every scale), the whole test-time
network as trained, and the whole network compressed. The fc layers' share is the whole minus the trunk. Printed: the
milliseconds per image, the ratio as trained / compressed, and how far the compressed network's outputs move:
the largest change of a softmax probability and the share of regions whose best class stays the same.

The paper kept 1024 of VGG16 fc6's 4096 singular values and 256 of fc7's: a quarter and a sixteenth of each
layer's outputs, the default ranks here for any backbone (SqueezeNet's 1024-wide fc layers: 256 and 64).

    rcnn run voc07-mini-fast-cpu && python benchmarks/bench_fast_svd.py voc07-mini-fast-cpu@seed0
    python benchmarks/bench_fast_svd.py voc07-mini-fast-cpu --images 20 --set proposals.max_proposals=2000
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import cv2
import numpy as np
import torch
from common import alternate, machine_info, machine_line, pipeline_options, rcnn_command, run_script

from rcnn.config import PipelineFile
from rcnn.config.loading import default_pipelines_file
from rcnn.data.datasets import load_image
from rcnn.errors import UserError
from rcnn.methods.fast_regions import fast_outputs_later
from rcnn.methods.spp_regions import image_input
from rcnn.modeling.inference import for_inference, inference_autocast
from rcnn.modeling.spp_geometry import image_scales
from rcnn.runtime import strict_float32
from rcnn.stages import finetune, proposals
from rcnn.stages.context import Context
from rcnn.stages.methods import FastRCNN, build_method
from rcnn.store import artifacts as store


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline", help="a Fast R-CNN pipeline whose proposals and fine-tuning are done in the runs folder")
    ap.add_argument("--images", type=int, default=10, help="first test images measured (default: 10)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per image (default: 3)")
    ap.add_argument("--fc6-rank", type=int, help="fc6's rank (default: a quarter of its outputs, as the paper's 1024)")
    ap.add_argument("--fc7-rank", type=int, help="fc7's rank (default: a sixteenth of its outputs, as the paper's 256)")
    pipeline_options(ap)
    args = ap.parse_args(argv)
    if args.images < 1 or args.repeats < 1:
        ap.error(f"--images and --repeats must be at least 1, got {args.images} and {args.repeats}")
    return args


def main(argv=None) -> int:
    return run_script("bench_fast_svd.py", run, parse_args(argv))


def run(args) -> int:
    pfile = PipelineFile(args.pipelines_file or default_pipelines_file())
    cfg = pfile.load(args.pipeline, tuple(args.overrides))
    ctx = Context(cfg=cfg, runs_dir=args.runs_dir, progress=False, log=lambda _: None)
    method = build_method(cfg)
    if not isinstance(method, FastRCNN):
        raise UserError(
            f"'{args.pipeline}' is {method.article} {method.title} pipeline; truncated SVD is Fast R-CNN's test-time step"
        )
    split = cfg.data.test
    for stage in ("proposals", "finetune"):
        unit = split if stage == "proposals" else cfg.data.trainval
        if store.read_manifest(ctx.unit_dir(stage, unit)) is None:
            raise UserError(f"no {stage} of '{args.pipeline}' in {args.runs_dir}: run `{rcnn_command('run', args)}` first")
    trained, _ = finetune.load(ctx)
    ranks = (args.fc6_rank or trained.fc6.out_features // 4, args.fc7_rank or trained.fc7.out_features // 16)
    compressed = for_inference(copy.deepcopy(trained), whole_images=True, dtype=cfg.model.precision, svd=ranks)
    plain = for_inference(trained, whole_images=True, dtype=cfg.model.precision)
    device = next(plain.parameters()).device
    dataset = ctx.dataset(split)
    ids = dataset.ids[: args.images]
    times: dict[str, list[float]] = {"trunk": [], "as trained": [], "compressed": []}
    largest, same, rows = 0.0, 0, 0
    with proposals.load(ctx, split) as props, torch.no_grad(), strict_float32(cfg.model.precision == "float32"):
        for image_id in ids:
            ann = dataset.annotation(image_id)
            rgb = cv2.cvtColor(load_image(ann), cv2.COLOR_BGR2RGB)
            boxes = props.array(image_id, "boxes", np.float32, 2)
            factors = image_scales(ann.height, ann.width, cfg.fast.scales, cfg.fast.max_side)

            def trunk(rgb=rgb, factors=factors):
                with inference_autocast(plain):
                    return [plain.trunk(image_input(plain, rgb, f)).cpu() for f in factors]

            def outputs(model, rgb=rgb, boxes=boxes, factors=factors):
                return fast_outputs_later(model, rgb, boxes, factors).arrays()

            medians = alternate(
                {"trunk": trunk, "as trained": lambda: outputs(plain), "compressed": lambda: outputs(compressed)},
                args.repeats,
                device,
                warmup=True,
            )
            for name, seconds in medians.items():
                times[name].append(seconds)
            p = np.exp(outputs(plain)["cls_logprob"].astype(np.float32))
            q = np.exp(outputs(compressed)["cls_logprob"].astype(np.float32))
            largest = max(largest, float(np.abs(p - q).max()) if len(p) else 0.0)
            same += int((p.argmax(1) == q.argmax(1)).sum())
            rows += len(p)
    if rows == 0:
        raise UserError(f"the first {len(ids)} {split} images of '{args.pipeline}' have no proposals: nothing to measure")
    ms = {name: 1000 * statistics.mean(t) for name, t in times.items()}
    fc = {name: ms[name] - ms["trunk"] for name in ("as trained", "compressed")}
    fc6, fc7 = plain.fc6, plain.fc7
    cap = f"longer side at most {cfg.fast.max_side}" if cfg.fast.max_side else "longer side uncapped"
    print(
        f"{args.pipeline}: {len(ids)} {split} images, {rows / len(ids):.0f} proposals per image, images at "
        f"{', '.join(map(str, cfg.fast.scales))} px ({cap}), device {device}, {cfg.model.backbone}"
    )
    print(
        f"fc6 {fc6.in_features}x{fc6.out_features} at rank {ranks[0]}, fc7 {fc7.in_features}x{fc7.out_features} "
        f"at rank {ranks[1]} (a rank that saves no work keeps its layer)"
    )
    print(f"trunk       {ms['trunk']:8.1f} ms per image (mean of the per-image medians)")
    for name in ("as trained", "compressed"):
        print(f"{name:<11} {ms[name]:8.1f} ms per image, of which RoI pooling and fc layers {fc[name]:.1f} ms")
    fc_ratio = f"{fc['as trained'] / fc['compressed']:.2f}x" if fc["compressed"] > 0 else "n/a"
    print(f"as trained / compressed: {ms['as trained'] / ms['compressed']:.2f}x whole network, {fc_ratio} after the trunk")
    kept = f"best class unchanged for {same / rows:.1%} of {rows} regions"
    print(f"outputs: softmax probabilities moved by at most {largest:.4f}; {kept}")
    print(machine_line(machine_info(device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
