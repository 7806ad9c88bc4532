"""`rcnn evaluate`: the evaluate stage of a pipeline, or any devkit result files scored against a VOC split."""

from __future__ import annotations

from pathlib import Path

import click

from rcnn.commands.shared import ensure_data, make_context, run_one, stage_options, write_json
from rcnn.errors import ConfigError, UserError


@click.command("evaluate")
@click.argument("pipeline", required=False)
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help="Without PIPELINE: the VOC-layout dataset root.")
@click.option("--split", default=None, help="Without PIPELINE: the split whose annotations are the ground truth [default: test].")
@click.option(
    "--detections", type=click.Path(), help="Without PIPELINE: a folder of comp4_det_<split>_<class>.txt files, or one such file."
)
@click.option(
    "--classes",
    default=None,
    metavar="A,B,...",
    help="Without PIPELINE: the classes to score, comma-separated [default: those of the split's objects and of the files].",
)
@click.option(
    "--metric",
    type=click.Choice(["voc07", "voc10", "coco"]),
    default=None,
    help="voc07: 11-point interpolated AP (VOC2007 devkit) [default: the pipeline's evaluate.metric, else voc07]; "
    "voc10: all-point AP (VOC2010+); coco: COCO's AP over IoU 0.50:0.95 with AP50, AP75 and AP by box size "
    "(pycocotools' evaluation; needs pycocotools).",
)
@click.option(
    "--errors",
    is_flag=True,
    help="Also sort the false positives by type: localisation, confusion with another class, background "
    "(Hoiem et al. 2012, as in R-CNN's Figure 4).",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the result as JSON here.")
@stage_options
def evaluate_cmd(
    pipeline,
    data_dir,
    split,
    detections,
    classes,
    metric,
    errors,
    json_out,
    runs_dir,
    overrides,
    pipelines_file,
    force,
    wait,
    quiet,
    skip_bad,
    cluster,
):
    """Detect on PIPELINE's test split and score it, or score any detector's devkit files.

    \b
    With PIPELINE: run the evaluate stage (test proposals scored by the class SVMs,
    or by Fast R-CNN's softmax; per-class NMS, with and without box regression; Fast
    R-CNN moves the boxes by its network's deltas), write devkit result files and
    precision-recall plots to the runs folder, and print the AP table. Like every
    stage it is skipped when up to date; --force recomputes it. A --metric other than
    the pipeline's evaluate.metric scores the stage's devkit files again with it and
    prints that table, leaving the stored evaluation as it is. Example:
      rcnn evaluate demo --metric voc10

    \b
    Without PIPELINE: score devkit result files (--data, --split, --detections,
    --classes), one line per detection:
      <image_id> <score> <xmin> <ymin> <xmax> <ymax>
    in 1-based inclusive pixel coordinates, as in the VOC XML. Example:
      rcnn evaluate --data ../VOC2007 --split test --detections results/ --json ap.json

    Either way scoring is the PASCAL VOC devkit's: IoU >= 0.5 is a hit; each object is
    matched once (duplicates are false positives); `difficult` objects count neither
    way; a class without test objects scores n/a and stays out of the mean. --metric
    coco is COCO's instead (pycocotools: IoU 0.50 to 0.95, difficult objects as crowd
    regions).
    """
    if pipeline is not None:
        given = {"--data": data_dir, "--split": split, "--detections": detections, "--classes": classes}
        extra = [name for name, value in given.items() if value is not None]
        if extra:
            raise ConfigError(
                f"{', '.join(extra)} score devkit files without a pipeline; with PIPELINE the data and split are the "
                "pipeline's (see `rcnn config PIPELINE`)"
            )
        _evaluate_pipeline(
            pipeline, metric, errors, json_out, runs_dir, overrides, pipelines_file, force, wait, quiet, skip_bad, cluster
        )
        return
    given = {
        "--set": overrides,
        "--runs-dir": runs_dir,
        "--pipelines-file": pipelines_file,
        "--force": force,
        "--wait": wait,
        "--quiet": quiet,
        "--skip-bad": skip_bad,
        "--cluster": cluster,
    }
    extra = [name for name, value in given.items() if value]
    if extra:
        raise ConfigError(f"{', '.join(extra)} apply to a pipeline's evaluation: rcnn evaluate PIPELINE {extra[0]} ...")
    if data_dir is None or detections is None:
        raise ConfigError("give a PIPELINE, or --data VOCDIR and --detections PATH to score devkit files")
    from rcnn.data.datasets import ROOT_LAYOUT
    from rcnn.evaluation.detfiles import detection_file_classes
    from rcnn.evaluation.scoring import devkit_inputs, format_ap_table, score_detections

    if not Path(data_dir).is_dir():
        raise UserError(f"dataset root '{data_dir}' does not exist; --data names {ROOT_LAYOUT}")
    split = split or "test"
    wanted = tuple(c.strip() for c in classes.split(",") if c.strip()) if classes is not None else None
    if wanted is not None and not wanted:
        raise ConfigError("--classes: give at least one class name")
    title = f"{data_dir} [{split}], detections from {detections}"
    annotations, names, dets = devkit_inputs(Path(data_dir), split, Path(detections), wanted)
    if metric == "coco":
        from rcnn.evaluation.coco_metric import coco_evaluate, format_coco_table

        result = coco_evaluate(dets, annotations, names)
        click.echo(format_coco_table(result, title))
        objects = result.objects
    else:
        result = score_detections(dets, annotations, names, metric or "voc07")
        click.echo(format_ap_table(result, title))
        objects = {name: r.npos for name, r in result.per_class.items()}
    if wanted is None and Path(detections).is_dir():  # e.g. the files of a run on a subset of the data's classes
        named = set(detection_file_classes(detections, split))
        fileless = [name for name, n in objects.items() if name not in named and n > 0]
        if fileless:
            click.echo(
                f"  note: no result file for {', '.join(fileless)} in {detections}: scored 0 and counted in the mAP; "
                "--classes names the classes to score"
            )
    payload = result.to_json()
    if errors:
        payload["false_positives"] = _errors_line(dets, annotations, names, "")
    if json_out:
        write_json(json_out, payload)


def _errors_line(dets, annotations, classes, variant: str) -> dict[str, float] | None:
    """Print the share of each false-positive type among the top-ranked ones; return the shares."""
    from rcnn.evaluation.errors import TYPES, false_positive_types, type_shares

    shares = type_shares(false_positive_types(dets, annotations, classes), 1)
    if shares is None:
        click.echo(f"  false positives{variant}: none")
        return None
    parts = ", ".join(f"{name} {100 * v:.1f} %" for name, v in zip(TYPES, shares))
    click.echo(f"  false positives{variant} by type (top-ranked, as many per class as it has objects): {parts}")
    return {name: float(v) for name, v in zip(TYPES, shares)}


def _evaluate_pipeline(
    pipeline, metric, errors, json_out, runs_dir, overrides, pipelines_file, force, wait, quiet, skip_bad, cluster
):
    from rcnn.stages import evaluate

    ctx = make_context(pipeline, runs_dir, overrides, pipelines_file, force, wait, quiet, skip_bad, cluster)
    ensure_data(ctx)
    manifests = run_one("evaluate", ctx)
    manifest = next(iter(manifests.values()))
    metrics = manifest["metrics"]
    rescored = metric is not None and metric != metrics["metric"]
    loaded = stage_detections(ctx, manifest["split"]) if rescored or errors else None  # read once for both
    if rescored:
        metrics = rescore(ctx, loaded, metric)
        click.echo(
            f"{metric}: scored again from the stage's devkit result files; the stored evaluation "
            f"({manifest['metrics']['metric']}, the pipeline's evaluate.metric) is kept"
        )
    click.echo(evaluate.table(ctx, {"metrics": metrics}))
    if metric == "coco":
        for variant, stats in (("", metrics["stats"]), (" with box regression", metrics["stats_bbox"])):
            figures = ", ".join(
                f"{key} {'n/a' if stats[key] < 0 else f'{stats[key]:.4f}'}" for key in ("AP50", "AP75", "APs", "APm", "APl")
            )
            click.echo(f"  COCO{variant}: {figures} (APs/m/l by box area; n/a: no objects of that size)")
    if errors:
        annotations, found = loaded
        metrics = dict(metrics)
        for (variant, dets), key in zip(found.items(), ("false_positives", "false_positives_bbox")):
            metrics[key] = _errors_line(dets, annotations, ctx.classes, "" if variant == "plain" else " with box regression")
    if json_out:
        write_json(json_out, metrics)


def stage_detections(ctx, split: str) -> tuple[list, dict]:
    """The test annotations and the evaluate stage's devkit detections of both variants."""
    from rcnn.evaluation.detfiles import read_detections
    from rcnn.stages.evaluate import NAME, VARIANTS

    found = {
        variant: read_detections(ctx.unit_dir(NAME, split) / folder, split, ctx.classes) for variant, folder in VARIANTS.items()
    }
    return ctx.dataset(split).annotations(), found


def rescore(ctx, loaded: tuple[list, dict], metric: str) -> dict:
    """The evaluate stage's results scored again with ``metric`` from the devkit files it wrote (``loaded``, as
    :func:`stage_detections` reads them), both variants, in the shape of its ``results.json`` metrics (without its
    timings). Reads only."""
    from rcnn.evaluation.scoring import ground_truth_by_class
    from rcnn.evaluation.voc import evaluate

    annotations, found = loaded
    if metric == "coco":
        from rcnn.evaluation.coco_metric import coco_evaluate

        scored = {variant: coco_evaluate(dets, annotations, ctx.classes) for variant, dets in found.items()}
    else:
        gt = ground_truth_by_class(annotations, ctx.classes)
        scored = {variant: evaluate(dets, gt, metric=metric) for variant, dets in found.items()}
    plain, bbox = scored["plain"].to_json(), scored["bbox"].to_json()
    out = {
        "metric": metric,
        "mAP": scored["plain"].mAP,
        "mAP_bbox": scored["bbox"].mAP,
        "per_class": plain["per_class"],
        "per_class_bbox": bbox["per_class"],
    }
    if metric == "coco":
        out.update(stats=plain["stats"], stats_bbox=bbox["stats"])
    return out
