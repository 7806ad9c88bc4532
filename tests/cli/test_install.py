"""A regular (non-editable) install works on its own: built from the checkout, installed elsewhere, run from an
empty folder with neither the checkout nor an editable finder on the import path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_pipelines

REPO = Path(__file__).resolve().parents[2]

# Runs the installed CLI after removing every trace of the checkout from the import machinery.
RUN_INSTALLED = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
sys.path[:] = [p for p in sys.path if p and not p.startswith({repo!r})]
import rcnn, rcnn.cli
assert rcnn.__file__.startswith({target!r}), rcnn.__file__
assert rcnn.cli.__file__.startswith({target!r}), rcnn.cli.__file__
rcnn.cli.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    import setuptools

    # Build with the setuptools at hand when it is recent enough (pyproject asks for 68), else in pip's isolation.
    isolation = [] if int(setuptools.__version__.split(".")[0]) < 68 else ["--no-build-isolation"]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *isolation, "--target", str(target), str(REPO)],
        check=True,
        capture_output=True,
    )
    return target


def rcnn(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    code = RUN_INSTALLED.format(repo=str(REPO), target=str(installed))
    env = {**os.environ, "PYTHONPATH": str(installed)}
    env.pop("RCNN_PIPELINES", None)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_installs_nothing_generic_at_the_top(installed):
    top = {p.name for p in installed.iterdir()}
    assert "rcnn" in top and not {"cli.py", "stages", "pipelines.yaml"} & top
    assert (installed / "rcnn" / "stages" / "evaluate.py").is_file()
    assert (installed / "rcnn" / "pipelines.yaml").is_file() and not (installed / "rcnn" / "pipelines.yaml").is_symlink()


def test_installed_copy_lists_the_shipped_pipelines_from_an_empty_folder(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = rcnn(installed, empty, "pipelines")
    assert proc.returncode == 0, proc.stderr
    assert f"pipelines in {installed / 'rcnn' / 'pipelines.yaml'}" in proc.stdout
    assert "demo: " in proc.stdout and "voc07-mini: " in proc.stdout
    # The shipped file's relative data paths can only mean the working directory, and it says how to point elsewhere.
    expected = (empty / ".." / "shared" / "data" / "voc07-mini").resolve()
    if not expected.exists():
        assert f"data: {expected} (not there: set RCNN_VOC07_MINI or --set data.root=PATH)" in proc.stdout


def test_installed_copy_runs_a_tiny_pipeline_from_an_empty_folder(installed, tiny_voc, tmp_path):
    empty = tmp_path / "work"
    empty.mkdir()
    pipelines = write_pipelines(tmp_path / "pipelines.yaml", tiny_voc)
    proc = rcnn(installed, empty, "run", "tiny", "--pipelines-file", str(pipelines), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "evaluate/test: mAP" in proc.stdout
    assert (empty / "runs" / "tiny" / "evaluate" / "test" / "manifest.json").is_file()


def test_installed_console_script(installed, tmp_path):
    script = installed / "bin" / "rcnn"
    assert script.is_file()
    proc = subprocess.run(
        [str(script), "config", "demo"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "backbone: tiny" in proc.stdout
