"""A proposals run killed with SIGKILL, then rerun, ends with the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_pipelines

from rcnn.synth import generate_dataset


def rcnn(*args: str) -> list[str]:
    return [sys.executable, "-c", "from rcnn.cli import main; main()", *args]


@pytest.fixture(scope="module")
def medium_voc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("medium") / "voc"
    generate_dataset(root, n_images=48, seed=5, size=128, test_fraction=0.25, progress=False)
    return root


def outputs(runs: Path) -> dict:
    out = {}
    for manifest in sorted(runs.glob("tiny/proposals/*/manifest.json")):
        out[manifest.parent.name] = json.loads(manifest.read_text())["outputs"]
    return out


def test_sigkill_midway_then_resume_gives_identical_outputs(medium_voc, tmp_path):
    pf = write_pipelines(tmp_path / "p.yaml", medium_voc)
    # `fast` mode on 36 trainval images takes a few seconds: long enough to kill midway.
    common = ["--pipelines-file", str(pf), "--set", "proposals.mode=fast", "--set", "proposals.max_proposals=null", "--quiet"]
    cwd = Path(__file__).resolve().parent.parent

    reference = tmp_path / "ref"
    subprocess.run(rcnn("proposals", "tiny", "--runs-dir", str(reference), *common), check=True, cwd=cwd, capture_output=True)

    runs = tmp_path / "runs"
    parts = runs / "tiny" / "proposals" / "trainval" / ".work" / "parts"
    proc = subprocess.Popen(
        rcnn("proposals", "tiny", "--runs-dir", str(runs), *common),
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(parts.glob("part-*.h5")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_parts = list(parts.glob("part-*.h5"))
    assert done_parts, "the run finished no part before the deadline"
    assert not (runs / "tiny" / "proposals" / "trainval" / "manifest.json").exists()

    resumed = subprocess.run(
        rcnn("proposals", "tiny", "--runs-dir", str(runs), *common), cwd=cwd, capture_output=True, text=True, check=True
    )
    assert "resuming" in resumed.stdout
    assert outputs(runs) == outputs(reference)


def _digests(runs: Path, stage: str, split: str) -> dict:
    manifest = json.loads((runs / "tiny" / stage / split / "manifest.json").read_text())
    return {k: v["digest"] for k, v in manifest["outputs"].items()}


def _kill_when(cmd: list[str], cwd: Path, ready, timeout: float = 120) -> None:
    """Start ``cmd``, SIGKILL its process group as soon as ``ready()`` holds, and check it had not finished."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.02)
    finished = proc.poll() is not None
    if not finished:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not finished, "the stage finished before it could be killed"


def test_sigkill_in_finetune_features_and_svm_then_resume(medium_voc, tmp_path):
    pf = write_pipelines(tmp_path / "p.yaml", medium_voc)
    cwd = Path(__file__).resolve().parent.parent
    common = [
        "--pipelines-file",
        str(pf),
        "--quiet",
        "--set",
        "proposals.max_proposals=120",
        "--set",
        "finetune.max_iter=60",
        "--set",
        "finetune.eval_every=10",
        "--set",
        "model.input_size=64",
    ]
    ref, runs = tmp_path / "ref", tmp_path / "runs"
    subprocess.run(
        rcnn("run", "tiny", "--until", "train-svm", "--runs-dir", str(ref), *common), cwd=cwd, check=True, capture_output=True
    )
    subprocess.run(rcnn("proposals", "tiny", "--runs-dir", str(runs), *common), cwd=cwd, check=True, capture_output=True)

    def unit(stage: str) -> Path:
        return runs / "tiny" / stage / "trainval"

    # Fine-tuning: killed after its first checkpoint, resumed from it, same weights as an unbroken run.
    _kill_when(
        rcnn("finetune", "tiny", "--runs-dir", str(runs), *common),
        cwd,
        lambda: (unit("finetune") / ".work" / "train_state.pt").exists(),
    )
    out = subprocess.run(
        rcnn("finetune", "tiny", "--runs-dir", str(runs), *common), cwd=cwd, check=True, capture_output=True, text=True
    )
    assert "resuming from iteration" in out.stdout
    assert _digests(runs, "finetune", "trainval") == _digests(ref, "finetune", "trainval")

    # Features: killed after the first complete part, resumed at the next image, same bytes.
    _kill_when(
        rcnn("features", "tiny", "--runs-dir", str(runs), *common),
        cwd,
        lambda: any((unit("features") / ".work" / "parts").glob("part-*.h5")),
    )
    out = subprocess.run(
        rcnn("features", "tiny", "--runs-dir", str(runs), *common), cwd=cwd, check=True, capture_output=True, text=True
    )
    assert "resuming" in out.stdout
    for split in ("trainval", "test"):
        assert _digests(runs, "features", split) == _digests(ref, "features", split)

    # SVM training: killed while mining, rerun from the start, same model.
    _kill_when(rcnn("train-svm", "tiny", "--runs-dir", str(runs), *common), cwd, lambda: (unit("train-svm") / ".work").exists())
    subprocess.run(rcnn("train-svm", "tiny", "--runs-dir", str(runs), *common), cwd=cwd, check=True, capture_output=True)
    assert _digests(runs, "train-svm", "trainval") == _digests(ref, "train-svm", "trainval")
