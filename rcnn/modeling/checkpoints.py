"""Weights and checkpoints: ImageNet weights (torchvision's, or a local file) mapped onto a backbone, and
fine-tuned checkpoints that load without executing code."""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from pickle import UnpicklingError

import torch

from rcnn.errors import UserError
from rcnn.modeling.models import PYRAMID_LAYOUT, BackboneSpec, DetectorNet, add_box_head, build_model, fc6_for_bins


def imagenet_weights_file(backbone: str) -> tuple[str, Path]:
    """Where torchvision downloads ``backbone``'s ImageNet weights from, and the file it keeps them in."""
    import torchvision

    url = torchvision.models.get_model_weights(backbone).DEFAULT.url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights through its weights API, with an offline-friendly error."""
    import torchvision

    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # no network, proxy, truncated download...
        url, path = imagenet_weights_file(backbone)
        reason = " ".join(f"{type(e).__name__}: {e}".split())  # one line, whatever the exception's text
        raise UserError(
            f"cannot load ImageNet weights for {backbone} ({reason}); download {url} "
            f"and put it in {path}, or set model.weights to a local .pth file"
        ) from None


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``path``, loaded with ``weights_only=True`` so no code in it can run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError as e:
        raise UserError(f"'{path}' holds more than tensors and was refused (loading it could run code): {e}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"'{path}' is not a readable PyTorch weights file ({e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"'{path}' is not a state dict (a mapping of names to tensors)")
    return obj


def initialise(model: DetectorNet, weights: str) -> list[str]:
    """Load pretrained trunk (and fc6/fc7 where the backbone has them) into ``model``.

    ``weights`` is ``imagenet`` (torchvision's weights API), ``scratch``, or a path to a
    state dict of the torchvision model (e.g. ``squeezenet1_0-imagenet.pth``).
    Returns the names of the loaded tensors.
    """
    if weights == "scratch":
        return []
    name = model.spec.name
    state = None if weights == "imagenet" else load_weights_file(weights)
    if state is not None and any(k.startswith("trunk.") for k in state):
        return _load_matching(model, state, weights)
    if name == "tiny":
        raise UserError("the tiny backbone has no pretrained weights; use model.weights: scratch or a checkpoint")
    state = imagenet_state_dict(name) if state is None else state
    mapping = _torchvision_names(name)
    if model.spec.spp_levels:  # fc6 reads the pyramid now: it starts afresh
        mapping = {k: v for k, v in mapping.items() if not k.startswith("fc6.")}
    loaded = []
    own = model.state_dict()
    for ours, theirs in mapping.items():
        if theirs not in state:
            raise UserError(f"weights for {name} lack '{theirs}' (is '{weights}' a {name} state dict?)")
        if state[theirs].shape != own[ours].shape:
            raise UserError(
                f"weights '{theirs}' have shape {tuple(state[theirs].shape)}, expected {tuple(own[ours].shape)} for {name}"
            )
        own[ours] = state[theirs]
        loaded.append(ours)
    model.load_state_dict(own)
    return loaded


def _load_matching(model: DetectorNet, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy the trunk (and fc6/fc7 where shapes agree) from one of this project's checkpoints."""
    own = model.state_dict()
    trunk = [k for k in own if k.startswith("trunk.")]
    missing = [k for k in trunk if k not in state or state[k].shape != own[k].shape]
    if missing:
        raise UserError(f"checkpoint '{source}' has no matching '{missing[0]}' for a {model.spec.name} trunk")
    loaded = [
        k
        for k in own
        if k in state and state[k].shape == own[k].shape and not k.startswith("classifier.") and k != "fc6_input_scale"
    ]
    own.update({k: state[k] for k in loaded})
    model.load_state_dict(own)
    return loaded


def _torchvision_names(name: str) -> dict[str, str]:
    """Our parameter names -> torchvision's, for the pretrained parts of each backbone."""
    import torchvision

    net = torchvision.models.get_model(name, weights=None)
    out = {}
    for key in net.state_dict():
        if key.startswith("features."):
            out["trunk." + key[len("features.") :]] = key
    if name == "alexnet":
        out.update({f"fc6.{p}": f"classifier.1.{p}" for p in ("weight", "bias")})
        out.update({f"fc7.{p}": f"classifier.4.{p}" for p in ("weight", "bias")})
    elif name == "vgg16":
        out.update({f"fc6.{p}": f"classifier.0.{p}" for p in ("weight", "bias")})
        out.update({f"fc7.{p}": f"classifier.3.{p}" for p in ("weight", "bias")})
    return out


def save_tensors(obj: object, path: Path) -> None:
    """``torch.save(obj, path)``, where a write that fails is the error any other write gives: an ``OSError``
    (no space left, naming the file) or one line, never torch's ``RuntimeError`` about a zip position, and no
    partial file is left."""
    path = Path(path)
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        full = shutil.disk_usage(path.parent).free < 1 << 20
        path.unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise UserError(f"could not write '{path}' ({str(e).splitlines()[0]})") from None


def save_checkpoint(path: Path, model: DetectorNet, meta: dict) -> None:
    """Write ``model``'s state dict to ``path`` and its description to ``path`` + ``.json``, atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_tensors(model.state_dict(), tmp)
    os.replace(tmp, path)
    info = {"spec": asdict(model.spec), "num_classes": model.classifier.out_features, **meta}
    if model.spec.spp_levels:
        info["pyramid_layout"] = PYRAMID_LAYOUT
    tmp_json = path.with_name(f".{path.name}.json.tmp")
    tmp_json.write_text(json.dumps(info, indent=2, sort_keys=True))
    os.replace(tmp_json, path.with_name(path.name + ".json"))


def checkpoint_description(path: Path) -> tuple[BackboneSpec, dict]:
    """The spec and description :func:`save_checkpoint` wrote beside the weights at ``path``.

    Descriptions written before the offset existed give 0, the mapping their models were trained with.
    """
    meta_path = Path(path).with_name(Path(path).name + ".json")
    try:
        meta = json.loads(meta_path.read_text())
        raw = meta["spec"]
        levels = tuple(raw["spp_levels"]) if raw.get("spp_levels") else None
        spec = BackboneSpec(**{**raw, "mean": tuple(raw["mean"]), "std": tuple(raw["std"]), "spp_levels": levels})
        int(meta["num_classes"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint description '{meta_path}' is missing or damaged ({e})") from None
    return spec, meta


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[DetectorNet, dict]:
    """Rebuild a model saved by :func:`save_checkpoint`; tensors only, never pickled objects."""
    path = Path(path)
    spec, meta = checkpoint_description(path)
    levels = spec.spp_levels
    model = build_model(spec.name, int(meta["num_classes"]), spec.input_size, spec.fc_dim, spp_levels=levels)
    model.spec = replace(model.spec, offset=spec.offset)  # the one its windows were mapped with in training
    state = load_weights_file(path)
    if "bbox_pred.weight" in state:  # Fast R-CNN's sibling box layer
        add_box_head(model)
    state.setdefault("fc6_input_scale", torch.ones(()))  # checkpoints written before the scale existed
    weight = state.get("fc6.weight")
    old_layout = levels and meta.get("pyramid_layout", "channels") == "channels"
    if old_layout and weight is not None and weight.dim() == 2 and weight.shape[1] == spec.pool5_dim:
        state["fc6.weight"] = fc6_for_bins(weight, spec)  # trained before PYRAMID_LAYOUT, on channel-major pyramids
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint '{path}' does not fit a {spec.name} model: {str(e).splitlines()[0]}") from None
    return model.to(device), meta
