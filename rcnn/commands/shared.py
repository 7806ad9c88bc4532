"""What the subcommands share: the pipeline and stage options, the run context, running one stage, seed names."""

from __future__ import annotations

import os
from pathlib import Path

import click

from rcnn.config import PipelineFile, default_pipelines_file
from rcnn.errors import ConfigError, UserError

RUNS_DIR_HELP = "Folder holding one sub-folder per pipeline [default: $RCNN_RUNS_DIR or ./runs]."


def runs_dir_path(value: str | None) -> Path:
    path = Path(value or os.environ.get("RCNN_RUNS_DIR", "runs"))
    if path.exists() and not path.is_dir():
        raise UserError(f"the runs folder '{path}' is a file, not a folder; give another with --runs-dir or $RCNN_RUNS_DIR")
    blocked = file_above(path)
    if blocked is not None:
        raise UserError(f"the runs folder '{path}' cannot be made: '{blocked}' is a file; give another with --runs-dir")
    return path


def file_above(path: Path) -> Path | None:
    """The nearest existing folder-to-be above ``path`` when it is a file (so ``path`` can never be made), else None."""
    for above in Path(path).parents:
        if above.exists():
            return None if above.is_dir() else above
    return None


def output_folder(value: str, option: str = "--out") -> Path:
    """``value`` as a folder a command writes to, refused in one line where it cannot be one."""
    path = Path(value)
    blocked = path if path.exists() and not path.is_dir() else file_above(path)
    if blocked is not None:
        raise UserError(f"{option} {value}: '{blocked}' is a file, so the folder cannot be made; give another")
    return path


PIPELINES_FILE_HELP = (
    "The pipelines YAML, whose pipelines come on top of the shipped ones "
    "[default: $RCNN_PIPELINES, ./pipelines.yaml, or the one shipped]."
)


def pipeline_options(f):
    """Options shared by every command that runs or inspects a pipeline's stages."""
    f = click.option("--pipelines-file", type=click.Path(dir_okay=False), default=None, help=PIPELINES_FILE_HELP)(f)
    f = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override one configuration value, e.g. --set proposals.max_proposals=2000 (repeatable).",
    )(f)
    f = click.option("--runs-dir", default=None, metavar="DIR", help=RUNS_DIR_HELP)(f)
    return f


SKIP_BAD_HELP = (
    "Leave out images whose data is bad (missing or undecodable image, malformed XML, size or box errors, "
    "unknown class) instead of stopping: each is logged and listed in the manifests and the summary."
)


CLUSTER_HELP = (
    "Run the per-image and per-class work on a Dask cluster: local:N (N worker processes here), tcp://HOST:PORT "
    "(a running `dask scheduler` whose workers share the runs folder and the data) or slurm (the pipeline's cluster "
    "section) [default: $RCNN_CLUSTER, else cluster.address; neither set: this process]. Needs the dask extra; "
    "see docs/cluster.md."
)


def stage_options(f):
    f = click.option("--cluster", default=None, envvar="RCNN_CLUSTER", metavar="SPEC", help=CLUSTER_HELP)(f)
    f = click.option("--skip-bad", is_flag=True, help=SKIP_BAD_HELP)(f)
    f = click.option("--force", is_flag=True, help="Recompute even when the stage is up to date.")(f)
    f = click.option(
        "--wait", is_flag=True, help="If another process is writing the same stage, wait for it instead of refusing."
    )(f)
    f = click.option("--quiet", is_flag=True, help="No progress bars.")(f)
    return pipeline_options(f)


SEEDS_HELP = (
    "Comma-separated seeds, e.g. 0,1,2: run PIPELINE once per seed k as PIPELINE@seed<k> (finetune.seed and "
    "model.seed set to k), each in runs/PIPELINE@seed<k>/; what no seed touches (proposals, SPP-net's conv maps) "
    "is computed once and shared."
)


def ensure_data(ctx) -> None:
    """Before a pipeline's first stage: its synthetic data generated if missing, its annotations checked."""
    from rcnn.stages.prepare import ensure_data as prepare

    prepare(ctx)


def make_context(
    pipeline, runs_dir, overrides, pipelines_file, force=False, wait=False, quiet=False, skip_bad=False, cluster=None
):
    from rcnn.stages.context import Context

    pfile = PipelineFile(pipelines_file or default_pipelines_file())
    cfg = pfile.load(pipeline, overrides)
    ctx = Context(cfg=cfg, runs_dir=runs_dir_path(runs_dir), force=force, wait=wait, progress=not quiet, skip_bad=skip_bad)
    if not any(o.replace(" ", "").startswith(("data.root=", "data=")) for o in overrides):
        ctx.root_variables = tuple(pfile.environment_variables(pipeline, "data.root"))
    if not any(o.replace(" ", "").startswith(("model.weights=", "model=")) for o in overrides):
        ctx.weights_variables = tuple(pfile.environment_variables(pipeline, "model.weights"))
    attach_cluster(ctx, cluster)
    return ctx


def attach_cluster(ctx, option: str | None) -> None:
    """Connect ``ctx`` to the cluster ``--cluster`` (or the pipeline's ``cluster.address``) names, started once per
    command and closed when the command ends; nothing (and no dask import) without one."""
    from rcnn.cluster.spec import resolve

    spec = resolve(option, ctx.cfg.cluster.address)
    if spec is None:
        return
    command = click.get_current_context()
    sessions = command.meta.setdefault("rcnn.clusters", {})
    if str(spec) not in sessions:
        from rcnn.cluster.session import open_session

        sessions[str(spec)] = command.with_resource(open_session(spec, ctx.cfg.cluster, ctx.log))
    ctx.cluster = sessions[str(spec)]


def seeded_names(pipeline: str, seeds: str | None) -> list[str]:
    """The pipeline names ``--seeds`` stands for: ``demo@seed0, demo@seed1, ...``, or ``[pipeline]`` without it."""
    from rcnn.config.seeds import parse_seeds, seeded_name, split_seeded_name

    if seeds is None:
        return [pipeline]
    if split_seeded_name(pipeline)[1] is not None:
        raise ConfigError(f"--seeds: '{pipeline}' already names one seed; give the pipeline, {split_seeded_name(pipeline)[0]}")
    return [seeded_name(pipeline, k) for k in parse_seeds(seeds)]


def check_stage(stage_name: str, cfg, option: str = "") -> None:
    """Refuse a stage that ``cfg``'s method does not run (SPP-net's convmaps on an R-CNN pipeline, the SVMs on a
    Fast R-CNN one), naming the methods that run it and the stages this one does."""
    from rcnn.stages import STAGES, pipeline_stages
    from rcnn.stages.methods import METHODS

    stages = pipeline_stages(cfg.method)
    if stage_name in stages:
        return
    if stage_name not in STAGES:
        raise ConfigError(f"{option}unknown stage '{stage_name}' (stages: {', '.join(STAGES)})")
    owners = " and ".join(m.title for name, m in METHODS.items() if stage_name in pipeline_stages(name))
    method = METHODS[cfg.method]
    raise ConfigError(
        f"{option}stage '{stage_name}' belongs to {owners} pipelines; '{cfg.name}' is {method.article} {method.title} "
        f"pipeline (its stages: {', '.join(stages)})"
    )


def run_one(stage_name: str, ctx) -> None:
    from rcnn.stages import STAGES
    from rcnn.stages.runner import run_stage

    check_stage(stage_name, ctx.cfg)
    stage = STAGES[stage_name]
    manifests = run_stage(ctx, stage)
    for split, manifest in manifests.items():
        skipped = manifest.get("data", {}).get("images_skipped")
        click.echo(f"{stage_name}/{split}: {stage.describe(manifest)}" + (f"; {skipped} bad image(s) skipped" if skipped else ""))
    return manifests


def write_json(path: str, value: dict) -> None:
    from rcnn.store.artifacts import write_json_atomic

    write_json_atomic(Path(path), value)
    click.echo(f"wrote {path}")


def warn_without_gpu(cfg) -> None:
    if cfg.hardware != "gpu":
        return
    import torch

    if cfg.model.device == "cpu" or not torch.cuda.is_available():
        click.echo(f"note: pipeline '{cfg.name}' is sized for a GPU (hardware: gpu) but runs on the CPU: far slower", err=True)
