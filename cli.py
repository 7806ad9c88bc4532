"""The `rcnn` command: parse arguments, load the pipeline, call a stage, print the result."""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import threading

import click

from rcnn.commands import compare, data, detect, evaluate, inspect
from rcnn.commands.shared import (
    SEEDS_HELP,
    check_stage,
    ensure_data,
    make_context,
    run_one,
    seeded_names,
    stage_options,
    warn_without_gpu,
)
from rcnn.errors import ConfigError, UserError
from rcnn.runtime import keep_freed_memory


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

    \b
    Your own data:
      a VOC-layout folder (JPEGImages/, Annotations/*.xml, ImageSets/Main/{trainval,test}.txt),
      checked with `rcnn data stats DIR --check`; then a pipeline in ./pipelines.yaml such as
        pipelines: {cells: {extends: bccd, data: {root: /data/cells, classes: [cell, platelet]}}}
      and `rcnn run cells` (README: "Your own data").

    On Linux the C allocator is told to reuse freed memory (R-CNN's feature
    extraction runs about 2x faster on a CPU); RCNN_KEEP_FREED_MEMORY=0 turns it off.
    """
    keep_freed_memory()


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
    cached conv maps (the shipped ones set background IoU in [0.1, 0.5), as in SPP-net:
    finetune.bg_low 0.1; method: spp alone keeps R-CNN's 0). Windows map to cells
    by SPP-net's rule, with the trunk's receptive-field offset (spp.offset: trunk; 0 for
    the formula as printed). With finetune.mirror half the training windows are read
    from the flipped image's maps, at the mirrored place; spp.random_scale pools them at
    a random scale instead of the closest (both from SPP-net's released code).

    Fast R-CNN pipelines (method: fast) train the whole network but its first conv
    layers (fast.frozen_convs) on regions RoI-pooled from whole images resized to
    fast.scales (600, longer side at most 1000; of several, one at random per image
    and step), two images and 64 regions each per mini-batch, with a smooth L1 box
    loss beside the class loss (Girshick 2015).

    Regions are proposals plus ground-truth boxes, warped with finetune.context_pad
    pixels of context (R-CNN: 16); IoU >= 0.5 with an object is that class, the rest
    background; 128-region mini-batches with 32 foreground; SGD (lr 0.001, momentum
    0.9, weight decay 5e-4). Validation accuracy on held-out images every
    finetune.eval_every iterations, when a checkpoint is written; a rerun after a kill
    resumes from it. Uses CUDA with bfloat16 autocast when a GPU is present.
    """,
    "features": """Cache the fine-tuned CNN's features of every box of both splits (HDF5, float16).

    R-CNN: fc7 (for the SVMs) and pool5 (for box regression; with features.bbox_rows:
    regression, only for the trainval boxes box regression trains on), with each box's
    class overlaps (features.layers). SPP-net: fc7 from the cached conv maps; its box
    regression pools pool5 again from them. Fast R-CNN: the network's class
    log-probabilities and box deltas, which evaluate reads in place of SVMs and
    regressors. Resumable per image.
    """,
    "train-svm": """Train one linear SVM per class on cached features, mining hard negatives (not Fast R-CNN).

    As R-CNN: ground-truth boxes are positives, proposals under IoU 0.3 negatives,
    features scaled to mean norm 20, C = 0.001, positive weight 2, bias multiplier 10;
    one pass of hard-negative mining (keep > -1.0001, evict < -1.2).
    """,
    "train-bbox": """Train class-specific ridge box regressors on pool5 features (not Fast R-CNN).

    R-CNN reads the pool5 cached by `rcnn features`; SPP-net pools it again from
    the cached conv maps.

    As R-CNN (appendix C): proposals with IoU >= 0.6 to an object, targets (tx, ty,
    tw, th) centred and whitened, ridge lambda 1000.
    """,
}


def _stage_command(stage_name: str):
    @stage_options
    @click.argument("pipeline")
    def command(pipeline, runs_dir, overrides, pipelines_file, force, wait, quiet, skip_bad, cluster):
        ctx = make_context(pipeline, runs_dir, overrides, pipelines_file, force, wait, quiet, skip_bad, cluster)
        ensure_data(ctx)
        run_one(stage_name, ctx)

    command.__doc__ = STAGE_HELP[stage_name]
    return cli.command(stage_name)(command)


for _name in STAGE_HELP:
    _stage_command(_name)


# The commands beyond one stage live in rcnn/commands/, one module per concern.
for _command in (
    inspect.pipelines_cmd,
    inspect.config_cmd,
    inspect.status_cmd,
    data.data_group,
    detect.detect_cmd,
    evaluate.evaluate_cmd,
    compare.compare_cmd,
):
    cli.add_command(_command)


# Written out rather than read from rcnn.stages, which would load every stage's code for --help
# (tests/cli/test_cli.py checks it names every stage).
UNTIL_HELP = (
    "Stop after this stage: proposals, convmaps (SPP-net pipelines only), finetune, features, train-svm and "
    "train-bbox (neither in Fast R-CNN pipelines) or evaluate (the last, and the default)."
)


@cli.command("run")
@click.argument("pipeline", default="demo")
@click.option("--until", "until", default=None, metavar="STAGE", help=UNTIL_HELP)
@click.option("--seeds", default=None, metavar="K,K,...", help=SEEDS_HELP)
@stage_options
def run_cmd(pipeline, until, seeds, runs_dir, overrides, pipelines_file, force, wait, quiet, skip_bad, cluster):
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
    names = seeded_names(pipeline, seeds)
    contexts = [make_context(name, runs_dir, overrides, pipelines_file, force, wait, quiet, skip_bad, cluster) for name in names]
    if until is not None:  # before any work: a stage this method lacks would never stop the loop below
        check_stage(until, contexts[0].cfg, option=f"--until {until}: ")
    warn_without_gpu(contexts[0].cfg)
    stages = list(pipeline_stages(contexts[0].cfg.method))
    if {"finetune", "convmaps"} & set(stages[: stages.index(until) + 1] if until else stages):
        contexts[0].weights()  # a missing weights file is said now, not after the proposals of every image
    results = []
    for ctx in contexts:
        if seeds is not None:
            click.echo(f"== {ctx.cfg.name} ({ctx.root})")
        ensure_data(ctx)
        for name in pipeline_stages(ctx.cfg.method):
            manifest = run_one(name, ctx)
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


INTERRUPTED = "rcnn: interrupted; completed work is kept and a rerun resumes it"


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, a batch system's preemption), handled as Ctrl-C is: the work done is saved."""


def _terminated(signum, frame) -> None:
    raise Terminated()


def main(argv=None) -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit; SIGTERM stops as Ctrl-C."""
    installed = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if installed else None
    try:
        _main(argv)
    finally:
        if installed:  # None: a handler installed outside Python, which cannot be put back; the default instead
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _stopped(e: BaseException) -> None:
    terminated = isinstance(e, Terminated)
    click.echo(INTERRUPTED.replace("interrupted", "terminated (SIGTERM)") if terminated else INTERRUPTED, err=True)
    sys.exit(128 + signal.SIGTERM if terminated else 130)


def _main(argv=None) -> None:
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
        if isinstance(e.__cause__, KeyboardInterrupt):
            _stopped(e.__cause__)
        click.echo("aborted", err=True)
        sys.exit(130)
    except UserError as e:
        click.echo(f"rcnn: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        _stopped(e)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM):
            # HDF5's own message spans lines and names the file inside it ("filename = '…'"): said as any other.
            named = e.filename or next(iter(re.findall(r"filename = '([^']*)'", str(e))), None)
            where = f": {named}" if named else ""
            click.echo(f"rcnn: error: {os.strerror(e.errno)}{where}; completed work is kept", err=True)
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
