"""What runs before a pipeline's first stage: its synthetic data generated if missing, its annotations checked.

Apart from the stages on purpose: the generator's code is no stage's code (the data's content is fingerprinted
instead), so a change to it makes no result stale by itself.
"""

from __future__ import annotations

from rcnn.data.datasets import VOCDataset, check_pipeline_data, close_class
from rcnn.errors import UserError

from .context import Context


def synthetic_data_pending(ctx: Context) -> bool:
    """Whether the pipeline's data is synthetic and not generated yet (its first run generates it)."""
    return ctx.cfg.data.root is None and ctx.cfg.data.synthetic is not None and not (ctx.data_root / "ImageSets").is_dir()


def ensure_data(ctx: Context) -> None:
    """Generate the pipeline's synthetic data if it is synthetic and not there yet; check every annotation."""
    synth = ctx.cfg.data.synthetic
    if synthetic_data_pending(ctx):
        from rcnn.data.synth import generate_dataset

        ctx.log(f"generating {synth.images} synthetic images in {ctx.data_root}")
        try:
            generate_dataset(ctx.data_root, n_images=synth.images, seed=synth.seed, size=synth.size, progress=ctx.progress)
        except UserError:
            if synthetic_data_pending(ctx):
                raise
            # Another rcnn process generated it meanwhile (two first runs at once): the folder is named by the
            # generator's settings and moved into place only when complete, so that data is this data.
            ctx.log(f"{ctx.data_root} was generated meanwhile by another rcnn process; using it")
    # What the annotations tell is checked before any stage starts its long work.
    for note in check_data(ctx):
        ctx.log(note)


def check_data(ctx: Context) -> list[str]:
    """Check what the pipeline's annotations tell (:func:`check_pipeline_data`); the notes to show the user.

    Raises:
        UserError: the first defect, as the next run would stop on it.
    """
    data = ctx.cfg.data
    trainval = ctx.dataset(data.trainval)
    trainval.require_images()  # before ctx.classes reads the classes of its images
    test = ctx.dataset(data.test)
    check_pipeline_data(trainval, test, ctx.classes, data.use_difficult)
    notes = [note for dataset in (trainval, test) if (note := left_out_note(dataset, ctx.classes))]
    return notes + ([note] if (note := stale_weights_note(ctx)) else [])


def stale_weights_note(ctx: Context) -> str | None:
    """A line saying so when ``model.weights: pipeline:NAME`` names a fine-tuned model trained by other code than
    this (after an update of rcnn): this pipeline would build on it as it is. Only the code is compared: NAME's
    settings are its own, which this command's options need not be."""
    weights = ctx.cfg.model.weights
    if not weights.startswith("pipeline:"):
        return None
    from rcnn.store import artifacts as store
    from rcnn.store import code_identity

    from . import finetune
    from .provenance import code_digests

    other = weights.split(":", 1)[1]
    try:
        manifest = store.read_manifest(ctx.runs_dir / other / finetune.NAME / ctx.cfg.data.trainval)
    except UserError:  # damaged: the weights' own check says so when they are read
        return None
    modules = code_digests(finetune)
    code = (manifest or {}).get("code") or {}
    if manifest is None or code.get("digest") == code_identity.combined_digest(modules):
        return None
    changed = store.changed_modules(code["modules"], modules) if isinstance(code.get("modules"), dict) else []
    which = f" ({', '.join(changed[:4])}{' and more' if len(changed) > 4 else ''} changed)" if changed else ""
    return (
        f"model.weights: {weights}: that pipeline's fine-tuned model was trained by other code{which}; this pipeline "
        f"builds on it as it is; `{ctx.command('finetune', other)}` first would build on one trained by this code"
    )


def left_out_note(dataset: VOCDataset, classes: tuple[str, ...]) -> str | None:
    """One line counting the objects ``data.other_classes: ignore`` left out of a split (after its annotations
    are parsed), per class, with the likely misspellings of a listed class named: a typo is left out silently."""
    if not dataset.left_out:
        return None
    counts = ", ".join(f"{name} {n}" for name, n in dataset.left_out.most_common())
    typos = [f"'{name}' (did you mean '{close}'?)" for name in dataset.left_out if (close := close_class(name, classes))]
    total = sum(dataset.left_out.values())
    line = (
        f"data/{dataset.split}: {total} object(s) of classes outside data.classes left out (data.other_classes: ignore): {counts}"
    )
    return line + ("; misspelt? " + ", ".join(typos) if typos else "")
