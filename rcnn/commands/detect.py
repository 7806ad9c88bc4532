"""`rcnn detect`: a trained pipeline's detector run on any image files."""

from __future__ import annotations

from pathlib import Path

import click

from rcnn.commands.shared import make_context, output_folder, pipeline_options
from rcnn.errors import UserError


@click.command("detect")
@click.argument("pipeline")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the drawn images and JSON.")
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Draw and list detections scoring at least this [default: 0, the SVM margin; Fast R-CNN pipelines: a "
    "softmax probability of 0.8, as its demo.py draws].",
)
@click.option("--no-bbox-reg", is_flag=True, help="Skip box regression.")
@pipeline_options
def detect_cmd(pipeline, images, out_dir, threshold, no_bbox_reg, runs_dir, overrides, pipelines_file):
    """Run PIPELINE's trained detector on any IMAGES.

    IMAGES are files, or folders standing for the image files in them (by suffix:
    .jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp; other files there, and its
    sub-folders and the <name>.det.jpg this command draws, are passed over, with
    a note); a file given twice is detected once.
    Proposals are computed on the fly with the pipeline's settings; each image is
    written to --out with its labelled boxes drawn (<name>.det.jpg) beside a JSON of
    its detections (<name>.json: class, score, box as x1 y1 x2 y2 in pixels from the
    image's top-left corner, 0-based and continuous: a VOC XML's xmin is x1 + 1);
    images of the same name get <name>-2, <name>-3, ... An image that cannot be read
    is named on stderr and the rest are processed; the exit status is then 1. Images
    are decoded as stored: an EXIF orientation tag is not applied. They are only read,
    never executed or trusted beyond decoding. Without the training data (a runs
    folder copied to another machine), the trained stages are checked as their
    records say: complete, chained, made by this code and these settings. Example:

    \b
      rcnn detect demo runs/_data/synth-n240-s0-px256/JPEGImages/000003.jpg --out det/
      rcnn detect demo photos/ --out det/
    """
    from rcnn.detection.detector import detect_files
    from rcnn.runtime import strict_float32
    from rcnn.stages import evaluate, finetune

    out = output_folder(out_dir)
    images = image_arguments(images)
    ctx = make_context(pipeline, runs_dir, overrides, pipelines_file, quiet=True)
    # Fast R-CNN's fine-tuned network is the whole detector; the others' SVMs and regressors come after it.
    svms = evaluate.uses_svms(ctx)
    last = ("train-svm" if no_bbox_reg else "train-bbox") if svms else "finetune"
    if threshold is None:
        threshold = 0.0 if svms else 0.8
    untrained(ctx, last)
    if ctx.data_root.is_dir():
        evaluate.check_trained(ctx, bbox=not no_bbox_reg)
    else:  # a trained runs folder copied without its data: what can be checked without it
        check_as_recorded(ctx, last)
        click.echo(
            f"note: the training data ({ctx.data_root}) is not here, so the trained stages are checked as recorded "
            "(complete, consistent, made by this code and settings), not against the data",
            err=True,
        )
    model, meta = finetune.load(ctx)
    cfg = as_trained(ctx)
    detector = build_detector(ctx, cfg, model, tuple(meta["classes"]), bbox=not no_bbox_reg)
    failed = 0
    with strict_float32(cfg.model.precision == "float32"):  # float32 on a GPU, not TF32
        for r in detect_files(detector, images, out, threshold, ctx.cfg.proposals.seed):
            if r.error is not None:
                failed += 1
                click.echo(f"skipped: {r.error}", err=True)
                continue
            found = r.detections
            best = ", ".join(f"{d['class']} {d['score']:.2f}" for d in found[:5])
            listed = f" ({best}{', ...' if len(found) > 5 else ''})" if found else ""
            line = f"{r.path}: {len(found)} detection{'' if len(found) == 1 else 's'}{listed}"
            click.echo(line + (f" -> {r.output}.json" if r.output != Path(r.path).stem else ""))
    done = len(images) - failed
    written = f"{done} image(s) with their detections drawn and {done} JSON file(s) to {out}"
    if failed == len(images):
        raise UserError(f"no image could be read ({failed} named above); nothing was written to {out}")
    if failed:
        raise UserError(f"{failed} of {len(images)} image(s) could not be read (each named above); wrote the other {written}")
    click.echo(f"wrote {written}")


def as_trained(ctx):
    """The pipeline's configuration with ``model.precision`` and ``model.warp`` as features/<trainval> recorded them
    (``auto`` resolves per device), so that a new image's features are computed as those the SVMs and box regressors
    were trained on: a pipeline trained on a GPU detects in bfloat16 with the torch warp on a CPU too, and one
    trained on a CPU in float32 with OpenCV's warp on a GPU."""
    from dataclasses import replace

    from rcnn.stages.methods import made_as

    return replace(ctx.cfg, model=replace(ctx.cfg.model, **made_as(ctx, ctx.cfg.data.trainval)))


def build_detector(ctx, cfg, model, classes: tuple[str, ...], bbox: bool = True):
    """The trained pipeline of ``ctx`` as a :class:`rcnn.detection.detector.Detector` for new images, its features
    computed by ``model`` as ``cfg`` says (:func:`as_trained`)."""
    from functools import partial

    from rcnn.detection.detector import Detector
    from rcnn.methods.fast_regions import OUTPUTS, scored_boxes
    from rcnn.stages import evaluate, train_bbox, train_svm
    from rcnn.stages.methods import build_method

    svms = evaluate.uses_svms(ctx)
    return Detector(
        features=build_method(cfg).test_features(cfg, model),
        svm=train_svm.load(ctx) if svms else None,
        bbox=train_bbox.load(ctx) if bbox and svms else None,
        scored=None if svms else partial(scored_boxes, regress=bbox),
        scored_layers=() if svms else OUTPUTS,
        classes=classes,
        svm_layer=cfg.svm.layer,
        bbox_layer=cfg.bbox.layer,
        proposal_mode=cfg.proposals.mode,
        resize_width=cfg.proposals.resize_width,
        max_pixels=cfg.proposals.max_pixels,
        min_size=cfg.proposals.min_size,
        max_proposals=cfg.proposals.max_proposals,
        nms_threshold=cfg.evaluate.nms_threshold,
        max_per_image=cfg.evaluate.max_per_image,
        top_per_image=cfg.evaluate.top_per_image,
    )


def untrained(ctx, last: str) -> None:
    """Refuse, naming the first stage that has not run on the training split and the command that runs the rest,
    a pipeline not trained up to ``last`` (it named the last stage, as if that one alone were missing)."""
    from rcnn.stages import pipeline_stages
    from rcnn.store import artifacts as store

    names = list(pipeline_stages(ctx.cfg.method))
    for name in names[: names.index(last) + 1]:
        if store.read_manifest(ctx.unit_dir(name, ctx.cfg.data.trainval)) is None:
            raise UserError(
                f"pipeline '{ctx.cfg.name}' is not trained yet: {name}/{ctx.cfg.data.trainval} has not run; "
                f"`{ctx.command('run')} --until {last}` trains it"
            )


def check_as_recorded(ctx, last: str) -> None:
    """Refuse a trained pipeline whose units up to ``last``, read from their manifests alone, are not what this code
    and configuration would have made, or do not build on one another: the check that needs no training data."""
    from rcnn.stages import pipeline_stages
    from rcnn.stages.provenance import code_digests
    from rcnn.store import artifacts as store
    from rcnn.store import code_identity

    split, stages = ctx.cfg.data.trainval, pipeline_stages(ctx.cfg.method)
    names = list(stages)[: list(stages).index(last) + 1]
    manifests = {name: store.read_manifest(ctx.unit_dir(name, split)) for name in names}
    redo = f"rerun `{ctx.command('run')} --until {last}` where the data is"
    if ctx.cfg.data.classes is None:  # the classes found in the training data, as the units recorded them
        ctx.__dict__["classes"] = tuple(manifests[names[0]]["data"]["classes"])
    for name in names:
        manifest, label = manifests[name], f"{name}/{split} of pipeline '{ctx.cfg.name}'"
        if manifest["code"]["digest"] != code_identity.combined_digest(code_digests(stages[name])):
            raise UserError(f"{label} was made by other code; {redo}")
        try:
            params = stages[name].params(ctx)
        except UserError:  # reads the data (e.g. the class list when data.classes is not set): not judged here
            params = manifest["params"]
        if params != manifest["params"]:
            raise UserError(f"{label} was made with other settings; {redo}")
        for key, digest in manifest["inputs"].items():
            # "features/trainval", or a bare stage name (features record the network as "finetune"): that stage's
            # unit on the training split; keys of other splits and of the data are not judged here
            stage_name, _, key_split = key.partition("/")
            upstream = manifests.get(stage_name) if key_split in ("", split) else None
            if upstream is not None and store.outputs_digest(upstream) != digest:
                raise UserError(f"{label} was made from another {key} than the one here; {redo}")


def image_arguments(args: tuple[str, ...]) -> list[str]:
    """Each argument, or for a folder the image files in it, sorted by name, each file once; a folder without
    any is refused. A folder's sub-folders are not searched, and a note on stderr says so."""
    from rcnn.data.datasets import IMAGE_SUFFIXES

    paths: list[str] = []
    seen: dict[Path, str] = {}
    for arg in args:
        if not Path(arg).is_dir():
            found = [arg]
        else:
            entries = sorted(Path(arg).iterdir())
            found = [str(p) for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
            drawn = [p for p in found if p.lower().endswith(".det.jpg")]  # this command's own outputs, as --out DIR
            if drawn:
                found = [p for p in found if p not in drawn]
                click.echo(f"note: folder '{arg}': {len(drawn)} drawn detection file(s) (*.det.jpg) passed over", err=True)
            subs = [p.name for p in entries if p.is_dir() and not p.name.startswith(".")]
            if subs:
                shown = ", ".join(subs[:3]) + (", ..." if len(subs) > 3 else "")
                what = f"its {len(subs)} sub-folder(s) ({shown}) are not searched; name them too to detect their images"
                if not found:
                    raise UserError(f"folder '{arg}' has no image file ({', '.join(IMAGE_SUFFIXES)}); {what}")
                click.echo(f"note: folder '{arg}': {what}", err=True)
            if not found:
                raise UserError(f"folder '{arg}' has no image file ({', '.join(IMAGE_SUFFIXES)}); nothing was run")
        for path in found:
            key = Path(path).resolve()
            if key in seen:
                click.echo(f"note: '{path}' is '{seen[key]}' again; it is detected once", err=True)
                continue
            seen[key] = path
            paths.append(path)
    return paths
