"""The proposals stage on a Dask cluster against the plain local run, in one process and one run.

Three ways over the same images, each a fresh runs folder: the plain stage (``proposals.n_jobs`` joblib
processes, all cores), ``--cluster local:1`` and ``--cluster local:2`` (a LocalCluster of one or two worker
processes, one thread each, started before the stage is timed, as a command starts it before its first stage).
Throughput is the stage's own figure (``images_per_s`` in its manifest: images over the time from planning the
work to the last record, before the records are joined); the end-to-end time of the whole unit (hashing the data,
joining the records into one file, recall, the manifest) and each cluster's start-up are printed beside it.
From the measured per-image cost it extrapolates VOC2007's 9963 images to 16 and 64 workers.

    python benchmarks/bench_cluster.py --data ../shared/data/voc07-mini --images 40
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import exit_in_one_line, machine_info, machine_line, subset, subset_options
from joblib import Parallel, delayed

from rcnn.cluster.session import open_session
from rcnn.cluster.spec import parse_cluster
from rcnn.config import PipelineFile
from rcnn.stages import proposals
from rcnn.stages.context import Context
from rcnn.stages.runner import run_stage

VOC2007_IMAGES = 9963  # trainval 5011 + test 4952


def _warm() -> int:
    import rcnn.stages.proposals  # noqa: F401

    return os.getpid()


def run_once(cfg, runs: Path, cluster: str | None) -> dict:
    """One proposals run in a fresh runs folder; its manifest's figures and the times around it."""
    with contextlib.ExitStack() as stack:
        ctx = Context(cfg=cfg, runs_dir=runs, progress=False, log=lambda _: None)
        started = time.perf_counter()
        if cluster is not None:
            ctx.cluster = stack.enter_context(open_session(parse_cluster(cluster), cfg.cluster, lambda _: None))
        ready = time.perf_counter()
        manifest = run_stage(ctx, proposals)[cfg.data.trainval]
        done = time.perf_counter()
    m = manifest["metrics"]
    return {
        "images_per_s": m["images_per_s"],
        "seconds_per_image_worker": m["seconds_per_image_worker"],
        "unit_s": done - ready,
        "startup_s": ready - started,
        "shards": manifest.get("cluster", {}).get("shards"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subset_options(ap)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of each way; medians reported (default: 1)")
    args = ap.parse_args()

    import dask
    import dask_jobqueue
    import distributed

    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        ids = subset(args.data, args.split, args.images, tmp / "voc")
        pfile = tmp / "p.yaml"
        pfile.write_text(
            "pipelines:\n  bench:\n"
            f"    data: {{root: {tmp / 'voc'}, trainval: bench, test: bench}}\n"
            "    proposals: {mode: fast, min_size: 20, n_jobs: -1}\n"
        )
        cfg = PipelineFile(pfile).load("bench")
        # The plain run's worker processes started and warm, as the cluster's are when the stage begins.
        Parallel(n_jobs=-1)(delayed(_warm)() for _ in range(os.cpu_count() or 1))
        ways = {"plain": None, "local:1": "local:1", "local:2": "local:2"}
        runs: dict[str, list[dict]] = {w: [] for w in ways}
        load_before = os.getloadavg()
        for r in range(args.repeats):
            for way, cluster in ways.items():
                runs[way].append(run_once(cfg, tmp / f"runs-{way.replace(':', '')}-{r}", cluster))

        rate = {w: statistics.median(x["images_per_s"] for x in rs) for w, rs in runs.items()}
        info = machine_info()
        print(machine_line(info))
        print(f"dask {dask.__version__}, distributed {distributed.__version__}, dask-jobqueue {dask_jobqueue.__version__}")
        print(f"commit {info['commit']}; images: {len(ids)} from {args.data} [{args.split}], fast mode, repeats: {args.repeats}")
        # Other processes on the machine take cores from the workers: the ratios below assume they are free.
        load = ", ".join(f"{x:.1f}" for x in (*load_before[:1], os.getloadavg()[0]))
        print(f"load average (1 min) before and after: {load} on {os.cpu_count()} cores")
        for way, rs in runs.items():
            x = rs[len(rs) // 2]
            extra = f", cluster start {x['startup_s']:.1f} s, {x['shards']} shards" if ways[way] else ""
            print(
                f"{way:8s}: {rate[way]:6.2f} img/s  (whole unit {x['unit_s']:.1f} s; "
                f"{x['seconds_per_image_worker']:.2f} s per image in a worker{extra})"
            )
        print(f"local:2 / plain   throughput: {rate['local:2'] / rate['plain']:.3f}  (goal >= 0.85)")
        print(f"local:2 / local:1 throughput: {rate['local:2'] / rate['local:1']:.3f}  (goal >= 1.7)")

        per_image = statistics.median(x["seconds_per_image_worker"] for rs in runs.values() for x in rs)
        local2 = runs["local:2"][len(runs["local:2"]) // 2]
        # What the client does alone, outside the sharded search: hashing the data, joining the records, recall.
        client_per_image = max(0.0, local2["unit_s"] - len(ids) / local2["images_per_s"]) / len(ids)
        print(f"per image: {per_image:.2f} s of search in a worker; {client_per_image * 1000:.0f} ms on the client (local:2)")
        for workers in (16, 64):
            search = VOC2007_IMAGES * per_image / workers
            client = VOC2007_IMAGES * client_per_image
            print(
                f"VOC2007 ({VOC2007_IMAGES} images) on {workers} workers: about {search / 60:.1f} min of search "
                f"+ {client / 60:.1f} min on the client (if its per-image cost stays as measured)"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(exit_in_one_line("bench_cluster.py", main))
