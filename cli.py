"""The `rcnn` command: parse arguments, load the pipeline, call a stage, print the result."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import click

from rcnn.config import PipelineFile, default_pipelines_file
from rcnn.errors import ConfigError, UserError
from rcnn.runtime import keep_freed_memory

RUNS_DIR_HELP = "Folder holding one sub-folder per pipeline [default: $RCNN_RUNS_DIR or ./runs]."


def _runs_dir(value: str | None) -> Path:
    return Path(value or os.environ.get("RCNN_RUNS_DIR", "runs"))


def pipeline_options(f):
    """Options shared by every command that runs or inspects a pipeline's stages."""
    f = click.option(
        "--pipelines-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="The pipelines YAML [default: $RCNN_PIPELINES, ./pipelines.yaml, or the one shipped].",
    )(f)
    f = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override one configuration value, e.g. --set proposals.max_proposals=2000 (repeatable).",
    )(f)
    f = click.option("--runs-dir", default=None, help=RUNS_DIR_HELP)(f)
    return f


SKIP_BAD_HELP = (
    "Leave out images whose data is bad (missing or undecodable image, malformed XML, size or box errors, "
    "unknown class) instead of stopping: each is logged and listed in the manifests and the summary."
)


def stage_options(f):
    f = click.option("--skip-bad", is_flag=True, help=SKIP_BAD_HELP)(f)
    f = click.option("--force", is_flag=True, help="Recompute even when the stage is up to date.")(f)
    f = click.option(
        "--wait", is_flag=True, help="If another process is writing the same stage, wait for it instead of refusing."
    )(f)
    f = click.option("--quiet", is_flag=True, help="No progress bars.")(f)
    return pipeline_options(f)


def ensure_data(ctx) -> None:
    """Before a pipeline's first stage: its synthetic data generated if missing, its annotations checked."""
    from rcnn.stages.prepare import ensure_data as prepare

    prepare(ctx)


def make_context(pipeline, runs_dir, overrides, pipelines_file, force=False, wait=False, quiet=False, skip_bad=False):
    from rcnn.stages.context import Context

    pfile = PipelineFile(pipelines_file or default_pipelines_file())
    cfg = pfile.load(pipeline, overrides)
    return Context(cfg=cfg, runs_dir=_runs_dir(runs_dir), force=force, wait=wait, progress=not quiet, skip_bad=skip_bad)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="rcnn")
def cli():
    """R-CNN and SPP-net object detection as staged, cached jobs.

    Each stage reads its inputs from and writes its outputs to an artifact store
    (./runs/<pipeline>/<stage>/<split>/ by default). A stage whose inputs,
    parameters and code are unchanged is skipped; `rcnn status` tells which
    stages are done, stale (and why) or missing.

    \b
    Quick start:
      rcnn pipelines                  # the named configurations in pipelines.yaml
      rcnn run                        # the demo pipeline on generated data
      rcnn status demo                # what is done, stale or missing
      rcnn evaluate --data VOC --split test --detections results/

    On Linux the C allocator is told to reuse freed memory (R-CNN's feature
    extraction runs about 2x faster on a CPU); RCNN_KEEP_FREED_MEMORY=0 turns it off.
    """
    keep_freed_memory()


@cli.command("pipelines")
@click.option("--pipelines-file", type=click.Path(dir_okay=False), default=None, help="The pipelines YAML.")
def pipelines_cmd(pipelines_file):
    """List the pipelines defined in pipelines.yaml and what each needs: its data, its weights (and whether
    they are here), and the hardware it is sized for (and whether a GPU is visible here)."""
    pfile = PipelineFile(pipelines_file or default_pipelines_file())
    click.echo(f"pipelines in {pfile.path.resolve()}:")
    gpu_here = None
    for name in pfile.names:
        cfg = pfile.load(name)
        click.echo(f"  {name}: {cfg.description}")
        click.echo(f"      data: {_where(pfile, name, 'data.root', cfg.data.root, 'synthetic, generated under the runs folder')}")
        weights = cfg.model.weights
        if weights == "imagenet":
            from rcnn.modeling.models import imagenet_weights_file

            url, path = imagenet_weights_file(cfg.model.backbone)
            there = "" if path.is_file() else f" (not there: downloaded on first use; offline, put {url} there)"
            click.echo(f"      weights: torchvision's ImageNet {cfg.model.backbone}, {path}{there}")
        elif weights.startswith("pipeline:"):
            click.echo(f"      weights: pipeline {weights.split(':', 1)[1]}'s fine-tuned model (run that pipeline first)")
        elif weights != "scratch":
            click.echo(f"      weights: {_where(pfile, name, 'model.weights', weights, '')}")
        if cfg.hardware == "gpu":
            if gpu_here is None:
                import torch

                gpu_here = torch.cuda.is_available()
            visible = "" if gpu_here else "; none is visible here (a CPU run would be far slower)"
            click.echo(f"      hardware: a GPU (CUDA){visible}")
        elif cfg.hardware == "cpu":
            click.echo("      hardware: a CPU is enough")


def _where(pfile: PipelineFile, name: str, key: str, path: str | None, when_none: str) -> str:
    """A configured path and whether it is there; if not, how to point the pipeline elsewhere."""
    if path is None:
        return when_none
    if Path(path).exists():
        return path
    ways = [f"set {v}" for v in pfile.environment_variables(name, key)] + [f"--set {key}=PATH"]
    return f"{path} (not there: {' or '.join(ways)})"


@cli.command("config")
@click.argument("pipeline")
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one value (repeatable), as stages take it."
)
@click.option("--pipelines-file", type=click.Path(dir_okay=False), default=None, help="The pipelines YAML.")
def config_cmd(pipeline, overrides, pipelines_file):
    """Print PIPELINE's resolved configuration as YAML, each value marked with its origin.

    \b
    Origins: default (rcnn/config/schema.py), pipeline (its own section of the pipelines
    file), parent NAME (inherited through `extends`), --set (this command line).
    Relative paths are shown resolved. Example:
      rcnn config voc07-mini-spp --set finetune.lr=0.0005
    """
    from rcnn.config.view import render_config

    pfile = PipelineFile(pipelines_file or default_pipelines_file())
    cfg = pfile.load(pipeline, overrides)
    click.echo(f"# pipeline {pipeline} from {pfile.path.resolve()}; the comments say where each value comes from")
    click.echo(f"name: {pipeline}")
    click.echo(render_config(cfg, pfile.origins(pipeline, overrides)))


# ----------------------------------------------------------------------------- data


@cli.group("data")
def data_group():
    """Create or inspect datasets in PASCAL VOC layout."""


@data_group.command("synth")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--images", default=60, show_default=True, help="Number of images.")
@click.option("--seed", default=0, show_default=True, help="Random seed; the same seed gives identical files.")
@click.option("--size", default=256, show_default=True, help="Image side in pixels.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def data_synth(directory, images, seed, size, quiet):
    """Write a synthetic shapes dataset (5 classes) in VOC layout to DIRECTORY.

    Circles, squares, triangles, stars and crosses of random colours on cluttered,
    textured backgrounds, 1-6 per image, some overlapping or cut by the border.
    The result has JPEGImages/, Annotations/ and ImageSets/Main/{trainval,test}.txt.
    """
    from rcnn.data.synth import generate_dataset

    summary = generate_dataset(Path(directory), n_images=images, seed=seed, size=size, progress=not quiet)
    click.echo(f"wrote {directory}: {summary}")


@data_group.command("stats")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--split", default="trainval", show_default=True, help="Split file name in ImageSets/Main.")
def data_stats(directory, split):
    """Print images, objects per class, difficult counts and box sizes of a VOC split."""
    from rcnn.data.datasets import VOCDataset
    from rcnn.data.stats import dataset_stats, format_stats

    click.echo(format_stats(dataset_stats(VOCDataset(directory, split))))


# ----------------------------------------------------------------------------- stages


def _run_one(stage_name: str, ctx) -> None:
    from rcnn.stages import STAGES, pipeline_stages
    from rcnn.stages.runner import run_stage

    if stage_name not in pipeline_stages(ctx.cfg.method):
        raise ConfigError(f"stage '{stage_name}' belongs to SPP-net pipelines; '{ctx.cfg.name}' is an R-CNN pipeline")
    stage = STAGES[stage_name]
    manifests = run_stage(ctx, stage)
    for split, manifest in manifests.items():
        skipped = manifest.get("data", {}).get("images_skipped")
        click.echo(f"{stage_name}/{split}: {stage.describe(manifest)}" + (f"; {skipped} bad image(s) skipped" if skipped else ""))
    return manifests


STAGE_HELP = {
    "proposals": """Selective search proposals for both splits of PIPELINE.

    Parallel over images (proposals.n_jobs worker processes, all cores by default),
    resumable after a kill, and shared with any other pipeline whose data and
    proposal settings are identical. Prints recall at IoU 0.5/0.7 and MABO.
    """,
    "convmaps": """SPP-net only: cache the conv trunk's feature maps of every image, once per scale.

    The trunk (model.weights) stays fixed, as in SPP-net. Images are resized so the
    shorter side is each of spp.scales (688, or 480/576/688/864/1200 for multi-scale);
    every window is later pyramid-pooled from these maps. With finetune.mirror (the
    default, as SPP-net's released code fine-tunes) the trainval split also caches the
    maps of the flipped images, which fine-tuning reads. Resumable per image.
    """,
    "finetune": """Fine-tune the CNN on regions of the trainval split of PIPELINE.

    SPP-net pipelines train only fc6, fc7 and the classifier on windows pooled from the
    cached conv maps (background IoU in [0.1, 0.5), as in SPP-net). Windows map to cells
    by SPP-net's rule, with the trunk's receptive-field offset (spp.offset: trunk; 0 for
    the formula as printed). With finetune.mirror half the training windows are read
    from the flipped image's maps, at the mirrored place; spp.random_scale pools them at
    a random scale instead of the closest (both from SPP-net's released code).

    Regions are proposals plus ground-truth boxes, warped with finetune.context_pad
    pixels of context (R-CNN: 16); IoU >= 0.5 with an object is that class, the rest
    background; 128-region mini-batches with 32 foreground; SGD (lr 0.001, momentum
    0.9, weight decay 5e-4). Validation accuracy on held-out images every
    finetune.eval_every iterations, when a checkpoint is written; a rerun after a kill
    resumes from it. Uses CUDA with bfloat16 autocast when a GPU is present.
    """,
    "features": """Cache the fine-tuned CNN's features of every box of both splits (HDF5, float16).

    pool5 (for box regression) and fc7 (for the SVMs) by default (features.layers),
    with each box's class overlaps; resumable per image.
    """,
    "train-svm": """Train one linear SVM per class on cached features, mining hard negatives.

    As R-CNN: ground-truth boxes are positives, proposals under IoU 0.3 negatives,
    features scaled to mean norm 20, C = 0.001, positive weight 2, bias multiplier 10;
    one pass of hard-negative mining (keep > -1.0001, evict < -1.2).
    """,
    "train-bbox": """Train class-specific ridge box regressors from cached pool5 features.

    As R-CNN (appendix C): proposals with IoU >= 0.6 to an object, targets (tx, ty,
    tw, th) centred and whitened, ridge lambda 1000.
    """,
}


def _stage_command(stage_name: str):
    @stage_options
    @click.argument("pipeline")
    def command(pipeline, runs_dir, overrides, pipelines_file, force, wait, quiet, skip_bad):
        ctx = make_context(pipeline, runs_dir, overrides, pipelines_file, force, wait, quiet, skip_bad)
        ensure_data(ctx)
        _run_one(stage_name, ctx)

    command.__doc__ = STAGE_HELP[stage_name]
    return cli.command(stage_name)(command)


for _name in STAGE_HELP:
    _stage_command(_name)


SEEDS_HELP = (
    "Comma-separated seeds, e.g. 0,1,2: run PIPELINE once per seed k as PIPELINE@seed<k> (finetune.seed and "
    "model.seed set to k), each in runs/PIPELINE@seed<k>/; what no seed touches (proposals, SPP-net's conv maps) "
    "is computed once and shared."
)


def _seeded(pipeline: str, seeds: str | None) -> list[str]:
    """The pipeline names ``--seeds`` stands for: ``demo@seed0, demo@seed1, ...``, or ``[pipeline]`` without it."""
    from rcnn.config.seeds import parse_seeds, seeded_name, split_seeded_name

    if seeds is None:
        return [pipeline]
    if split_seeded_name(pipeline)[1] is not None:
        raise ConfigError(f"--seeds: '{pipeline}' already names one seed; give the pipeline, {split_seeded_name(pipeline)[0]}")
    return [seeded_name(pipeline, k) for k in parse_seeds(seeds)]


@cli.command("run")
@click.argument("pipeline", default="demo")
@click.option("--until", "until", default=None, help="Stop after this stage.")
@click.option("--seeds", default=None, metavar="K,K,...", help=SEEDS_HELP)
@stage_options
def run_cmd(pipeline, until, seeds, runs_dir, overrides, pipelines_file, force, wait, quiet, skip_bad):
    """Run every stage of PIPELINE (default: demo) in order, skipping those up to date.

    With --seeds, once per seed, then the AP of every class as mean ± sample standard deviation over the
    seeds (`rcnn compare PIPELINE --seeds ...` writes the same as a report). Example:

    \b
      rcnn run voc07-mini --seeds 0,1,2
    """
    from rcnn.stages import STAGES, pipeline_stages
    from rcnn.stages.context import skip_summary

    if until is not None and until not in STAGES:
        raise ConfigError(f"--until {until}: unknown stage (stages: {', '.join(STAGES)})")
    names = _seeded(pipeline, seeds)
    contexts = [make_context(name, runs_dir, overrides, pipelines_file, force, wait, quiet, skip_bad) for name in names]
    _warn_without_gpu(contexts[0].cfg)
    results = []
    for ctx in contexts:
        if seeds is not None:
            click.echo(f"== {ctx.cfg.name} ({ctx.root})")
        ensure_data(ctx)
        for name in pipeline_stages(ctx.cfg.method):
            manifest = _run_one(name, ctx)
            if name == until:
                break
        else:
            from rcnn.stages import evaluate

            manifest = manifest["test"] if "test" in manifest else next(iter(manifest.values()))
            results.append(manifest["metrics"])
            if seeds is None:
                click.echo(evaluate.table(ctx, manifest))
        for line in skip_summary(ctx):
            click.echo(line)
    if seeds is not None and results:
        from rcnn.config.seeds import split_seeded_name
        from rcnn.report.seeds import seeds_table

        click.echo(f"{pipeline} over seeds:")
        click.echo(seeds_table(contexts[0].classes, [split_seeded_name(c.cfg.name)[1] for c in contexts], results))


def _warn_without_gpu(cfg) -> None:
    if cfg.hardware != "gpu":
        return
    import torch

    if cfg.model.device == "cpu" or not torch.cuda.is_available():
        click.echo(f"note: pipeline '{cfg.name}' is sized for a GPU (hardware: gpu) but runs on the CPU: far slower", err=True)


@cli.command("detect")
@click.argument("pipeline")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the drawn images and JSON.")
@click.option(
    "--threshold",
    default=0.0,
    show_default=True,
    help="Draw and list detections with an SVM score at least this (0 is the SVM margin).",
)
@click.option("--no-bbox-reg", is_flag=True, help="Skip box regression.")
@pipeline_options
def detect_cmd(pipeline, images, out_dir, threshold, no_bbox_reg, runs_dir, overrides, pipelines_file):
    """Run PIPELINE's trained detector on any IMAGES.

    Proposals are computed on the fly with the pipeline's settings; each image is
    written to --out with its labelled boxes drawn (<name>.det.jpg) beside a JSON of
    its detections (<name>.json: class, score, box as x1 y1 x2 y2 pixels); images of
    the same name get <name>-2, <name>-3, ... An image that cannot be read is named on
    stderr and the rest are processed; the exit status is then 1. Images are only
    read, never executed or trusted beyond decoding. Example:

    \b
      rcnn detect demo runs/_data/synth-n60-s0-px256/JPEGImages/000003.jpg --out det/
    """
    from rcnn.detection.detector import detect_files
    from rcnn.stages import evaluate, finetune

    ctx = make_context(pipeline, runs_dir, overrides, pipelines_file, quiet=True)
    model, meta = finetune.load(ctx)
    detector = evaluate.build_detector(ctx, model, tuple(meta["classes"]), bbox=not no_bbox_reg)
    out = Path(out_dir)
    failed = 0
    for r in detect_files(detector, images, out, threshold, ctx.cfg.proposals.seed):
        if r.error is not None:
            failed += 1
            click.echo(f"skipped: {r.error}", err=True)
            continue
        found = r.detections
        best = ", ".join(f"{d['class']} {d['score']:.2f}" for d in found[:5])
        line = f"{r.path}: {len(found)} detections{(' (' + best + (', ...' if len(found) > 5 else '') + ')') if found else ''}"
        click.echo(line + (f" -> {r.output}.json" if r.output != Path(r.path).stem else ""))
    if failed:
        raise UserError(f"{failed} of {len(images)} image(s) could not be read (each named above); the others are in {out}")
    click.echo(f"wrote {out}")


@cli.command("compare")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the report.")
@click.option("--label", "labels", multiple=True, help="Display name per run, in order (e.g. --label R-CNN --label SPP-net).")
@click.option("--images", "grid_images", default=6, show_default=True, help="Test images in the detection grid.")
@click.option(
    "--seeds",
    default=None,
    metavar="K,K,...",
    help="Compare each RUN over these seeds (its runs RUN@seed<k>, as `rcnn run RUN --seeds` writes them): AP as "
    "mean ± sample standard deviation, with n and min–max; one RUN is enough.",
)
@click.option("--runs-dir", default=None, help=RUNS_DIR_HELP)
def compare_cmd(runs, out_dir, labels, grid_images, seeds, runs_dir):
    """Write a side-by-side report of two or more finished runs (the first is the baseline).

    Each RUN is a pipeline name (looked up in the runs folder) or a path to a run folder.
    Runs no stage and changes nothing in the runs folder. From each run's manifests and
    results.json: mAP with and without box regression, per-class AP, the settings that
    differ, per-stage wall time and throughput, test time per image split into
    proposals / features / classification, feature cache size and speed-up ratios. It
    also reads the test split's annotations (in the data folder the manifests name) and
    each run's box-regressed devkit detection files, re-scores those as the devkit does
    to draw precision-recall curves, and decodes the first --images test images with
    objects for a grid of detections. Writes report.md, a self-contained report.html
    and figures/*.png. Example:

    \b
      rcnn compare demo demo-spp --label R-CNN --label SPP-net --out report/
      rcnn compare voc07-mini voc07-mini-spp --seeds 0,1,2 --out report/
    """
    import dataclasses

    from rcnn.report.runs import load_run
    from rcnn.report.study import write_report

    if len(runs) < (1 if seeds else 2):
        raise click.UsageError(
            f"give two or more RUNS to compare (the first is the baseline), got {len(runs)}", ctx=click.get_current_context()
        )
    if labels and len(labels) != len(runs):
        raise ConfigError(f"--label given {len(labels)} times for {len(runs)} runs")
    groups = []
    for k, run in enumerate(runs):
        path = Path(run) if Path(run).is_dir() and not (_runs_dir(runs_dir) / run).is_dir() else _runs_dir(runs_dir) / run
        group = []
        for name in _seeded(path.name, seeds):
            seed_path = path.with_name(name)
            if seeds and not seed_path.is_dir():
                raise UserError(f"run folder '{seed_path}' does not exist; `rcnn run {path.name} --seeds {seeds}` makes it")
            summary = load_run(seed_path)
            summary = dataclasses.replace(summary, label=labels[k] if labels else path.name if seeds else summary.label)
            group.append(summary)
            for sentence in summary.missing:
                click.echo(f"{summary.name if seeds else summary.label}: {sentence}", err=True)
        groups.append(group)
    summaries = [group[0] for group in groups]
    written = write_report(summaries, Path(out_dir), grid_images=grid_images, seed_runs=groups if seeds else None)
    click.echo(f"wrote {written.get('html', out_dir)} and {written.get('markdown', '')}")


@cli.command("status")
@click.argument("pipeline", required=False)
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Judge the stages as a run with --skip-bad would [default: so if the pipeline was built with it].",
)
@click.option("--verify", is_flag=True, help="Also hash every output and compare it with its manifest (reads every cached file).")
@click.option("--seeds", default=None, metavar="K,K,...", help="Show PIPELINE's seed runs, PIPELINE@seed<k>.")
@pipeline_options
def status_cmd(pipeline, skip_bad, verify, seeds, runs_dir, overrides, pipelines_file):
    """Show each stage of PIPELINE (default: every pipeline with a runs folder, seed runs included): done,
    stale and why, or missing.

    An output whose size (or, with --verify, whose bytes) differ from what its manifest
    recorded shows the stage as damaged; rerun that stage with --force."""
    from rcnn.config.seeds import split_seeded_name
    from rcnn.stages import pipeline_stages
    from rcnn.stages.context import skip_summary
    from rcnn.stages.provenance import built_with_skip_bad
    from rcnn.stages.runner import unit_status

    pfile = PipelineFile(pipelines_file or default_pipelines_file())
    runs = _runs_dir(runs_dir)
    if seeds is not None and pipeline is None:
        raise ConfigError("--seeds: give the PIPELINE whose seed runs to show")
    if pipeline:
        names = _seeded(pipeline, seeds)
    else:
        folders = [p.name for p in runs.iterdir() if p.is_dir()] if runs.is_dir() else []
        seed = lambda f: -1 if split_seeded_name(f)[1] is None else split_seeded_name(f)[1]  # noqa: E731
        names = [f for n in pfile.names for f in sorted(folders, key=seed) if split_seeded_name(f)[0] == n]
    if not names:
        click.echo(f"no runs in {runs} yet; start one with `rcnn run`")
    for name in names:
        ctx = make_context(name, runs_dir, overrides, pipelines_file, quiet=True)
        if skip_bad or built_with_skip_bad(ctx):  # before any dataset is read, so the switch holds for all
            ctx.skip_bad = True
            ctx.log = lambda line: None  # the summary below names the skipped images once
        click.echo(f"{name}  ({ctx.root})")
        for stage_name, stage in pipeline_stages(ctx.cfg.method).items():
            for split in stage.splits(ctx):
                st = unit_status(ctx, stage, split, verify)
                line = f"  {stage_name + '/' + split:<24} {st.state:<8}"
                if st.manifest is not None:
                    size = sum(o["bytes"] for o in st.manifest["outputs"].values())
                    line += f" {_human(size):>9}  {st.manifest['timings']['wall_s']:8.1f} s"
                    skipped = st.manifest.get("data", {}).get("images_skipped")
                    line += f"  {skipped} bad image(s) skipped" if skipped else ""
                if st.reasons:
                    line += "  " + "; ".join(st.reasons)
                click.echo(line)
        for line in skip_summary(ctx):
            click.echo("  " + line)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


@cli.command("evaluate")
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
):
    """Detect on PIPELINE's test split and score it, or score any detector's devkit files.

    \b
    With PIPELINE: run the evaluate stage (test proposals scored by the class SVMs,
    per-class NMS, with and without box regression), write devkit result files and
    precision-recall plots to the runs folder, and print the AP table. Like every
    stage it is skipped when up to date; --force recomputes it. Example:
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
        _evaluate_pipeline(pipeline, metric, json_out, runs_dir, overrides, pipelines_file, force, wait, quiet, skip_bad)
        return
    given = {
        "--set": overrides,
        "--runs-dir": runs_dir,
        "--pipelines-file": pipelines_file,
        "--force": force,
        "--wait": wait,
        "--quiet": quiet,
        "--skip-bad": skip_bad,
    }
    extra = [name for name, value in given.items() if value]
    if extra:
        raise ConfigError(f"{', '.join(extra)} apply to a pipeline's evaluation: rcnn evaluate PIPELINE {extra[0]} ...")
    if data_dir is None or detections is None:
        raise ConfigError("give a PIPELINE, or --data VOCDIR and --detections PATH to score devkit files")
    from rcnn.evaluation.scoring import format_ap_table, score_devkit_detections

    split = split or "test"
    wanted = tuple(c.strip() for c in classes.split(",") if c.strip()) if classes is not None else None
    if wanted is not None and not wanted:
        raise ConfigError("--classes: give at least one class name")
    result = score_devkit_detections(Path(data_dir), split, Path(detections), metric or "voc07", classes=wanted)
    click.echo(format_ap_table(result, f"{data_dir} [{split}], detections from {detections}"))
    if json_out:
        _write_json(json_out, result.to_json())


def _evaluate_pipeline(pipeline, metric, json_out, runs_dir, overrides, pipelines_file, force, wait, quiet, skip_bad):
    from rcnn.stages import evaluate

    overrides = (*overrides, f"evaluate.metric={metric}") if metric else overrides
    ctx = make_context(pipeline, runs_dir, overrides, pipelines_file, force, wait, quiet, skip_bad)
    ensure_data(ctx)
    manifests = _run_one("evaluate", ctx)
    manifest = next(iter(manifests.values()))
    click.echo(evaluate.table(ctx, manifest))
    if json_out:
        _write_json(json_out, manifest["metrics"])


def _write_json(path: str, value: dict) -> None:
    from rcnn.store.artifacts import write_json_atomic

    write_json_atomic(Path(path), value)
    click.echo(f"wrote {path}")


# ----------------------------------------------------------------------------- entry point


INTERRUPTED = "rcnn: interrupted; completed work is kept and a rerun resumes it"


def main(argv=None) -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit."""
    try:
        code = cli.main(args=argv, prog_name="rcnn", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:
        command = e.ctx.command_path if e.ctx else "rcnn"
        click.echo(f"{command}: error: {e.format_message()} (see '{command} --help')", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort as e:
        # Click turns Ctrl-C into Abort (from the KeyboardInterrupt) when it does not exit itself.
        click.echo(INTERRUPTED if isinstance(e.__cause__, KeyboardInterrupt) else "aborted", err=True)
        sys.exit(130)
    except UserError as e:
        click.echo(f"rcnn: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM):
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"rcnn: error: {e.strerror}{where}; completed work is kept", err=True)
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
