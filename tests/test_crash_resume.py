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
    return [sys.executable, "-c", "from cli import main; main()", *args]


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
