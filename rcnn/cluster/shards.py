"""A per-image stage's pending images as shards of whole part files, run on the cluster with one progress bar.

Images are grouped in split order into parts of ``part_size``; group ``g`` is always written as part
``part-<prefix>-<g>.h5`` by the one task that holds it, so a stage whose local run writes the same groups
under the same names (features, conv maps: 16 images per part) ends with the same files on a cluster.
"""

from __future__ import annotations

import copy
import math
import uuid
from collections.abc import Iterable
from pathlib import Path

Group = tuple[int, list[str]]  # (part number, the image ids it holds, in split order)


def pending_groups(ids: list[str], done: Iterable[str], part_size: int) -> list[Group]:
    """The groups of ``part_size`` consecutive ids with at least one id not in ``done`` (recomputed whole)."""
    done = set(done)
    groups = [(g, ids[k : k + part_size]) for g, k in enumerate(range(0, len(ids), part_size))]
    return [(g, members) for g, members in groups if any(i not in done for i in members)]


def plan_shards(groups: list[Group], workers: int, shard_images: int | None = None) -> list[list[Group]]:
    """Consecutive groups as shards of about ``shard_images`` images (whole groups); by default about eight
    shards per worker, so that a slow shard or a lost worker delays the end little."""
    if not groups:
        return []
    images = sum(len(m) for _, m in groups)
    part_size = max(len(m) for _, m in groups)
    target = shard_images or math.ceil(images / (8 * workers))
    per_shard = max(1, math.ceil(target / part_size))
    return [groups[k : k + per_shard] for k in range(0, len(groups), per_shard)]


def detached(ctx):
    """A copy of the run context to send to workers: no client, no progress bars, logs collected (see tasks)."""
    sent = copy.copy(ctx)
    sent.cluster = None
    sent.progress = False
    return sent


def run_image_shards(
    ctx,
    stage: str,
    split: str,
    parts: Path,
    ids: list[str],
    kind: str,
    part_size: int,
    prefix: str = "0",
    compress: Iterable[str] = (),
    gpu: bool = False,
) -> dict:
    """Compute the records of ``ids`` missing from ``parts`` on the cluster; return the summed per-image
    numbers the stage's ``image_records`` reported. A shard's exception (a bad image) is raised here as
    the worker raised it, after the other shards are cancelled; a lost worker's shard is rerun by Dask."""
    from rcnn.stages.runner import add_info
    from rcnn.store import records

    from .tasks import run_shard

    label = f"{stage}/{split}"
    done = records.completed_parts(parts)
    if done:
        ctx.log(f"{label}: resuming, {sum(i in done for i in ids)} of {len(ids)} images already done")
    shards = plan_shards(pending_groups(ids, done, part_size), ctx.cluster.worker_count(), ctx.cfg.cluster.shard_images)
    totals: dict = {}
    parts.mkdir(parents=True, exist_ok=True)
    args = [(str(parts), shard, kind, prefix, tuple(compress)) for shard in shards]
    sizes = [sum(len(m) for _, m in shard) for shard in shards]
    for result in _run(ctx, label, run_shard, (stage, split), args, sizes, gpu):
        for line in result["log"]:
            ctx.log(line)
        add_info(totals, result["totals"])
    return totals


def _run(ctx, label: str, fn, common: tuple, args: list[tuple], sizes: list[int], gpu: bool):
    """Submit ``fn(ctx, *common, *a)`` for each ``a`` in ``args`` and yield the results as they finish, one
    progress bar over the ``sizes`` images. On an error (raised here as
    the worker raised it) or an interruption, the rest is cancelled."""
    from distributed import as_completed

    from rcnn.stages.runner import progress_bar

    session = ctx.cluster
    session.note(label, len(args), sum(sizes))
    if not args:
        return
    sent = session.client.scatter(detached(ctx), broadcast=True, hash=False)
    resources = session.gpu_resources() if gpu else None
    run = uuid.uuid4().hex[:8]
    futures = [
        session.client.submit(fn, sent, *common, *a, key=f"{label.replace('/', '-')}-{k}-{run}", resources=resources)
        for k, a in enumerate(args)
    ]
    position = {f.key: k for k, f in enumerate(futures)}
    workers = session.worker_count()
    bar = progress_bar(ctx, sum(sizes), f"{label.replace('/', ' ')} ({len(args)} shards on {workers} workers)")
    try:
        for future in as_completed(futures):
            result = future.result()
            bar.update(sizes[position[future.key]])
            yield result
    finally:
        bar.close()
        session.client.cancel(futures)
