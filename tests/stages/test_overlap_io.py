"""model.overlap_io: the per-image stages read the next images and write full parts in background threads.
The records are the bytes written one step after another, and an image that fails to read stops the stage
with its one-line error after the images before it were written, so a rerun resumes there."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import run_cli, write_pipelines

from rcnn.errors import UserError
from rcnn.store import artifacts as store
from rcnn.store import records

# Three images per part, so that the tiny splits fill several parts and the background writer has work.
SMALL_PARTS = 3


@pytest.fixture(scope="module")
def runs(tiny_voc, tmp_path_factory):
    """tiny and tiny-spp run up to their features with the default (overlapped) reading and writing."""
    from rcnn.cli import main

    folder = tmp_path_factory.mktemp("overlap")
    pipelines = write_pipelines(folder / "pipelines.yaml", tiny_voc)
    common = ["--until", "features", "--pipelines-file", str(pipelines), "--runs-dir", str(folder / "runs"), "--quiet"]
    for name in ("tiny", "tiny-spp"):
        with pytest.raises(SystemExit) as e:
            main(["run", name, *common])
            raise SystemExit(0)
        assert not e.value.code
    return pipelines, folder / "runs"


def unit_bytes(unit: Path) -> dict[str, bytes]:
    """Every output file of a finished unit (not its manifest, which holds times)."""
    return {
        p.relative_to(unit).as_posix(): p.read_bytes()
        for p in sorted(unit.rglob("*"))
        if p.is_file() and p.name != store.MANIFEST and not p.name.endswith(".lock")
    }


@pytest.mark.parametrize(("pipeline", "stage"), [("tiny", "features"), ("tiny-spp", "convmaps"), ("tiny-spp", "features")])
def test_overlapped_and_in_turn_write_the_same_bytes(runs, pipeline, stage, capsys, monkeypatch, tmp_path):
    from rcnn.stages import convmaps, features

    monkeypatch.setattr({"features": features, "convmaps": convmaps}[stage], "PART_SIZE", SMALL_PARTS)
    pipelines, shared = runs
    # A copy: conv maps in smaller parts are other files, which makes the fine-tuning that read them stale.
    folder = shutil.copytree(shared, tmp_path / "runs")
    common = [pipeline, "--pipelines-file", str(pipelines), "--runs-dir", str(folder), "--quiet", "--force"]
    unit = folder / pipeline / stage / "trainval"
    code, _, err = run_cli([stage, *common], capsys)
    assert code == 0, err
    overlapped = unit_bytes(unit)
    code, _, err = run_cli([stage, *common, "--set", "model.overlap_io=false"], capsys)
    assert code == 0, err
    in_turn = unit_bytes(unit)
    assert sum(name.startswith("parts/") for name in in_turn) >= 2  # several parts, as announced
    assert overlapped == in_turn


def test_an_image_failing_in_the_reading_thread_stops_with_one_line_and_the_rerun_resumes(runs, capsys, monkeypatch):
    from rcnn.stages import features, region_features

    monkeypatch.setattr(features, "PART_SIZE", 1)
    pipelines, folder = runs
    common = ["tiny", "--pipelines-file", str(pipelines), "--runs-dir", str(folder), "--quiet"]
    order = features_order(pipelines, folder)
    assert len(order) >= 3
    real, bad = region_features.load_image, order[2]

    def broken(ann):
        if ann.image_id == bad:
            raise UserError(f"image '{ann.path}' cannot be decoded")
        return real(ann)

    monkeypatch.setattr(region_features, "load_image", broken)
    code, _, err = run_cli(["features", *common, "--force"], capsys)
    assert code != 0
    assert "cannot be decoded" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    work = folder / "tiny" / "features" / "trainval" / store.WORK / "parts"
    assert set(records.completed_parts(work)) == set(order[: order.index(bad)])  # everything before it was kept

    monkeypatch.setattr(region_features, "load_image", real)
    code, out, err = run_cli(["features", *common[:-1], "--force"], capsys)  # not quiet: the resume is logged
    assert code == 0, err
    assert f"features/trainval: resuming, {order.index(bad)} of {len(order)} images already done" in out


def features_order(pipelines: Path, folder: Path) -> list[str]:
    """The trainval ids in the order the features stage computes them."""
    from rcnn.commands.shared import make_context

    ctx = make_context("tiny", folder, (), str(pipelines), quiet=True)
    return list(ctx.dataset("trainval").ids)


@pytest.mark.parametrize("ahead", [True, False])
def test_one_ahead_starts_the_next_item_before_finishing_this_one(ahead):
    from rcnn.stages.image_records import one_ahead

    log = []

    def start(i):
        log.append(f"start {i}")
        return i

    def finish(i):
        log.append(f"finish {i}")
        return i * 10

    assert list(one_ahead(range(3), start, finish, ahead)) == [0, 10, 20]
    if ahead:
        assert log == ["start 0", "start 1", "finish 0", "start 2", "finish 1", "finish 2"]
    else:
        assert log == ["start 0", "finish 0", "start 1", "finish 1", "start 2", "finish 2"]
    assert list(one_ahead([], start, finish, ahead)) == []


@pytest.mark.parametrize("ahead", [True, False])
@pytest.mark.parametrize("where", ["reading", "starting"])
def test_one_ahead_gives_what_was_started_before_an_error(ahead, where):
    from rcnn.stages.image_records import one_ahead

    def items():
        for i in range(4):
            if where == "reading" and i == 2:
                raise UserError("image 2 cannot be read")
            yield i

    def start(i):
        if where == "starting" and i == 2:
            raise UserError("image 2 cannot be read")
        return i

    got = []
    with pytest.raises(UserError, match="image 2"):
        for value in one_ahead(items(), start, lambda i: i, ahead):
            got.append(value)
    assert got == [0, 1]


def test_only_the_layers_written_leave_the_device(runs, capsys, monkeypatch, tmp_path):
    # pool5 is computed on the way to fc7 in any case; SPP-net's pyramid is never cached (pooled again from the
    # conv maps where box regression reads it), so it stays where it was computed, as R-CNN's pool5 does where
    # it is not cached. Copied, it was 51 to 102 MB per image at 2000 windows, written nowhere.
    from rcnn.modeling import transfer
    from rcnn.stages import features

    copied, real = [], transfer.HostCopy.__init__

    def spy(self, tensors):
        copied.append(set(tensors))
        real(self, tensors)

    monkeypatch.setattr(transfer.HostCopy, "__init__", spy)
    pipelines, shared = runs
    folder = shutil.copytree(shared, tmp_path / "runs")
    for pipeline, written in (("tiny", {"pool5", "fc7"}), ("tiny-spp", {"fc7"})):
        copied.clear()
        common = [pipeline, "--pipelines-file", str(pipelines), "--runs-dir", str(folder), "--quiet", "--force"]
        code, _, err = run_cli(["features", *common], capsys)
        assert code == 0, err
        assert copied and all(layers == written for layers in copied), (pipeline, copied[:3])
        with records.RecordSet(folder / pipeline / "features" / "test" / features.INDEX, features.KIND) as rs:
            assert all(len(rs.array(rs.ids[0], layer)) > 0 for layer in written)
