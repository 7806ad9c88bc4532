"""Backbones, weight loading and checkpoints: shapes, pretrained mapping, and no code execution from files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from rcnn.errors import UserError
from rcnn.models import (
    ENV_ONEDNN_LINEAR,
    OneDNNLinear,
    build_model,
    fold_batch_norm,
    for_inference,
    initialise,
    load_checkpoint,
    load_weights_file,
    normalise_crops,
    onednn_linear_helps,
    save_checkpoint,
    to_float16,
)


@pytest.mark.parametrize(
    "name, size, pool5, fc",
    [("tiny", 64, 96 * 4 * 4, 256), ("squeezenet1_0", 128, 512 * 3 * 3, 1024), ("alexnet", None, 9216, 4096)],
)
def test_layer_shapes(name, size, pool5, fc):
    model = build_model(name, 6, size).eval()
    s = model.spec.input_size
    out = model.extract(torch.zeros(2, 3, s, s), ("pool5", "fc6", "fc7"))
    assert out["pool5"].shape == (2, pool5) and out["fc6"].shape == (2, fc) and out["fc7"].shape == (2, fc)
    assert model(torch.zeros(2, 3, s, s)).shape == (2, 6)
    assert model.spec.pool5_dim == pool5


def test_alexnet_matches_the_paper_at_227():
    spec = build_model("alexnet", 21).spec
    assert (spec.input_size, spec.pool5_grid, spec.pool5_dim, spec.fc_dim, spec.stride) == (227, 6, 9216, 4096, 16)


def test_torchvision_state_dict_loads_into_the_trunk(tmp_path):
    import torchvision

    reference = torchvision.models.squeezenet1_0(weights=None)
    path = tmp_path / "sq.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("squeezenet1_0", 3, 128)
    loaded = initialise(model, str(path))
    assert len(loaded) == len([k for k in reference.state_dict() if k.startswith("features.")])
    torch.testing.assert_close(model.trunk[0].weight, reference.features[0].weight)


def test_wrong_or_missing_weights_are_user_errors(tmp_path):
    path = tmp_path / "alex.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="have shape \\(3,\\), expected \\(96, 3, 7, 7\\)"):
        initialise(build_model("squeezenet1_0", 3, 128), str(path))
    torch.save({"other.weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="lack 'features.0.weight'"):
        initialise(build_model("squeezenet1_0", 3, 128), str(path))
    with pytest.raises(UserError, match="does not exist"):
        initialise(build_model("squeezenet1_0", 3, 128), str(tmp_path / "none.pth"))
    with pytest.raises(UserError, match="no pretrained weights"):
        initialise(build_model("tiny", 3), "imagenet")


class Payload:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __reduce__(self):
        return (open, (str(MARKER), "w"))


MARKER = None


def test_checkpoint_with_pickle_payload_is_refused_and_runs_nothing(tmp_path):
    global MARKER
    MARKER = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"weight": Payload()}, f, protocol=2)
    with pytest.raises(UserError, match="refused"):
        load_weights_file(evil)
    assert not MARKER.exists()
    truncated = tmp_path / "trunc.pt"
    torch.save({"w": torch.zeros(10)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:50])
    with pytest.raises(UserError):
        load_weights_file(truncated)


def test_checkpoint_round_trip(tmp_path):
    model = build_model("tiny", 4, 32).eval()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, {"classes": ["a", "b", "c"]})
    again, meta = load_checkpoint(path)
    again.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), again(x))
    assert meta["classes"] == ["a", "b", "c"] and meta["spec"]["name"] == "tiny"
    (tmp_path / "model.pt.json").write_text("{broken")
    with pytest.raises(UserError, match="missing or damaged"):
        load_checkpoint(path)


def test_normalise_crops_uses_the_backbone_mean():
    spec = build_model("tiny", 2).spec
    crops = np.tile(np.array(spec.mean_pixel, np.float32).round().astype(np.uint8), (1, 4, 4, 1))
    x = normalise_crops(crops, spec, torch.device("cpu"))
    assert x.shape == (1, 3, 4, 4) and x.abs().max() < 0.02  # the mean pixel is (nearly) zero input


def test_fc6_input_scale_multiplies_fc6_input_and_travels_with_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", 3, 64, 32, spp_levels=(2, 1)).eval()
    pooled = torch.rand(4, model.spec.pool5_dim) * 100
    plain = model.head(pooled, ("fc6", "fc7"))
    model.fc6_input_scale.fill_(0.01)
    scaled = model.head(pooled, ("fc6", "fc7"))
    model.fc6_input_scale.fill_(1.0)
    torch.testing.assert_close(scaled["fc6"], model.head(pooled * 0.01, ("fc6",))["fc6"])
    assert not torch.allclose(scaled["fc6"], plain["fc6"])

    model.fc6_input_scale.fill_(0.01)
    save_checkpoint(tmp_path / "m.pt", model, {"classes": ["a", "b"]})
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert float(loaded.fc6_input_scale) == pytest.approx(0.01)
    torch.testing.assert_close(loaded.eval().head(pooled)["fc7"], scaled["fc7"])

    # A checkpoint written before the scale existed loads with scale 1.
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    del state["fc6_input_scale"]
    torch.save(state, tmp_path / "m.pt")
    assert float(load_checkpoint(tmp_path / "m.pt")[0].fc6_input_scale) == 1.0

    # Another pipeline's checkpoint lends its trunk and fc layers, not its scale.
    fresh = build_model("tiny", 3, 64, 32, spp_levels=(2, 1))
    model.fc6_input_scale.fill_(0.01)
    save_checkpoint(tmp_path / "n.pt", model, {"classes": ["a", "b"]})
    initialise(fresh, str(tmp_path / "n.pt"))
    assert float(fresh.fc6_input_scale) == 1.0


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
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_nn_linear(bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(300, 70, bias=bias)
    fast = OneDNNLinear.of(layer)
    assert OneDNNLinear.of(fast) is fast
    for rows in (1, 37):
        x = torch.randn(rows, 300) * 5
        with torch.no_grad():
            torch.testing.assert_close(fast(x), layer(x), rtol=1e-5, atol=1e-4)
    # a non-contiguous input (a transposed view), a float16 one, and no rows at all
    x = torch.randn(300, 9).t()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(fast(x.half()), layer(x.half().float()), rtol=1e-5, atol=1e-4)
    assert fast(torch.zeros(0, 300)).shape == (0, 70)


@needs_onednn
def test_for_inference_uses_onednn_linear_where_it_helps(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert onednn_linear_helps(cpu) and not onednn_linear_helps(torch.device("cuda"))
    model = for_inference(_trained_looking_tiny())
    assert isinstance(model.fc6, OneDNNLinear) and isinstance(model.fc7, OneDNNLinear)
    monkeypatch.setattr("platform.machine", lambda: "arm64")
    assert not onednn_linear_helps(cpu)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setenv(ENV_ONEDNN_LINEAR, "0")
    assert not onednn_linear_helps(cpu)
    model = for_inference(_trained_looking_tiny())
    assert type(model.fc6) is torch.nn.Linear and type(model.fc7) is torch.nn.Linear
