"""Backbones, weight loading and checkpoints: shapes, pretrained mapping, and no code execution from files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from rcnn.errors import UserError
from rcnn.modeling.checkpoints import initialise, load_checkpoint, load_weights_file, save_checkpoint
from rcnn.modeling.models import build_model, normalise_crops


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


def test_spp_fc6_is_drawn_channel_major_and_older_checkpoints_load_into_the_bin_major_layout(tmp_path):
    import json

    from rcnn.modeling.models import PYRAMID_LAYOUT
    from rcnn.modeling.spp import bins_order

    levels, channels = (2, 1), 96
    order = bins_order(channels, levels)
    model = build_model("tiny", 3, 64, 32, seed=5, spp_levels=levels).eval()
    # The same seed draws the same fc6 as before the layout existed, only its columns rearranged:
    # the unchanged draw is what the generator gives after building the rest of the network.
    build_model("tiny", 3, 64, 32, seed=5)  # seeds and consumes the generator as far as the SPP fc6
    drawn = torch.nn.Linear(model.spec.pool5_dim, 32).weight.detach().normal_(std=0.005)
    assert torch.equal(model.fc6.weight, drawn[:, order])

    pyramids = torch.rand(4, model.spec.pool5_dim)  # channel-major, as an older version pooled them
    save_checkpoint(tmp_path / "m.pt", model, {"classes": ["a", "b"]})
    meta = json.loads((tmp_path / "m.pt.json").read_text())
    assert meta["pyramid_layout"] == PYRAMID_LAYOUT == "bins"
    # An older checkpoint: no layout recorded, fc6 weights for channel-major pyramids.
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    state["fc6.weight"] = state["fc6.weight"][:, torch.argsort(order)]
    torch.save(state, tmp_path / "m.pt")
    del meta["pyramid_layout"]
    (tmp_path / "m.pt.json").write_text(json.dumps(meta))
    old = build_model("tiny", 3, 64, 32, spp_levels=levels).eval()
    old.load_state_dict(state)
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    with torch.no_grad():
        # what the older version computed from channel-major pyramids, this one computes from bin-major ones
        torch.testing.assert_close(loaded.eval().head(pyramids[:, order])["fc7"], old.head(pyramids)["fc7"])
        assert torch.equal(loaded.fc6.weight, model.fc6.weight)


def _receptive_field_probe(trunk: torch.nn.Module) -> torch.nn.Module:
    """``trunk`` with max pooling made average pooling of the same geometry and every filter constant.

    Every pixel of a cell's receptive field then gets a gradient, so the gradient's support is the
    whole receptive field, and its midpoint the centre.
    """
    import copy

    from torch import nn

    probe = copy.deepcopy(trunk).double().eval()
    for module in list(probe.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode))
    for layer in probe.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.constant_(layer.weight, 1.0 / layer.weight[0].numel())
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return probe


@pytest.mark.parametrize(
    "name, width, offset", [("tiny", 160, 3.0), ("alexnet", 400, 15.0), ("vgg16", 480, 7.5), ("squeezenet1_0", 560, 17.0)]
)
def test_trunk_offset_is_where_each_backbone_centres_its_cells(name, width, offset):
    # Worked by hand: tiny, 5x5/2 pad 2 then 2x2 pools; AlexNet, 11x11/4 pad 2 and 3x3/2 pools; VGG16,
    # 2x2 pools; SqueezeNet, 7x7/2 unpadded and 3x3/2 pools. Measured here from the gradient's support.
    model = build_model(name, 3)
    stride = model.spec.stride
    assert model.spec.offset == offset
    probe = _receptive_field_probe(model.trunk)
    image = torch.ones(1, 3, 48, width, dtype=torch.float64, requires_grad=True)
    out = probe(image)
    # Three cells mid-map: cells near the borders see a receptive field cut by padding or ceil-mode pools.
    n = out.shape[-1]
    for j in range(n // 2 - 1, n // 2 + 2):
        (grad,) = torch.autograd.grad(out[0, :, 0, j].sum(), image, retain_graph=True)
        cols = torch.nonzero(grad[0].abs().sum((0, 1))).flatten()
        lo, hi = cols.min().item(), cols.max().item()
        assert lo > 0 and hi < width - 2 * stride  # the whole receptive field, clear of the borders
        assert (lo + hi) / 2 == stride * j + offset


def test_trunk_offset_composes_layers_and_refuses_what_one_offset_cannot_describe():
    from torch import nn

    from rcnn.modeling.models import trunk_offset

    # floor(p/2) padding everywhere: the paper's case, offset 0
    assert trunk_offset(nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(3, 2, 1)), 4) == 0.0
    # an unpadded 3x3 conv centres output j on input j + 1; after a stride-2 layer that counts twice
    assert trunk_offset(nn.Sequential(nn.Conv2d(3, 4, 1, 2), nn.Conv2d(4, 4, 3)), 2) == 2.0
    assert trunk_offset(nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2)), 1) == 2.0
    with pytest.raises(ValueError, match="stride"):
        trunk_offset(nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1)), 4)
    with pytest.raises(ValueError, match="both axes"):
        trunk_offset(nn.Sequential(nn.Conv2d(3, 4, (3, 1), 1, (1, 0))), 1)


def test_checkpoints_keep_the_offset_their_windows_were_mapped_with(tmp_path):
    import json

    model = build_model("tiny", 3, 64, 32, spp_levels=(2, 1))
    save_checkpoint(tmp_path / "m.pt", model, {})
    assert load_checkpoint(tmp_path / "m.pt")[0].spec.offset == 3.0
    # written before the offset existed: trained on windows mapped with none
    meta = json.loads((tmp_path / "m.pt.json").read_text())
    del meta["spec"]["offset"]
    (tmp_path / "m.pt.json").write_text(json.dumps(meta))
    assert load_checkpoint(tmp_path / "m.pt")[0].spec.offset == 0.0


@pytest.mark.parametrize("free, error", [(0, OSError), (10 << 30, UserError)])
def test_a_checkpoint_write_that_fails_is_a_write_error_and_leaves_no_file(tmp_path, monkeypatch, free, error):
    # On a full disk torch.save raised "RuntimeError: [enforce fail at inline_container.cc] unexpected pos", a traceback.
    import errno
    import shutil

    from rcnn.modeling import checkpoints

    torch_says = "[enforce fail at inline_container.cc:672] . unexpected pos 652608 vs 652504"

    def short_write(obj, path):
        path.write_bytes(b"PK\x03\x04")
        raise RuntimeError(torch_says)

    monkeypatch.setattr(checkpoints.torch, "save", short_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, (1 << 30) - free, free))
    model = build_model("tiny", 3, input_size=32)
    with pytest.raises(error) as caught:
        save_checkpoint(tmp_path / "model.pt", model, {})
    if error is OSError:
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / ".model.pt.tmp")
    else:
        assert str(caught.value) == f"could not write '{tmp_path / '.model.pt.tmp'}' ({torch_says})"
    assert list(tmp_path.iterdir()) == []
