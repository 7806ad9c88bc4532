"""A per-image stage with its reading and writing overlapped with the model (``model.overlap_io: true``, the
default) against one step after another (``false``), in one process: the whole stage on one split, as
`rcnn features` or `rcnn convmaps` computes it (decoding or reading the conv maps, the network, the record
writes and the index), into a temporary folder, so the runs folder is read and never written.

Rounds alternate the two ways; each round's seconds per image are printed, then the medians and their ratio,
and whether both ways wrote the same bytes (they must). What overlapping can save is the host's reading and
writing, hidden behind the device's work: on a GPU, where the network's share of an image is a few
milliseconds, that share is large; on a CPU, where the network takes nearly all of an image, little.

    rcnn run demo --until features && python benchmarks/bench_overlap.py demo
    python benchmarks/bench_overlap.py voc07-mini-spp --stage convmaps --split test --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import machine_info, machine_line, pipeline_options, rcnn_command, run_script

from rcnn.config import PipelineFile
from rcnn.config.loading import default_pipelines_file
from rcnn.errors import UserError
from rcnn.modeling.models import device_for
from rcnn.runtime import strict_float32
from rcnn.stages import convmaps, features
from rcnn.stages.context import Context
from rcnn.store import artifacts as store

STAGES = {"features": features, "convmaps": convmaps}
WAYS = {"in turn": "false", "overlapped": "true"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline", help="a pipeline whose stages before --stage are done in the runs folder")
    ap.add_argument("--stage", choices=tuple(STAGES), default="features", help="the stage measured (default: features)")
    ap.add_argument("--split", help="the split computed (default: the pipeline's test split)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of both ways (default: 2)")
    pipeline_options(ap)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    return run_script("bench_overlap.py", run, parse_args(argv))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(args) -> int:
    pfile = PipelineFile(args.pipelines_file or default_pipelines_file())
    stage = STAGES[args.stage]
    contexts = {
        way: Context(
            cfg=pfile.load(args.pipeline, (*args.overrides, f"model.overlap_io={value}")),
            runs_dir=args.runs_dir,
            progress=False,
            log=lambda _: None,
        )
        for way, value in WAYS.items()
    }
    cfg = contexts["in turn"].cfg
    split = args.split or cfg.data.test
    if split not in stage.splits(contexts["in turn"]):
        raise UserError(f"stage {args.stage} of '{args.pipeline}' computes no split '{split}'")
    if stage is features and store.read_manifest(contexts["in turn"].unit_dir("finetune", cfg.data.trainval)) is None:
        need = rcnn_command("finetune", args)
        raise UserError(f"no fine-tuned model of '{args.pipeline}' in {args.runs_dir}: run `{need}` first")
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    written: dict[str, dict[str, bytes]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-overlap-"))
    try:
        for r in range(args.repeats):
            for way, ctx in contexts.items():
                work = tmp / f"{way.replace(' ', '-')}-{r}"
                tick = time.perf_counter()
                with strict_float32(ctx.cfg.model.precision == "float32"):  # as stages/runner.py runs a stage
                    _, metrics = stage.compute(ctx, split, work)
                seconds[way].append((time.perf_counter() - tick) / metrics["images_computed"])
                written.setdefault(way, folder_bytes(work))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    device = device_for(cfg.model.device)
    n = metrics["images_computed"]
    print(f"{args.pipeline} ({cfg.method}), stage {args.stage}, split {split}: {n} images, device {device}")
    median = {way: statistics.median(s) for way, s in seconds.items()}
    for way, s in seconds.items():
        rounds = ", ".join(f"{1000 * x:.1f}" for x in s)
        print(f"{way:<11}: median {1000 * median[way]:8.1f} ms per image; rounds: {rounds}")
    print(f"overlapped against in turn: {median['in turn'] / median['overlapped']:.2f}x faster (medians)")
    same = written["in turn"] == written["overlapped"]
    print(f"same bytes written both ways: {'yes' if same else 'NO'}")
    print(machine_line(machine_info(device)))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
