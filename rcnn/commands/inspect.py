"""Commands that read and explain without computing: `rcnn pipelines`, `rcnn config`, `rcnn status`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from rcnn.commands.shared import PIPELINES_FILE_HELP, make_context, pipeline_options, runs_dir_path, seeded_names
from rcnn.config import PipelineFile, default_pipelines_file
from rcnn.errors import ConfigError, UserError
from rcnn.report.render import human_size
from rcnn.report.runs import resumed_note


@click.command("pipelines")
@click.option("--pipelines-file", type=click.Path(dir_okay=False), default=None, help=PIPELINES_FILE_HELP)
def pipelines_cmd(pipelines_file):
    """List the pipelines defined in pipelines.yaml and what each needs: its data, its weights (and whether
    they are here), and the hardware it is sized for (and whether a GPU is visible here)."""
    pfile = PipelineFile(pipelines_file or default_pipelines_file())
    gpu_here, shown = None, None
    for name in pfile.names:
        if pfile.file_of(name) != shown:  # your file's pipelines, then the shipped ones it leaves as they are
            shown = pfile.file_of(name)
            click.echo(
                f"pipelines in {shown.resolve()}:" if shown == pfile.path else f"shipped with the package ({shown.resolve()}):"
            )
        cfg = pfile.load(name)
        click.echo(f"  {name}: {cfg.description or _undescribed(pfile.file_of(name), name)}")
        click.echo(f"      data: {_where(pfile, name, 'data.root', cfg.data.root, 'synthetic, generated under the runs folder')}")
        weights = cfg.model.weights
        if weights == "imagenet":
            from rcnn.modeling.checkpoints import imagenet_weights_file

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


def _undescribed(path: Path, name: str) -> str:
    """What to say of a pipeline without a description of its own (a parent's would describe another pipeline)."""
    from rcnn.config.yamlfile import load_yaml

    parent = (load_yaml(path.read_text()).get("pipelines") or {}).get(name, {}).get("extends")
    return f"(no description; extends {parent})" if parent else "(no description)"


def _where(pfile: PipelineFile, name: str, key: str, path: str | None, when_none: str) -> str:
    """A configured path and whether it is there; if not, how to point the pipeline elsewhere."""
    if path is None:
        return when_none
    if Path(path).exists():
        return path
    ways = [f"set {v}" for v in pfile.environment_variables(name, key)] + [f"--set {key}=PATH"]
    return f"{path} (not there: {' or '.join(ways)})"


@click.command("config")
@click.argument("pipeline")
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one value (repeatable), as stages take it."
)
@click.option("--pipelines-file", type=click.Path(dir_okay=False), default=None, help=PIPELINES_FILE_HELP)
def config_cmd(pipeline, overrides, pipelines_file):
    """Print PIPELINE's resolved configuration as YAML, each value marked with its origin.

    \b
    Origins: default (rcnn/config/schema.py), pipeline (its own section of the pipelines
    file), parent NAME (inherited through `extends`), name @seed<k> (a seed run's
    seeds, from its name), --set (this command line).
    Relative paths are shown resolved. Example:
      rcnn config voc07-mini-spp --set finetune.lr=0.0005
    """
    from rcnn.config.view import render_config

    pfile = PipelineFile(pipelines_file or default_pipelines_file())
    cfg = pfile.load(pipeline, overrides)
    click.echo(f"# pipeline {pipeline} from {pfile.file_of(pipeline).resolve()}; the comments say where each value comes from")
    click.echo(f"name: {pipeline}")
    click.echo(render_config(cfg, pfile.origins(pipeline, overrides)))


@click.command("status")
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
    recorded shows the stage as damaged; rerun that stage with --force. Exit status 1 when
    an output is damaged (stale and missing stages are not errors: the next run computes them)."""
    from rcnn.config.seeds import split_seeded_name
    from rcnn.stages import pipeline_stages
    from rcnn.stages.context import skip_summary
    from rcnn.stages.prepare import check_data, synthetic_data_pending
    from rcnn.stages.provenance import built_with_skip_bad
    from rcnn.stages.runner import unit_status

    pfile = PipelineFile(pipelines_file or default_pipelines_file())
    runs = runs_dir_path(runs_dir)
    if seeds is not None and pipeline is None:
        raise ConfigError("--seeds: give the PIPELINE whose seed runs to show")
    if pipeline:
        names = seeded_names(pipeline, seeds)
    else:
        folders = [p.name for p in runs.iterdir() if p.is_dir()] if runs.is_dir() else []
        seed = lambda f: -1 if split_seeded_name(f)[1] is None else split_seeded_name(f)[1]  # noqa: E731
        names = [f for n in pfile.names for f in sorted(folders, key=seed) if split_seeded_name(f)[0] == n]
    if not names:
        click.echo(f"no runs in {runs} yet; start one with `rcnn run`")
    damaged = 0
    for name in names:
        ctx = make_context(name, runs_dir, overrides, pipelines_file, quiet=True)
        if skip_bad or built_with_skip_bad(ctx):  # before any dataset is read, so the switch holds for all
            ctx.skip_bad = True
            ctx.log = lambda line: None  # the summary below names the skipped images once
        click.echo(f"{name}  ({ctx.root})")
        # Not "dataset root does not exist (set data.root ...)": the data is generated by the first run.
        pending = synthetic_data_pending(ctx)
        data_problem = None
        if not pending:  # what the next run checks before its first stage, which a unit's record cannot tell
            try:
                for note in check_data(ctx):
                    click.echo("  " + note)
            except UserError as e:
                data_problem = str(e)
                # Said once, here: every unit that reads the data would repeat it.
                click.echo(f"  data: the next run stops before its first stage: {data_problem}")
        for stage_name, stage in pipeline_stages(ctx.cfg.method).items():
            for split in stage.splits(ctx):
                st = unit_status(ctx, stage, split, verify)
                damaged += st.state == "damaged"
                if pending:
                    st.reasons = [
                        "never run; the synthetic data is generated by the first run"
                        if st.manifest is None
                        else f"its synthetic data ({ctx.data_root}) is gone; the next run generates it again"
                    ]
                line = f"  {stage_name + '/' + split:<24} {st.state:<8}"
                if st.manifest is not None:
                    size = sum(o["bytes"] for o in st.manifest["outputs"].values())
                    line += f" {human_size(size):>9}  {st.manifest['timings']['wall_s']:8.1f} s"
                    resumed = resumed_note(st.manifest.get("metrics") or {})
                    line += f" ({resumed})" if resumed else ""
                    skipped = st.manifest.get("data", {}).get("images_skipped")
                    line += f"  {skipped} bad image(s) skipped" if skipped else ""
                if st.reasons:
                    said = "its data cannot be read (data: above)"
                    line += "  " + "; ".join(said if r == data_problem else r for r in st.reasons)
                click.echo(line)
        for line in skip_summary(ctx):
            click.echo("  " + line)
    if damaged:
        click.echo(f"{damaged} stage output(s) damaged; rerun each with --force", err=True)
        sys.exit(1)
