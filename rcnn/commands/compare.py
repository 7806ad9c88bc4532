"""`rcnn compare`: the side-by-side report of finished runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click

from rcnn.commands.shared import output_folder, pipeline_options, runs_dir_path, seeded_names
from rcnn.errors import ConfigError, UserError


@click.command("compare")
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
@pipeline_options
def compare_cmd(runs, out_dir, labels, grid_images, seeds, runs_dir, overrides, pipelines_file):
    """Write a side-by-side report of two or more finished runs (the first is the baseline).

    Each RUN is a pipeline name (looked up in the runs folder) or a path to a run folder.
    Runs no stage and changes nothing in the runs folder. From each run's manifests and
    results.json: mAP with and without box regression, per-class AP, the settings that
    differ, per-stage wall time and throughput, test time per image split into
    proposals / features / classification, feature cache size and speed-up ratios. It
    also reads the test split's annotations (in the data folder the manifests name) and
    each run's box-regressed devkit detection files, re-scores those as the devkit does
    to draw precision-recall curves and with COCO's AP (IoU 0.50:0.95, AP50, AP75, by
    box area; needs pycocotools), sorts their false positives by type (localisation,
    another class, background), and decodes the first --images test images with
    objects for a grid of detections. Writes report.md, a self-contained report.html
    and figures/*.png. A run whose results are stale under today's pipelines file and
    code (as `rcnn status` judges them, with the same --pipelines-file and --set: give
    those the runs were made with) is reported as recorded, and said to be stale. Example:

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
    out = output_folder(out_dir)
    groups = []
    for k, run in enumerate(runs):
        path = Path(run) if Path(run).is_dir() and not (runs_dir_path(runs_dir) / run).is_dir() else runs_dir_path(runs_dir) / run
        group = []
        for name in seeded_names(path.name, seeds):
            seed_path = path.with_name(name)
            if seeds and not seed_path.is_dir():
                raise UserError(f"run folder '{seed_path}' does not exist; `rcnn run {path.name} --seeds {seeds}` makes it")
            summary = load_run(seed_path)
            missing = [_reaching(sentence, seed_path) for sentence in summary.missing]
            missing += stale_results(seed_path, overrides, pipelines_file)
            label = labels[k] if labels else path.name if seeds else summary.label
            summary = dataclasses.replace(summary, label=label, missing=missing)
            group.append(summary)
            for sentence in summary.missing:
                click.echo(f"{summary.name if seeds else summary.label}: {sentence}", err=True)
        groups.append(group)
    summaries = [group[0] for group in groups]
    written = write_report(summaries, out, grid_images=grid_images, seed_runs=groups if seeds else None)
    click.echo(f"wrote {written.get('html', out_dir)} and {written.get('markdown', '')}")


def stale_results(run_dir: Path, overrides: tuple[str, ...] = (), pipelines_file: str | None = None) -> list[str]:
    """A sentence on the units of the run that are stale under the pipelines file and code of today (as
    ``rcnn status`` judges them: with ``overrides`` as its ``--set`` values, with ``--skip-bad`` where the run was
    built with it), or none; none for a folder no pipeline is named after."""
    from rcnn.config import PipelineFile, default_pipelines_file
    from rcnn.config.seeds import split_seeded_name
    from rcnn.stages import pipeline_stages
    from rcnn.stages.context import Context
    from rcnn.stages.provenance import built_with_skip_bad
    from rcnn.stages.runner import unit_status

    pfile = PipelineFile(pipelines_file or default_pipelines_file())
    try:
        cfg = pfile.load(run_dir.name, overrides)
    except ConfigError:
        if overrides and split_seeded_name(run_dir.name)[0] in pfile.names:
            raise  # a --set this pipeline rejects: said, not ignored
        return []
    ctx = Context(cfg=cfg, runs_dir=run_dir.parent, progress=False, log=lambda _: None)
    ctx.skip_bad = built_with_skip_bad(ctx)  # as `rcnn status` judges it: its bad images left out, not "data changed"
    stale = []
    for name, stage in pipeline_stages(cfg.method).items():
        try:
            splits = stage.splits(ctx)
        except UserError:
            return []
        for split in splits:
            status = unit_status(ctx, stage, split)
            if status.state == "stale":
                stale.append((f"{name}/{split}", status.reasons[0] if status.reasons else ""))
    if not stale:
        return []
    (first, why), more = stale[0], len(stale) - 1
    others = f" and {more} unit(s) after it" if more else ""
    options = "".join(f" --set {shlex.quote(o)}" for o in overrides)
    options += f" --pipelines-file {shlex.quote(pipelines_file)}" if pipelines_file else ""
    return [
        _reaching(
            f"{first} ({why}){others} are stale, as `rcnn status {run_dir.name}{options}` says: the report shows the "
            f"figures they recorded; `rcnn run {run_dir.name}{options}` recomputes them"
            + ("" if overrides else " (for a run made with --set options, give `rcnn compare` the same ones first)"),
            run_dir,
        )
    ]


def _reaching(sentence: str, run_dir: Path) -> str:
    """``sentence`` with ``--runs-dir`` in each `rcnn STAGE NAME` it gives, where the run is not in the default runs
    folder: a bare `rcnn run NAME` there would compute in ./runs, not in the folder compared."""
    if run_dir.parent.resolve() == runs_dir_path(None).resolve():
        return sentence
    where = f" --runs-dir {shlex.quote(str(run_dir.parent))}"
    pattern = rf"`(rcnn [a-z-]+ {re.escape(run_dir.name)})(?! --runs-dir)([ `])"
    return re.sub(pattern, lambda m: f"`{m.group(1)}{where}{m.group(2)}", sentence)
