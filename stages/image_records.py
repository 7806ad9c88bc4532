"""How a per-image stage fills its part files: its ``image_records`` run here, or in shards on a Dask cluster
(``--cluster``), writing the same files either way."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from rcnn.data.prefetch import read_ahead
from rcnn.store import records

from .context import Context
from .runner import add_info, pending_images, progress_bar

READ_AHEAD = 2  # images a per-image stage reads ahead under model.overlap_io


def images_ahead(ctx: Context, read, ids: list[str]):
    """``(image_id, read(image_id))`` for each of ``ids`` in order: read ahead by a thread under
    ``model.overlap_io`` (:func:`rcnn.data.prefetch.read_ahead`), else in turn."""
    return read_ahead(read, ids, READ_AHEAD if ctx.cfg.model.overlap_io else 0)


def one_ahead(items, start, finish, ahead: bool = True):
    """``finish(start(item))`` for each of ``items``, in order; with ``ahead``, the next item is started before
    the current one is finished (a GPU then computes the next image while the host finishes this one).

    Where reading an item or starting it fails, the item before it is still finished and given, then the
    error is raised: what was computed is kept.
    """
    waiting, items = None, iter(items)
    while True:
        try:
            item = next(items, _END)
            if item is _END:
                break
            started = start(item)
        except Exception:
            if waiting is not None:
                yield finish(waiting)
            raise
        if waiting is not None:
            yield finish(waiting)
        waiting = started
        if not ahead:
            yield finish(waiting)
            waiting = None
    if waiting is not None:
        yield finish(waiting)


_END = object()


def write_image_records(
    ctx: Context, stage: ModuleType, split: str, parts: Path, ids: list[str], desc: str, postfix: str | None = None
) -> dict:
    """Records of the ``ids`` without one in ``parts``, from ``stage.image_records(ctx, split, todo)``
    (``(image_id, arrays, info)`` per image), in parts of ``stage.PART_SIZE`` images; returns the images'
    summed ``info``. ``desc`` labels the progress bar, which shows ``info[postfix]`` when given."""
    if ctx.cluster is not None:
        from rcnn.cluster.shards import run_image_shards

        # Shards of whole parts, named as this process names them: the same files either way.
        return run_image_shards(ctx, stage.NAME, split, parts, ids, stage.KIND, part_size=stage.PART_SIZE, gpu=True)
    totals: dict = {}
    todo = pending_images(ctx, f"{stage.NAME}/{split}", parts, ids)
    bar = progress_bar(ctx, len(todo), desc)
    # model.overlap_io: a full part is written while the next one is computed, so the device need not wait
    # on HDF5 and fsync.
    background = ctx.cfg.model.overlap_io
    with records.RecordWriter(parts, stage.KIND, chunk_size=stage.PART_SIZE, background=background) as writer:
        for image_id, arrays, info in stage.image_records(ctx, split, todo):
            writer.add(image_id, arrays)
            add_info(totals, info)
            bar.update(1)
            if postfix is not None:
                bar.set_postfix({postfix: info[postfix]})
    bar.close()
    return totals
