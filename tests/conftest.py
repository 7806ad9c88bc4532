"""Shared fixtures: a tiny synthetic VOC dataset and a pipelines file pointing at it."""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest

from rcnn.data.synth import generate_dataset

#: The device of the test pipelines' networks: ``RCNN_TEST_DEVICE=cuda python -m pytest`` runs the stage tests on a GPU.
TEST_DEVICE = os.environ.get("RCNN_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory) -> Path:
    """Six 96 px synthetic images in VOC layout (generated once per test session)."""
    root = tmp_path_factory.mktemp("data") / "tiny"
    generate_dataset(root, n_images=6, seed=3, size=96, progress=False)
    return root


@pytest.fixture
def voc_copy(tiny_voc, tmp_path) -> Path:
    """A private, writable copy of the tiny dataset for tests that damage it."""
    dst = tmp_path / "voc"
    shutil.copytree(tiny_voc, dst)
    return dst


def one_error_line(err: str) -> str:
    """The one line a refused command printed on stderr (asserting it is one line and no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def write_pipelines(path: Path, data_root: Path, extra: str = "") -> Path:
    path.write_text(
        textwrap.dedent(
            f"""\
            pipelines:
              tiny:
                description: six tiny synthetic images
                data:
                  root: {data_root}
                proposals:
                  mode: single
                  min_size: 4
                  max_proposals: 50
                  n_jobs: 1
                model:
                  backbone: tiny
                  weights: scratch
                  input_size: 32
                  device: {TEST_DEVICE}
                finetune:
                  context_pad: 3
                  optimizer: adam
                  lr: 0.001
                  bias_lr_mult: 1           # trained from scratch, as the demo: one rate for every layer
                  bias_decay: true
                  classifier_lr_mult: 1
                  batch_size: 32
                  max_iter: 24
                  step_size: 20
                  eval_every: 8
                  val_fraction: 0.25
                features:
                  batch_size: 64
                svm:
                  n_jobs: 1
              tiny-twin:
                extends: tiny
                description: same proposals as tiny
              tiny-spp:
                extends: tiny
                description: SPP-net on the tiny data, trunk from tiny
                method: spp
                model:
                  weights: pipeline:tiny
                spp:
                  scales: [96]
                  max_side: null
                  target_size: 32
                finetune:
                  bg_low: 0.1
                  mirror: true
            """
        )
        + extra
    )
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the `rcnn` entry point in-process: (exit status, stdout, stderr)."""
    from rcnn.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


@pytest.fixture
def pipelines_file(tmp_path, tiny_voc) -> Path:
    return write_pipelines(tmp_path / "pipelines.yaml", tiny_voc)


def interrupted_at_checkpoint(fine_tune, iteration: int):
    """``fine_tune`` stopped by Ctrl-C right after its first checkpoint at ``iteration`` or later is written."""

    def stopped(*args, checkpoint, **kwargs):
        def counted(state):
            checkpoint(state)
            if state.iteration >= iteration:
                raise KeyboardInterrupt

        return fine_tune(*args, checkpoint=counted, **kwargs)

    return stopped
