"""The CUDA-only code paths the CPU tests cannot reach: pinned copies and their order, the GPU's random state
through a training checkpoint, the float32 and determinism flags around a backward pass, R-CNN's and SPP-net's
features and Fast R-CNN's outputs on the GPU against the CPU's float32 ones, and training steps repeatable bit for bit under
deterministic cuDNN with channels-last weights and bfloat16 autocast. Skipped without a CUDA device."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rcnn.methods.rcnn_regions import region_features
from rcnn.methods.spp_regions import PooledRegionFeatures
from rcnn.modeling.inference import for_inference, inference_dtype
from rcnn.modeling.models import build_model, to_training_device
from rcnn.modeling.transfer import HostCopy, to_device
from rcnn.runtime import strict_float32
from rcnn.training.finetune import TrainState, deterministic_cudnn, training_autocast

# Where every test runs. "cpu" runs the same code on a machine without a GPU (a check of the tests, not of
# the GPU paths; the skip below must then go too).
DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Features as float16 rows, compared by each row's relative distance |a - b| / |b| to the CPU's float32 ones.
# In float32 the two devices differ by summation order (~1e-6) and both round to float16 (2^-11 relative per
# value), well under FLOAT32_TOL. In bfloat16 (8-bit mantissa) the tiny network's rows move by at most 0.5 %
# against float32 on a CPU with bfloat16 kernels; BFLOAT16_TOL leaves 6x that for the GPU's other kernels.
FLOAT32_TOL = 2e-3
BFLOAT16_TOL = 0.03
N_BOXES = 600  # more than two of region_features' 256-box chunks


@pytest.fixture(scope="module")
def dev() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if DEVICE == "cuda" else torch.device("cpu")


@pytest.fixture(scope="module")
def image_and_boxes() -> tuple[np.ndarray, np.ndarray]:
    """A 240 x 320 RGB noise image and N_BOXES float32 boxes (x1, y1, x2, y2) inside it, at least 8 px a side."""
    rng = np.random.default_rng(0)
    image = (rng.random((240, 320, 3)) * 255).astype(np.uint8)
    x1, y1 = rng.uniform(0, 312, N_BOXES), rng.uniform(0, 232, N_BOXES)
    x2, y2 = np.minimum(x1 + rng.uniform(8, 320, N_BOXES), 320), np.minimum(y1 + rng.uniform(8, 240, N_BOXES), 240)
    return image, np.stack([x1, y1, x2, y2], 1).astype(np.float32)


def row_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each row's |a - b| / |b| (float32), ``a`` and ``b`` ``[N, D]``."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-6)


def tolerance(dev: torch.device, precision: str) -> float:
    return BFLOAT16_TOL if inference_dtype(dev, precision) == torch.bfloat16 else FLOAT32_TOL


def test_uploads_copy_the_source_at_once_and_host_copies_land_pinned_after_the_work(dev):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1000, 37)).astype(np.float32)
    keep = a.copy()
    t = to_device(a, dev)
    if dev.type == "cuda":  # on a CPU the tensor is the array's memory, by design
        a[:] = 0  # overwritten while the upload may still be queued: the device must hold the old values
    assert np.array_equal(t.cpu().numpy(), keep)
    assert to_device(np.zeros(0, np.int64), dev).shape == (0,)
    assert to_device(np.array([True, False]), dev).dtype == torch.bool
    x = torch.randn(2000, 512, device=dev).to(torch.bfloat16)
    expected = x.to(torch.float16).cpu().numpy()
    pending = HostCopy({"x": x, "empty": x[:0], "host": torch.zeros(0, 3, dtype=torch.float16)})
    x.mul_(0)  # queued after the copy on the same stream: the copy must not see it
    got = pending.arrays()
    assert got["x"].dtype == np.float16 and np.array_equal(got["x"], expected)
    assert got["empty"].shape == (0, 512) and got["host"].shape == (0, 3)
    if dev.type == "cuda":  # page-locked, or the device-to-host copy was not asynchronous
        assert torch.from_numpy(got["x"]).is_pinned()


def test_the_gpus_random_state_survives_a_training_checkpoint(dev):
    def get_state() -> torch.Tensor:
        return torch.cuda.get_rng_state(dev) if dev.type == "cuda" else torch.get_rng_state()

    def set_state(state: torch.Tensor) -> None:
        if dev.type == "cuda":
            torch.cuda.set_rng_state(state, dev)
        else:
            torch.set_rng_state(state)

    torch.manual_seed(7)
    state = get_state()
    first = torch.nn.functional.dropout(torch.ones(4096, device=dev), 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train_state.pt"
        TrainState(1, {}, {}, torch.get_rng_state(), state).save(path)
        loaded = TrainState.load(path)
    again = torch.nn.functional.dropout(torch.ones(4096, device=dev), 0.5)
    assert not torch.equal(first, again)  # the masks do draw from this state
    set_state(loaded.cuda_rng)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(4096, device=dev), 0.5), first)


def test_strict_float32_and_deterministic_cudnn_around_a_conv_backward(dev):
    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    cudnn = lambda: (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)  # noqa: E731
    before, cudnn_before = flags(), cudnn()
    g = torch.Generator().manual_seed(2)
    x, w = (
        torch.randn(4, 64, 32, 32, generator=g, dtype=torch.float64),
        torch.randn(64, 64, 3, 3, generator=g, dtype=torch.float64),
    )
    a, b = torch.randn(256, 512, generator=g, dtype=torch.float64), torch.randn(512, 256, generator=g, dtype=torch.float64)
    w64 = w.clone().requires_grad_()
    torch.nn.functional.conv2d(x, w64, padding=1).square().sum().backward()
    with strict_float32(True), deterministic_cudnn(dev):
        assert flags() == (False, False)
        if dev.type == "cuda":
            assert cudnn() == (True, False)
        w32 = w.float().to(dev).requires_grad_()
        torch.nn.functional.conv2d(x.float().to(dev), w32, padding=1).square().sum().backward()
        product = (a.float().to(dev) @ b.float().to(dev)).double().cpu()
    assert flags() == before and cudnn() == cudnn_before
    # In float32 these sums are good to ~1e-6 (a few times that for cuDNN's Winograd or FFT kernels); TF32 rounds
    # every input to a 10-bit mantissa (2^-11 relative), which leaves ~3e-4.
    grad = w32.grad.double().cpu()
    assert float((grad - w64.grad).norm() / w64.grad.norm()) < 5e-5
    assert float((product - a @ b).norm() / (a @ b).norm()) < 5e-5


@pytest.mark.parametrize("warp", ["torch", "opencv"])
@pytest.mark.parametrize("precision", ["auto", "float32"])
def test_rcnn_features_on_the_device_match_the_cpus_float32(dev, image_and_boxes, precision, warp):
    image, boxes = image_and_boxes
    base = build_model("tiny", 5, 64)
    layers = ("pool5", "fc7")
    expected = region_features(for_inference(copy.deepcopy(base), dtype="float32"), image, boxes, layers, 4, 256, warp)
    net = for_inference(copy.deepcopy(base).to(dev), dtype=precision)
    # Rows chosen on the device (features.bbox_rows: regression): those rows of the whole layer, exactly.
    rows = {"pool5": np.array([3, 1, len(boxes) - 1]), "fc7": np.zeros(0, np.int64)}
    with strict_float32(precision == "float32"):  # as stages/runner.py runs the features stage
        got = region_features(net, image, boxes, layers, 4, 256, warp)
        part = region_features(net, image, boxes, layers, 4, 256, warp, rows)
    for k in layers:
        assert got[k].dtype == np.float16 and got[k].shape == expected[k].shape, k
        assert np.isfinite(got[k].astype(np.float32)).all(), k
        assert row_distance(got[k], expected[k]).max() < tolerance(dev, precision), k
    assert np.array_equal(part["pool5"], got["pool5"][rows["pool5"]]) and part["fc7"].shape == (0, got["fc7"].shape[1])


@pytest.mark.parametrize("windows", [5, N_BOXES], ids=["few windows (roi_pool)", "many windows (tables)"])
@pytest.mark.parametrize("precision", ["auto", "float32"])
def test_spp_features_on_the_device_match_the_cpus_float32(dev, image_and_boxes, precision, windows):
    image, boxes = image_and_boxes
    bgr, boxes = image[:, :, ::-1].copy(), boxes[:windows]
    base = build_model("tiny", 5, 64, spp_levels=(4, 2, 1))
    layers = ("pool5", "fc7")
    expected = PooledRegionFeatures(copy.deepcopy(base), scales=(160, 224), target=32, precision="float32")(bgr, boxes, layers)
    features = PooledRegionFeatures(copy.deepcopy(base).to(dev), scales=(160, 224), target=32, precision=precision)
    with strict_float32(precision == "float32"):
        got = features(bgr, boxes, layers)
    for k in layers:
        assert got[k].dtype == np.float16 and got[k].shape == expected[k].shape, k
        assert np.isfinite(got[k].astype(np.float32)).all(), k
        assert row_distance(got[k], expected[k]).max() < tolerance(dev, precision), k


@pytest.mark.parametrize(
    "backbone, size, batch", [("tiny", 64, 16), ("squeezenet1_0", 227, 16), ("alexnet", 227, 16), ("vgg16", 224, 8)]
)
def test_training_steps_repeat_bit_for_bit_under_deterministic_cudnn(dev, backbone, size, batch):
    # Fine-tuning's resume promise rests on this: channels-last weights, bfloat16 autocast (on a GPU) and
    # deterministic cuDNN give the same weights on every run. Random weights: build_model seeds its own draws.
    def three_steps() -> list[torch.Tensor]:
        model = to_training_device(build_model(backbone, 21, size), dev)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 3, size, size, generator=g).to(dev)
        y = torch.randint(0, 21, (batch,), generator=g).to(dev)
        torch.manual_seed(3)  # dropout's masks, on the CPU and every GPU
        with deterministic_cudnn(dev):
            model.train()
            for _ in range(3):
                with training_autocast(dev):
                    loss = torch.nn.functional.cross_entropy(model(x).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return [p.detach().float().cpu() for p in model.parameters()]

    first, second = three_steps(), three_steps()
    assert all(torch.isfinite(p).all() for p in first)
    assert all(torch.equal(p, q) for p, q in zip(first, second)), "two identical runs differ: a non-deterministic kernel"


@pytest.mark.parametrize("scales, svd", [((320,), (None, None)), ((256, 384), (16, 8))])
@pytest.mark.parametrize("precision", ["float32", "auto"])
def test_fast_rcnn_outputs_on_the_gpu_match_the_cpus(dev, image_and_boxes, precision, scales, svd):
    from rcnn.methods.fast_regions import FastRegionOutputs
    from rcnn.modeling.models import add_box_head

    image, boxes = image_and_boxes
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    torch.manual_seed(0)
    model = add_box_head(build_model("tiny", 6, 32))
    with torch.no_grad():  # deltas of every size, and the statistics evaluate un-normalises with
        model.bbox_pred.weight.normal_(std=0.01)
        model.bbox_mean.uniform_(-0.1, 0.1)
        model.bbox_std.uniform_(0.1, 0.3)
    # one scale, and two with the fc layers' truncated SVDs (computed on each device from the same weights)
    ours = FastRegionOutputs(copy.deepcopy(model).to(dev), scales, None, precision, svd)(bgr, boxes)
    with strict_float32(True):
        ref = FastRegionOutputs(model, scales, None, "float32", svd)(bgr, boxes)
    tol = tolerance(dev, precision)
    probs = {k: np.exp(v["cls_logprob"].astype(np.float32)) for k, v in (("ours", ours), ("ref", ref))}
    assert row_distance(probs["ours"], probs["ref"]).max() < tol
    assert row_distance(ours["bbox_deltas"], ref["bbox_deltas"]).max() < tol
