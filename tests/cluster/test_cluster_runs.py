"""Stages run on a Dask cluster (two local worker processes, reached at tcp://) give the bytes of a plain run,
survive a killed worker or client, and report a bad image as the plain run does."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli, write_pipelines

from rcnn.data.synth import generate_dataset

pytest.importorskip("distributed")

CWD = Path(__file__).resolve().parents[2]
RCNN = [sys.executable, "-c", "from rcnn.cli import main; main()"]
QUIET = ["--quiet", "--set", "cluster.shard_images=16"]


@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster of two worker processes for the module; the commands join it as tcp://..."""
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
    ) as lc:
        with Client(lc) as client:
            yield client


@pytest.fixture(scope="module")
def voc40(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc40") / "voc"
    generate_dataset(root, n_images=40, seed=3, size=96, progress=False)  # 27 trainval images: two 16-image parts
    return root


@pytest.fixture(scope="module")
def pfile(voc40, tmp_path_factory) -> Path:
    return write_pipelines(tmp_path_factory.mktemp("pf") / "p.yaml", voc40)


def rcnn_args(runs: Path, pfile: Path, *args: str) -> list[str]:
    return [*args, "--runs-dir", str(runs), "--pipelines-file", str(pfile), *QUIET]


def run_ok(argv, capsys) -> str:
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    return out


def digests(runs: Path, units: list[str]) -> dict:
    """Each unit's recorded output digests, and its fingerprint."""
    out = {}
    for unit in units:
        manifest = json.loads((runs / unit / "manifest.json").read_text())
        out[unit] = (manifest["fingerprint"], manifest["outputs"])
    return out


UNITS = [
    "tiny/proposals/trainval",
    "tiny/proposals/test",
    "tiny/finetune/trainval",
    "tiny/features/trainval",
    "tiny/features/test",
    "tiny/train-svm/trainval",
    "tiny/train-bbox/trainval",
    "tiny-spp/convmaps/trainval",
    "tiny-spp/convmaps/test",
]


@pytest.fixture(scope="module")
def plain(pfile, tmp_path_factory) -> Path:
    """The runs folder of a plain (no cluster) run of every stage, and SPP-net's conv maps."""
    runs = tmp_path_factory.mktemp("plain") / "runs"
    for argv in (["run", "tiny"], ["convmaps", "tiny-spp"]):
        subprocess.run(RCNN + [*rcnn_args(runs, pfile, *argv)], check=True, cwd=CWD, capture_output=True)
    return runs


def test_every_sharded_stage_equals_the_plain_run(cluster, plain, pfile, tmp_path, capsys):
    runs = tmp_path / "runs"
    address = ["--cluster", cluster.scheduler.address]
    # In a fresh process, as the plain run: fine-tuning (on the client either way) depends on the process's threads.
    out = subprocess.run(RCNN + rcnn_args(runs, pfile, "run", "tiny", *address), cwd=CWD, capture_output=True, text=True).stdout
    run_ok(rcnn_args(runs, pfile, "convmaps", "tiny-spp", *address), capsys)
    assert f"scheduler {cluster.scheduler.address}, 2 worker(s)" in out
    assert digests(runs, UNITS) == digests(plain, UNITS)
    # The detection pass too: the same devkit files and curves, the same APs (results.json also holds timings).
    evaluated, reference = (digests(r, ["tiny/evaluate/test"])["tiny/evaluate/test"] for r in (runs, plain))
    assert evaluated[0] == reference[0]
    assert {k: v for k, v in evaluated[1].items() if k != "results.json"} == {
        k: v for k, v in reference[1].items() if k != "results.json"
    }
    results = [json.loads((r / "tiny/evaluate/test/results.json").read_text()) for r in (runs, plain)]
    assert (results[0]["per_class"], results[0]["per_class_bbox"]) == (results[1]["per_class"], results[1]["per_class_bbox"])
    assert json.loads((runs / "tiny/evaluate/test/manifest.json").read_text())["cluster"]["images"] == 13

    # Where the work ran is recorded: 27 trainval images in two 16-image parts -> two shards; one task per class.
    where = json.loads((runs / "tiny/features/trainval/manifest.json").read_text())["cluster"]
    assert (where["scheduler"], where["workers"], where["shards"], where["images"]) == (cluster.scheduler.address, 2, 2, 27)
    svm = json.loads((runs / "tiny/train-svm/trainval/manifest.json").read_text())["cluster"]
    assert svm["shards"] == 5  # the five shape classes
    # ... and is no part of the fingerprint: a plain rerun finds everything up to date, and so does a cluster run.
    out = run_ok(rcnn_args(plain, pfile, "run", "tiny", *address), capsys)
    out += run_ok(rcnn_args(runs, pfile, "run", "tiny"), capsys)
    assert "recomput" not in out and out.count("up to date, skipped") == 16


def _die_mid_shard(marker: str) -> None:
    """Installed in the workers: the first to reach a shard's third image writes ``marker`` and dies at once."""
    from rcnn.stages import features

    records = features.image_records

    def dying(ctx, split, ids):
        for k, record in enumerate(records(ctx, split, ids)):
            if k == 2:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
                    os._exit(1)  # as a kill: no cleanup, no flush
                except FileExistsError:
                    pass
            yield record

    features.image_records = dying


def test_a_worker_killed_mid_shard_loses_only_that_shard(cluster, plain, pfile, tmp_path, capsys):
    runs = tmp_path / "runs"
    # Everything up to the features from the plain run; the features on the cluster.
    for unit in ("tiny/proposals", "tiny/finetune"):
        shutil.copytree(plain / unit, runs / unit)
    marker = tmp_path / "killed"
    cluster.run(_die_mid_shard, str(marker))
    try:
        run_ok(rcnn_args(runs, pfile, "features", "tiny", "--cluster", cluster.scheduler.address), capsys)
    finally:
        cluster.run(_restore_features)
    assert marker.exists(), "no worker died"
    assert digests(runs, UNITS[3:5]) == digests(plain, UNITS[3:5])
    cluster.wait_for_workers(2, timeout=60)  # the nanny restarted the dead worker


def _restore_features() -> None:
    import importlib

    from rcnn.stages import features

    importlib.reload(features)


def _slow_proposals(seconds: float) -> None:
    from rcnn.stages import proposals

    propose = proposals._propose

    def slow(ann, p):
        time.sleep(seconds)
        return propose(ann, p)

    proposals._propose = slow


def test_a_killed_client_resumes_from_the_shards_written(cluster, plain, pfile, tmp_path, capsys):
    runs = tmp_path / "runs"
    parts = runs / "tiny" / "proposals" / "trainval" / ".work" / "parts"
    cluster.run(_slow_proposals, 0.1)  # 27 images, parts of 2: long enough to be killed midway
    argv = rcnn_args(runs, pfile, "proposals", "tiny", "--cluster", cluster.scheduler.address)
    proc = subprocess.Popen(RCNN + [*argv], cwd=CWD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list(parts.glob("part-*.h5"))) < 2 and proc.poll() is None:
            time.sleep(0.02)
        proc.kill()
        proc.wait()
    finally:
        cluster.run(_restore_proposals)
    kept = len(list(parts.glob("part-*.h5")))
    assert kept >= 2, "the client was not killed midway"
    assert not (runs / "tiny" / "proposals" / "trainval" / "manifest.json").exists()
    time.sleep(1.0)  # the shards the dead client left running end (their parts are kept too)
    out = run_ok(argv, capsys)
    assert "proposals/trainval: resuming," in out
    assert digests(runs, UNITS[:2]) == digests(plain, UNITS[:2])


def _restore_proposals() -> None:
    import importlib

    from rcnn.stages import proposals

    importlib.reload(proposals)


def test_a_bad_image_is_reported_as_the_plain_run_reports_it(cluster, voc40, tmp_path, capsys):
    voc = tmp_path / "voc"
    shutil.copytree(voc40, voc)
    bad = (voc / "ImageSets" / "Main" / "trainval.txt").read_text().split()[5]
    (voc / "JPEGImages" / f"{bad}.jpg").write_bytes(b"not a jpeg")
    pf = write_pipelines(tmp_path / "p.yaml", voc)
    plain = run_cli(rcnn_args(tmp_path / "a", pf, "proposals", "tiny"), capsys)
    on_cluster = run_cli(rcnn_args(tmp_path / "b", pf, "proposals", "tiny", "--cluster", cluster.scheduler.address), capsys)
    assert plain[0] == on_cluster[0] == 1
    assert plain[2] == on_cluster[2] and len(on_cluster[2].strip().splitlines()) == 1 and bad in on_cluster[2]

    out = run_ok(rcnn_args(tmp_path / "c", pf, "proposals", "tiny", "--skip-bad", "--cluster", cluster.scheduler.address), capsys)
    assert f"skipping image {bad} (--skip-bad)" in out
    manifest = json.loads((tmp_path / "c" / "tiny" / "proposals" / "trainval" / "manifest.json").read_text())
    assert [s["id"] for s in manifest["data"]["skipped"]] == [bad] and manifest["metrics"]["images"] == 26
