"""Inference preparation: folded batch norms and fc6 scale, oneDNN fc layers, float16 rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcnn.modeling import inference
from rcnn.modeling.inference import (
    ENV_ONEDNN_LINEAR,
    OneDNNLinear,
    flush_denormals,
    fold_batch_norm,
    for_inference,
    onednn_linear_helps,
    to_float16,
)
from rcnn.modeling.models import build_model


def _trained_looking_tiny(spp_levels=None) -> torch.nn.Module:
    """A tiny net whose batch norms hold non-trivial statistics, as after training."""
    torch.manual_seed(1)
    model = build_model("tiny", 3, 64, 32, spp_levels=spp_levels)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("whole_images", [False, True])
def test_for_inference_folds_batch_norm_and_fc6_scale_without_changing_outputs(whole_images):
    model = _trained_looking_tiny(spp_levels=(2, 1) if whole_images else None)
    model.fc6_input_scale.fill_(0.01)
    images = torch.randn(5, 3, 64, 64)
    pooled = torch.rand(5, model.spec.pool5_dim) * 100
    with torch.no_grad():
        maps, head = model.trunk(images), model.head(pooled, ("fc6", "fc7"))
        for_inference(model, whole_images=whole_images)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert float(model.fc6_input_scale) == 1.0
        torch.testing.assert_close(model.trunk(images), maps, rtol=1e-4, atol=1e-4)
        folded = model.head(pooled, ("fc6", "fc7"))
        for layer in ("fc6", "fc7"):
            torch.testing.assert_close(folded[layer], head[layer], rtol=1e-4, atol=1e-4)
        # a second call changes nothing
        for_inference(model, whole_images=whole_images)
        torch.testing.assert_close(model.head(pooled, ("fc7",))["fc7"], folded["fc7"])
    assert model.trunk[0].weight.is_contiguous(memory_format=torch.channels_last) == whole_images


def test_subnormal_weights_are_zeroed_for_inference_without_changing_outputs():
    model = _trained_looking_tiny(spp_levels=(2, 1))
    tiny = torch.finfo(torch.float32).tiny  # the smallest normal float32, 1.2e-38
    w = model.fc6.weight.data
    picked = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.3  # as training leaves them
    w[picked] = torch.where(w[picked] > 0, 1.0, -1.0) * tiny * torch.rand(int(picked.sum()))
    subnormal = (w != 0) & (w.abs() < tiny)
    assert int(subnormal.sum()) > 100
    normal = w[~subnormal].clone()
    pooled = torch.rand(7, model.spec.pool5_dim) * 10
    with torch.no_grad():
        before = model.head(pooled, ("fc6", "fc7"))
        for_inference(model, whole_images=True)
        weight = model.fc6.weight if isinstance(model.fc6, torch.nn.Linear) else model.fc6.weight.to_dense()
        assert not ((weight != 0) & (weight.abs() < tiny)).any()
        assert torch.equal(weight[~subnormal], normal) and not weight[subnormal].any()  # normal weights untouched
        after = model.head(pooled, ("fc6", "fc7"))
    for layer in ("fc6", "fc7"):
        torch.testing.assert_close(after[layer], before[layer], rtol=1e-5, atol=1e-6)
    extra = torch.tensor([0.0, 1e-40, -3e-39, 1e-30, -2.0])
    flush_denormals([extra])
    assert extra.tolist() == [0.0, 0.0, 0.0, pytest.approx(1e-30), -2.0]


def test_fold_batch_norm_leaves_a_convolution_without_batch_norm_alone():
    conv = torch.nn.Conv2d(3, 4, 3)
    net = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.BatchNorm2d(4).eval())
    fold_batch_norm(net)
    assert net[0] is conv and isinstance(net[2], torch.nn.BatchNorm2d)  # the batch norm follows a ReLU


def test_to_float16_rounds_exactly_as_numpy():
    x = torch.cat([torch.randn(10_000) * s for s in (1e-7, 1e-4, 1.0, 1e3, 6e4, 1e5)])
    x = torch.cat([x, torch.tensor([65504.0, 65519.0, 65520.0, 2.0**-24 * 1.5, float("inf"), -float("inf")])])
    x = x[: len(x) // 2 * 2].view(2, -1).t()  # a transposed (non-contiguous) view, as channels-last maps are
    got = to_float16(x)
    with np.errstate(over="ignore"):  # 1e5 and 65520 round to infinity, on both sides
        want = x.numpy().astype(np.float16)
    assert got.dtype == np.float16 and got.flags.c_contiguous
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_nn_linear(bias, relu, fused, monkeypatch):
    if fused and not inference._has_fused_linear():
        pytest.skip("this torch has no fused oneDNN linear operator")
    monkeypatch.setattr(inference, "_has_fused_linear", lambda: fused)
    torch.manual_seed(0)
    layer = torch.nn.Linear(300, 70, bias=bias)
    fast = OneDNNLinear.of(layer, relu=relu)
    assert OneDNNLinear.of(fast) is fast and fast.fused == fused

    def reference(x):
        y = layer(x)
        return torch.relu(y) if relu else y

    for rows in (1, 37):
        x = torch.randn(rows, 300) * 5
        with torch.no_grad():
            torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-4)
            assert relu == bool((fast(x) >= 0).all())  # about half the outputs are negative without the ReLU
    # a non-contiguous input (a transposed view), a float16 one, and no rows at all
    x = torch.randn(300, 9).t()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(fast(x.half()), reference(x.half().float()), rtol=1e-5, atol=1e-4)
    assert fast(torch.zeros(0, 300)).shape == (0, 70)


@needs_onednn
def test_for_inference_uses_onednn_linear_where_it_helps(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert onednn_linear_helps(cpu) and not onednn_linear_helps(torch.device("cuda"))
    model = for_inference(_trained_looking_tiny())
    assert isinstance(model.fc6, OneDNNLinear) and isinstance(model.fc7, OneDNNLinear)
    # each takes over its ReLU
    assert model.fc6.relu and model.fc7.relu
    assert isinstance(model.relu6, torch.nn.Identity) and isinstance(model.relu7, torch.nn.Identity)
    monkeypatch.setattr("platform.machine", lambda: "arm64")
    assert not onednn_linear_helps(cpu)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setenv(ENV_ONEDNN_LINEAR, "0")
    assert not onednn_linear_helps(cpu)
    model = for_inference(_trained_looking_tiny())
    assert type(model.fc6) is torch.nn.Linear and type(model.fc7) is torch.nn.Linear


def test_to_float32_is_numpys_exact_conversion():
    import numpy as np

    from rcnn.modeling.inference import to_float32

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((300, 70)) * 1e3).astype(np.float16)
    x[0, :4] = [np.inf, -np.inf, 0.0, -0.0]
    x[1, :2] = [np.float16(6e-8), np.float16(65504)]  # a subnormal and the largest float16
    got = to_float32(x[::2])  # a strided view too
    assert got.dtype == np.float32 and np.array_equal(got, x[::2].astype(np.float32))
    assert np.signbit(got[0, 3])


def test_a_gpu_computes_features_in_bfloat16_and_a_cpu_in_float32():
    assert inference.inference_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert inference.inference_dtype(torch.device("cpu")) == torch.float32
    model = for_inference(_trained_looking_tiny())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad(), inference.inference_autocast(model):  # off: float32 in, float32 out
        assert model.trunk(torch.randn(1, 3, 64, 64)).dtype == torch.float32


@pytest.mark.parametrize("whole_images", [False, True])
def test_weights_cast_once_compute_what_autocast_casting_them_at_every_call_does(whole_images, monkeypatch):
    """for_inference in bfloat16 (a GPU's precision) casts the weights once; inference_autocast then casts the
    inputs only. Checked on the CPU, where autocast runs in bfloat16 too: the same numbers as float32 weights
    under autocast, which casts them at every call."""
    monkeypatch.setenv(ENV_ONEDNN_LINEAR, "0")  # oneDNN's fc layers are float32 only
    levels = (2, 1) if whole_images else None
    cast_each_call = for_inference(_trained_looking_tiny(levels), whole_images=whole_images)
    cast_once = for_inference(_trained_looking_tiny(levels), whole_images=whole_images, dtype=torch.bfloat16)
    assert {p.dtype for p in cast_once.parameters()} == {torch.bfloat16}
    images = torch.randn(4, 3, 64, 64)
    pooled = (torch.rand(4, cast_once.spec.pool5_dim) * 10).half()  # SPP-net's windows come from float16 maps
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = cast_each_call.trunk(images), cast_each_call.head(pooled, ("fc6", "fc7"))
        with inference.inference_autocast(cast_once):
            got = cast_once.trunk(images), cast_once.head(pooled, ("fc6", "fc7"))
        reference = _trained_looking_tiny(levels).head(pooled.float(), ("fc7",))["fc7"]
    assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], want[0])
    for layer in ("fc6", "fc7"):
        assert torch.equal(got[1][layer], want[1][layer]), layer
    # and bfloat16's own rounding, against float32: within 2 % of the layer's largest value
    assert (got[1]["fc7"].float() - reference).abs().max() <= 0.02 * reference.abs().max()


def test_region_features_of_both_methods_run_in_bfloat16():
    """The feature code runs a bfloat16 model end to end (as on a GPU) and agrees with float32 within its rounding."""
    from rcnn.methods.rcnn_regions import region_features
    from rcnn.methods.spp_regions import image_maps, spp_region_features

    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (80, 112, 3), dtype=np.uint8)
    xy = rng.uniform(0, 70, (50, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, 40, (50, 2))], axis=1).astype(np.float32)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        rcnn_net = for_inference(_trained_looking_tiny(), dtype=dtype)
        spp_net = for_inference(_trained_looking_tiny((2, 1)), whole_images=True, dtype=dtype)
        maps = image_maps(spp_net, image[:, :, ::-1], [1.0])
        out[dtype] = {
            "R-CNN": region_features(rcnn_net, image, boxes, ("pool5", "fc7"), 4, 16, "torch"),
            "SPP-net": spp_region_features(spp_net, maps, [1.0], boxes, ("pool5", "fc7"), 32.0),
        }
    for method in ("R-CNN", "SPP-net"):
        for layer in ("pool5", "fc7"):
            a, b = out[torch.float32][method][layer].astype(np.float32), out[torch.bfloat16][method][layer].astype(np.float32)
            assert a.shape == b.shape and a.dtype == b.dtype
            assert np.abs(a - b).max() <= 0.05 * np.abs(a).max(), (method, layer)
            assert not np.array_equal(a, b)  # bfloat16 did run
