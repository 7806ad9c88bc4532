"""The loops that keep a GPU busy never make the host wait for it: no read of a value the device holds, and
no copy from pageable host memory (which waits for the device's queue, see rcnn.modeling.transfer), per
chunk of R-CNN's features or per fine-tuning step of either method.

Checked on the CPU: a TorchFunctionMode lists the calls, made from the library's own code, that on a GPU
would wait for it (reading a value: item, float, int, bool, tolist, numpy, cpu, nonzero, unique, boolean
indexing; moving a tensor to a device other than through rcnn.modeling.transfer). Their number may depend
on the images, never on how many chunks or steps there are.
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from conftest import run_cli
from torch.overrides import TorchFunctionMode

import rcnn
import rcnn.stages
import rcnn.training.finetune as finetune_module
from rcnn.methods.rcnn_regions import region_features
from rcnn.modeling.inference import for_inference
from rcnn.modeling.models import DetectorNet, build_model

LIBRARY = (str(Path(rcnn.__file__).parent), str(Path(rcnn.stages.__file__).parent))
SANCTIONED = str(Path(rcnn.__file__).parent / "modeling" / "transfer.py")
READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu", "nonzero", "unique", "argwhere"}
MOVES = {"to", "cuda"}
TORCH = Path(torch.__file__).parent


def _names_a_device(args, kwargs) -> bool:
    values = list(args[1:]) + list(kwargs.values())
    return any(isinstance(v, torch.device) or (isinstance(v, str) and v.split(":")[0] in ("cpu", "cuda")) for v in values)


def _torch_wrapper(filename: str) -> bool:
    path = Path(filename)
    return path.parent == TORCH and path.name in ("_tensor.py", "overrides.py", "functional.py")


class DeviceWaits(TorchFunctionMode):
    """Counts ``(call, file:line)`` of the calls from the library that would make the host wait for a GPU."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__getitem__":
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            wait = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
            name = "boolean index"
        else:
            wait = name in READS or (name in MOVES and _names_a_device(args, kwargs))
        if wait:
            # The code that made the call, past torch's thin Python wrappers (Tensor.unique, torch.functional);
            # calls torch makes itself (an optimiser reading its step count on the host) are not the library's.
            caller = next((f for f in reversed(traceback.extract_stack()[:-1]) if not _torch_wrapper(f.filename)), None)
            if caller is not None and caller.filename.startswith(LIBRARY) and caller.filename != SANCTIONED:
                self.calls[(name, f"{Path(caller.filename).name}:{caller.lineno}")] += 1
        return func(*args, **kwargs)


def _library_reading_head(real_head):
    """``head`` with a read of fc6's input factor at every call (as it once had), compiled under the name of
    the library file it would live in, so that the spy takes it for library code."""
    source = "def head(self, pool5, layers=()):\n    float(self.fc6_input_scale)\n    return real_head(self, pool5, layers)\n"
    namespace = {"real_head": real_head}
    exec(compile(source, str(Path(rcnn.__file__).parent / "modeling" / "models.py"), "exec"), namespace)
    return namespace["head"]


def test_the_check_counts_a_read_per_chunk_from_the_library_only(monkeypatch):
    model = for_inference(build_model("tiny", 3, 32).eval())
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    boxes = np.tile(np.array([[2.0, 3.0, 30.0, 40.0]], np.float32), (40, 1))
    monkeypatch.setattr(DetectorNet, "head", _library_reading_head(DetectorNet.head))
    reads = []
    for batch_size in (20, 5):  # 2 chunks, then 8
        with DeviceWaits() as spy:
            region_features(model, image, boxes, ("fc7",), 3, batch_size, "torch")
            float(model.fc6_input_scale)  # from this test module: not the library's, not counted
            torch.zeros(2).to(torch.device("cpu"))
        reads.append(sum(n for (name, _), n in spy.calls.items() if name == "__float__"))
    assert reads == [2, 8]


def test_r_cnn_features_read_from_the_device_once_per_image_not_per_chunk():
    torch.manual_seed(0)
    model = for_inference(build_model("tiny", 3, 32).eval())
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    xy = rng.uniform(-5, 60, (240, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 40, (240, 2))], axis=1).astype(np.float32)
    rows = {"pool5": np.array([3, 100, 7])}
    seen = {}
    for batch_size in (120, 30):  # 2 chunks, then 8
        with DeviceWaits() as spy:
            region_features(model, image, boxes, ("pool5", "fc7"), 3, batch_size, "torch", rows=rows)
        seen[batch_size] = spy.calls
    assert seen[120] == seen[30], seen
    # What remains is per image: the upload of the image and each layer's copy to the host.
    assert sum(seen[30].values()) <= 6, seen[30]


def _finetune_waits(pipelines_file, tmp_path, capsys, monkeypatch, pipeline: str, iterations: int, *extra: str):
    # The progress bar's postfix reads the running sums at most once a second: no clock, no such read.
    monkeypatch.setattr(finetune_module, "time", SimpleNamespace(perf_counter=lambda: 0.0))
    args = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    with DeviceWaits() as spy:
        code, _, err = run_cli(
            ["finetune", pipeline, *args, "--force", "--set", f"finetune.max_iter={iterations}",
             "--set", "finetune.eval_every=1000", *extra],
            capsys,
        )  # fmt: skip
    assert code == 0, err
    return spy.calls


def test_fine_tuning_steps_never_wait_for_the_device(pipelines_file, tmp_path, capsys, monkeypatch):
    args = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    assert run_cli(["proposals", "tiny", *args], capsys)[0] == 0
    for pipeline, extra in (("tiny", ("--set", "model.warp=torch")), ("tiny-spp", ())):
        if pipeline == "tiny-spp":
            assert run_cli(["finetune", "tiny", *args], capsys)[0] == 0  # tiny-spp's trunk
            assert run_cli(["proposals", "tiny-spp", *args], capsys)[0] == 0
            assert run_cli(["convmaps", "tiny-spp", *args], capsys)[0] == 0
        few = _finetune_waits(pipelines_file, tmp_path, capsys, monkeypatch, pipeline, 3, *extra)
        many = _finetune_waits(pipelines_file, tmp_path, capsys, monkeypatch, pipeline, 9, *extra)
        assert few == many, (pipeline, few, many)


def test_starting_an_images_features_never_waits_for_the_device():
    """Both methods queue an image's work and its copies to the host without a wait, as does SPP-net's
    trunk: the wait is left to HostCopy.arrays, so the features and convmaps stages can queue the next image
    first."""
    from rcnn.methods.rcnn_regions import region_features_later
    from rcnn.methods.spp_regions import image_maps, image_maps_later, spp_region_features_later

    rcnn_net = for_inference(build_model("tiny", 3, 32).eval())
    spp_net = for_inference(build_model("tiny", 3, 32, spp_levels=(2, 1)).eval(), whole_images=True)
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    xy = rng.uniform(-5, 60, (100, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 40, (100, 2))], axis=1).astype(np.float32)
    maps = image_maps(spp_net, image, [1.0, 0.5])  # as the features stage reads them: host arrays
    with DeviceWaits() as spy:
        rcnn_copy = region_features_later(rcnn_net, image, boxes, ("pool5", "fc7"), 3, 32, "torch", rows={"pool5": np.arange(4)})
        spp_copy = spp_region_features_later(spp_net, maps, [1.0, 0.5], boxes, ("pool5", "fc7"), 32.0)
        maps_copy = image_maps_later(spp_net, image, [1.0, 0.5])  # stage convmaps
    assert not spy.calls, spy.calls
    assert [m.tobytes() for m in maps_copy.arrays().values()] == [m.tobytes() for m in maps]
    assert rcnn_copy.arrays()["pool5"].shape[0] == 4 and spp_copy.arrays()["fc7"].shape[0] == 100
