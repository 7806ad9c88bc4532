"""What a worker runs: one shard of a per-image stage, written as whole part files into the shared store."""

from __future__ import annotations

from pathlib import Path


def run_shard(ctx, stage: str, split: str, parts: str, shard: list, kind: str, prefix: str, compress: tuple) -> dict:
    """Compute the records of the shard's groups with the stage's ``image_records`` and write each group as
    its own part (one writer per file). Returns the log lines, the images done and the summed numbers."""
    import copy
    import importlib

    from rcnn.stages.runner import add_info
    from rcnn.store import records

    if ctx.cfg.model.precision == "float32":  # float32 on a GPU, not TF32; left so (a worker's tasks share the flags)
        from rcnn.runtime import tf32_off

        tf32_off()
    logs: list[str] = []
    ctx = copy.copy(ctx)  # a worker's threads share the context it was sent; each shard collects its own lines
    ctx.log = logs.append
    # By module name, not through the stages' dict: a stage's code identity holds this module, not every stage.
    module = importlib.import_module(f"rcnn.stages.{stage.replace('-', '_')}")
    ids = [i for _, members in shard for i in members]
    totals: dict[str, float] = {}
    buffer: list = []
    groups = iter(shard)
    number, members = next(groups)
    for image_id, arrays, info in module.image_records(ctx, split, ids):
        note = info.pop("note", None)
        if note:
            logs.append(note)
        add_info(totals, info)
        buffer.append((image_id, arrays, {}))
        if len(buffer) == len(members):
            records.write_part(Path(parts) / records.part_name(prefix, number), kind, buffer, compress)
            buffer = []
            number, members = next(groups, (None, []))
    return {"log": logs, "images": len(ids), "totals": totals}
