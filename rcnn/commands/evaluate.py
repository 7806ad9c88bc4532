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
    type=click.Choice(["voc07", "voc10"]),
    default=None,
    help="voc07: 11-point interpolated AP (VOC2007 devkit) [default: the pipeline's evaluate.metric, else voc07]; "
    "voc10: all-point AP (VOC2010+).",
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
    per-class NMS, with and without box regression), write devkit result files and
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
    way; a class without test objects scores n/a and stays out of the mean.
    """
    if pipeline is not None:
        given = {"--data": data_dir, "--split": split, "--detections": detections, "--classes": classes}
        extra = [name for name, value in given.items() if value is not None]
        if extra:
            raise ConfigError(
                f"{', '.join(extra)} score devkit files without a pipeline; with PIPELINE the data and split are the "
                "pipeline's (see `rcnn config PIPELINE`)"
            )
        _evaluate_pipeline(pipeline, metric, json_out, runs_dir, overrides, pipelines_file, force, wait, quiet, skip_bad, cluster)
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
    from rcnn.evaluation.scoring import format_ap_table, score_devkit_detections

    if not Path(data_dir).is_dir():
        raise UserError(f"dataset root '{data_dir}' does not exist; --data names {ROOT_LAYOUT}")
    split = split or "test"
    wanted = tuple(c.strip() for c in classes.split(",") if c.strip()) if classes is not None else None
    if wanted is not None and not wanted:
        raise ConfigError("--classes: give at least one class name")
    result = score_devkit_detections(Path(data_dir), split, Path(detections), metric or "voc07", classes=wanted)
    click.echo(format_ap_table(result, f"{data_dir} [{split}], detections from {detections}"))
    if wanted is None and Path(detections).is_dir():  # e.g. the files of a run on a subset of the data's classes
        named = set(detection_file_classes(detections, split))
        fileless = [name for name, r in result.per_class.items() if name not in named and r.npos > 0]
        if fileless:
            click.echo(
                f"  note: no result file for {', '.join(fileless)} in {detections}: scored 0 and counted in the mAP; "
                "--classes names the classes to score"
            )
    if json_out:
        write_json(json_out, result.to_json())


def _evaluate_pipeline(pipeline, metric, json_out, runs_dir, overrides, pipelines_file, force, wait, quiet, skip_bad, cluster):
    from rcnn.stages import evaluate

    ctx = make_context(pipeline, runs_dir, overrides, pipelines_file, force, wait, quiet, skip_bad, cluster)
    ensure_data(ctx)
    manifests = run_one("evaluate", ctx)
    manifest = next(iter(manifests.values()))
    metrics = manifest["metrics"]
    if metric is not None and metric != metrics["metric"]:
        metrics = rescore(ctx, manifest["split"], metric)
        click.echo(
            f"{metric}: scored again from the stage's devkit result files; the stored evaluation "
            f"({manifest['metrics']['metric']}, the pipeline's evaluate.metric) is kept"
        )
    click.echo(evaluate.table(ctx, {"metrics": metrics}))
    if json_out:
        write_json(json_out, metrics)


def rescore(ctx, split: str, metric: str) -> dict:
    """The evaluate stage's results scored again with ``metric`` from the devkit files it wrote, both variants,
    in the shape of its ``results.json`` metrics (without its timings). Reads only."""
    from rcnn.evaluation.detfiles import read_detections
    from rcnn.evaluation.scoring import ground_truth_by_class
    from rcnn.evaluation.voc import evaluate
    from rcnn.stages.evaluate import NAME, VARIANTS

    gt = ground_truth_by_class(ctx.dataset(split).annotations(), ctx.classes)
    scored = {
        variant: evaluate(read_detections(ctx.unit_dir(NAME, split) / folder, split, ctx.classes), gt, metric=metric)
        for variant, folder in VARIANTS.items()
    }
    plain, bbox = scored["plain"], scored["bbox"]
    return {
        "metric": metric,
        "mAP": plain.mAP,
        "mAP_bbox": bbox.mAP,
        "per_class": plain.to_json()["per_class"],
        "per_class_bbox": bbox.to_json()["per_class"],
    }
