"""Pipeline configuration: ``pipelines.yaml`` loaded into frozen, typed dataclasses.

The file is read once; unknown keys, wrong types and bad choices are rejected with
the key and the file named. ``--set key=value`` overrides are typed the same way.
Nothing mutates a configuration after loading; stages receive plain values from it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rcnn.errors import ConfigError
from rcnn.filenames import name_problem
from rcnn.seeds import SEED_KEYS, SEEDED_NAME, split_seeded_name

# Every field is declared with :func:`setting`: its default, one line saying what it is and where the
# default comes from (docs/pipelines.md is generated from these), the range a number must lie in, and
# whether it changes a stage's output (``fingerprint=False``: worker counts, batch sizes for speed) or
# is a path resolved relative to the YAML file.


@dataclass(frozen=True)
class Range:
    """The values a number may take: bounds (inclusive ``ge``/``le``, exclusive ``gt``/``lt``) and extra values."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple[float, ...] = ()

    def __contains__(self, x: float) -> bool:
        if x in self.also:
            return True
        return not (
            (self.ge is not None and x < self.ge)
            or (self.gt is not None and x <= self.gt)
            or (self.le is not None and x > self.le)
            or (self.lt is not None and x >= self.lt)
        )

    def __str__(self) -> str:
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if low and high:
            text = f"in {low}, {high}"
        elif low:
            text = (">= " if low[0] == "[" else "> ") + low[1:]
        elif high:
            text = ("<= " if high[-1] == "]" else "< ") + high[:-1]
        else:
            text = "any number"
        return text + "".join(f", or {a:g}" for a in self.also)


def setting(default, doc: str, *, ge=None, gt=None, le=None, lt=None, also=(), fingerprint=True, path=False, keywords=()):
    """A configuration field: ``default``, its one-line ``doc`` (with the paper the default comes from), the
    range a number (or each number of a list) must lie in, and how stages treat it."""
    meta = {"doc": doc, "fingerprint": fingerprint, "path": path, "keywords": keywords}
    if any(v is not None for v in (ge, gt, le, lt)):
        meta["range"] = Range(ge, gt, le, lt, tuple(also))
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SyntheticConfig:
    """Synthetic shapes data, generated under the runs folder when missing."""

    images: int = setting(60, "number of images, a third of them the test split", ge=2)
    seed: int = setting(0, "the same seed gives identical files", ge=0)
    size: int = setting(256, "image side in pixels", ge=64)


@dataclass(frozen=True)
class DataConfig:
    """A VOC-layout dataset: a root folder and the names of its two splits."""

    root: str | None = setting(None, "dataset folder (JPEGImages/, Annotations/, ImageSets/Main/); null: synthetic", path=True)
    trainval: str = setting("trainval", "split the detector learns from (ImageSets/Main/NAME.txt)")
    test: str = setting("test", "split it is scored on")
    classes: tuple[str, ...] | None = setting(None, "class names; null: the sorted object names of the trainval split")
    synthetic: SyntheticConfig | None = setting(None, "generate shapes data under the runs folder when root is null")
    use_difficult: bool = setting(
        False, "train on objects marked difficult too (py-faster-rcnn: no); scoring always ignores them, as the devkit"
    )


@dataclass(frozen=True)
class ProposalsConfig:
    """Selective search (Uijlings et al., IJCV 2013) as R-CNN ran it."""

    mode: Literal["fast", "opencv-fast", "opencv-quality", "single"] = setting(
        "fast", "fast: Uijlings' fast mode as R-CNN ran it (HSV+Lab, k = 50/100, two strategies); single: one strategy"
    )
    resize_width: int | None = setting(
        None, "resize to this width before the search, boxes mapped back (R-CNN's release: 500); null: as is", ge=16
    )
    # The search's time and memory grow faster than the pixel count (a 6000 x 6000 photo: 14 min, 6.3 GB), and
    # Uijlings' segment sizes (k = 50/100) were set for VOC's 500 x 375 (0.19 Mpx); 1 Mpx leaves VOC and the demo as is.
    max_pixels: int | None = setting(
        1_000_000,
        "an image over this many pixels (after resize_width) is searched scaled down to it, boxes mapped back, "
        "with a log line; null: no limit",
        ge=64,
    )
    min_size: float = setting(20.0, "drop boxes narrower or shorter than this, in pixels (Uijlings' demo: 20)", ge=0)
    max_proposals: int | None = setting(None, "keep at most this many boxes in the search's own ranking; null: all (R-CNN)", ge=1)
    seed: int = setting(0, "seed of the search's random ranking", ge=0)
    n_jobs: int = setting(-1, "worker processes; -1: all cores", ge=1, also=(-1,), fingerprint=False)


@dataclass(frozen=True)
class ModelConfig:
    """The CNN: backbone, its initialisation and where it runs."""

    backbone: Literal["alexnet", "vgg16", "squeezenet1_0", "tiny"] = setting(
        "alexnet", "the CNN (R-CNN: AlexNet, 'T-Net', or VGG16, 'O-Net'; tiny: a small CNN for the demo)"
    )
    weights: str = setting(
        "imagenet",
        "imagenet (torchvision's weights), scratch, a state-dict file, or pipeline:NAME (another pipeline's fine-tuned model)",
        path=True,
        keywords=("imagenet", "scratch"),
    )
    input_size: int | None = setting(
        None, "side of the warped region; null: the backbone's own (227 AlexNet as R-CNN, 224 VGG16, 64 tiny)", ge=16
    )
    fc_dim: int | None = setting(None, "width of fc6/fc7 where the head is new (squeezenet1_0, tiny); null: 4096 / 256", ge=1)
    seed: int = setting(0, "seed of the weights drawn afresh", ge=0)
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "auto: CUDA when present, else the CPU", fingerprint=False)


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning on warped regions (R-CNN section 2.3)."""

    context_pad: int = setting(16, "pixels of context around each warped region (R-CNN appendix A: p = 16)", ge=0)
    fg_threshold: float = setting(0.5, "IoU with an object at which a region is that class (R-CNN: 0.5)", gt=0, le=1)
    bg_low: float = setting(0.0, "least IoU of a background region (R-CNN: 0, every other region; SPP-net: 0.1)", ge=0, lt=1)
    batch_size: int = setting(128, "regions per mini-batch (R-CNN: 128)", ge=1)
    fg_fraction: float = setting(0.25, "share of foreground regions in a mini-batch (R-CNN: 32 of 128)", gt=0, le=1)
    mirror: bool = setting(
        True, "horizontal flips (R-CNN's data layer mirrors crops; SPP-net's code fine-tunes on the mirror images' maps)"
    )
    optimizer: Literal["sgd", "adam"] = setting("sgd", "sgd as R-CNN; adam for small networks trained from scratch (demo)")
    lr: float = setting(0.001, "learning rate (R-CNN: 0.001, a tenth of the pre-training rate)", gt=0)
    momentum: float = setting(0.9, "SGD momentum (R-CNN: 0.9)", ge=0, lt=1)
    weight_decay: float = setting(0.0005, "weight decay (R-CNN: 0.0005)", ge=0)
    max_iter: int = setting(40000, "SGD iterations", ge=1)
    step_size: int = setting(20000, "multiply lr by gamma every step_size iterations", ge=1)
    gamma: float = setting(0.1, "learning-rate decay factor", gt=0, le=1)
    eval_every: int = setting(1000, "validate and checkpoint every this many iterations", ge=1)
    val_fraction: float = setting(0.1, "share of trainval images held out for validation accuracy", ge=0, lt=1)
    seed: int = setting(0, "seed of sampling, flips and the new layers' weights", ge=0)


@dataclass(frozen=True)
class FeaturesConfig:
    """Cached CNN features of every proposal and ground-truth box."""

    layers: tuple[str, ...] = setting(("pool5", "fc7"), "layers cached (R-CNN: fc7 for the SVMs, pool5 for box regression)")
    batch_size: int = setting(256, "regions per forward pass", ge=1, fingerprint=False)


@dataclass(frozen=True)
class SVMConfig:
    """Per-class linear SVMs with hard-negative mining (R-CNN's released rcnn_train.m)."""

    layer: str = setting("fc7", "feature the SVMs read (R-CNN: fc7 of the fine-tuned network)")
    C: float = setting(0.001, "liblinear's C (R-CNN: 0.001)", gt=0)
    pos_loss_weight: float = setting(2.0, "weight of positives' loss (R-CNN: 2)", gt=0)
    bias_mult: float = setting(10.0, "bias feature value, so the bias is barely regularised (R-CNN: 10)", gt=0)
    neg_overlap: float = setting(0.3, "proposals below this IoU with every object of the class are negatives (R-CNN: 0.3)", ge=0, le=1)
    neg_max_mutual_overlap: float | None = setting(
        None, "drop negatives overlapping another negative by more than this (SPP-net: 0.7); null: keep all", gt=0, le=1
    )
    hard_threshold: float = setting(-1.0001, "a negative scoring above this is hard and joins the cache (R-CNN: -1.0001)")
    evict_threshold: float = setting(-1.2, "cached negatives scoring below this are evicted (R-CNN: -1.2)")
    retrain_limit: int = setting(2000, "retrain once this many new hard negatives are found (R-CNN: 2000)", ge=1)
    target_norm: float = setting(20.0, "features scaled to this mean norm (R-CNN: 20)", gt=0)
    n_jobs: int = setting(-1, "classes trained in parallel; -1: all cores", ge=1, also=(-1,), fingerprint=False)


@dataclass(frozen=True)
class BBoxConfig:
    """Class-specific ridge box regression from pool5 (R-CNN appendix C)."""

    layer: str = setting("pool5", "feature the regressors read (R-CNN: pool5)")
    min_overlap: float = setting(0.6, "train on proposals with at least this IoU with an object (R-CNN: 0.6; SPP-net: 0.5)", ge=0, le=1)
    ridge_lambda: float = setting(1000.0, "ridge penalty (R-CNN: 1000)", ge=0)


@dataclass(frozen=True)
class EvaluateConfig:
    """Test-time detection and scoring."""

    nms_threshold: float = setting(0.3, "per-class greedy NMS IoU (R-CNN: 0.3)", gt=0, le=1)
    max_per_image: int = setting(100, "detections kept per class and image", ge=1)
    metric: Literal["voc07", "voc10"] = setting("voc07", "voc07: 11-point AP (VOC2007 devkit); voc10: all-point AP")


@dataclass(frozen=True)
class SPPConfig:
    """SPP-net (He et al., ECCV 2014): conv maps once per image, windows pooled from them."""

    levels: tuple[int, ...] = setting((6, 3, 2, 1), "pyramid levels, n x n bins each (SPP-net: 6, 3, 2, 1; 50 bins)", ge=1)
    scales: tuple[int, ...] = setting(
        (688,), "shorter image side of each scale (SPP-net: 688, or 480, 576, 688, 864, 1200 for five)", ge=16
    )
    max_side: int | None = setting(2000, "cap on the longer side after resizing; null: none", ge=16)
    target_size: int = setting(
        224, "pool each window at the scale where its area is closest to this squared (SPP-net: 224)", ge=1
    )
    fc6_input_rms: float | None = setting(
        1.0,
        "not from the paper: fc6's input scaled to this RMS, measured on training windows (SqueezeNet's pyramids "
        "have norms ~17,000); null: unscaled",
        gt=0,
    )
    offset: float | Literal["trunk"] = setting(
        "trunk",
        "where conv cell j centres: stride * j + offset; trunk: worked out from the layers, as SPP-net's appendix says "
        "(tiny 3, AlexNet 15, VGG16 7.5, SqueezeNet 17); 0: the formula as printed",
    )
    random_scale: bool = setting(
        False, "fine-tuning pools each window at a random scale (SPP-net's code: random_scale = 1); off: the closest"
    )


@dataclass(frozen=True)
class PipelineConfig:
    """One named pipeline: everything a run needs, resolved."""

    name: str
    description: str = setting("", "one line shown by `rcnn pipelines`")
    hardware: Literal["cpu", "gpu"] | None = setting(
        None,
        "what a run is sized for, shown by `rcnn pipelines` and `rcnn run`: gpu (CUDA; far slower on a CPU), "
        "cpu (a CPU is enough); null: not stated. A statement, not a check",
        fingerprint=False,
    )
    method: Literal["rcnn", "spp"] = setting(
        "rcnn", "rcnn: warp every region through the whole CNN; spp: conv maps once per image, pyramid-pool each window"
    )
    data: DataConfig = setting(DataConfig(), "the dataset")
    proposals: ProposalsConfig = setting(ProposalsConfig(), "selective search")
    model: ModelConfig = setting(ModelConfig(), "the CNN")
    finetune: FinetuneConfig = setting(FinetuneConfig(), "fine-tuning")
    features: FeaturesConfig = setting(FeaturesConfig(), "the feature cache")
    svm: SVMConfig = setting(SVMConfig(), "the class SVMs")
    bbox: BBoxConfig = setting(BBoxConfig(), "box regression")
    evaluate: EvaluateConfig = setting(EvaluateConfig(), "detection and scoring")
    spp: SPPConfig = setting(SPPConfig(), "SPP-net (method: spp)")


# The warped-region sizes each backbone accepts: fc6 of AlexNet and VGG16 is ImageNet's and reads a 6 x 6 / 7 x 7
# pool5 grid; SqueezeNet and tiny need their layers to leave at least one cell.
INPUT_SIZES = {"alexnet": Range(ge=223, le=254), "vgg16": Range(ge=224, le=255), "squeezenet1_0": Range(ge=48), "tiny": Range(ge=16)}


# ----------------------------------------------------------------------------- loading


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: str, where: str) -> str:
    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ConfigError(f"{where}: environment variable {name} is not set")
        return default

    return _ENV.sub(sub, value)


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is tuple:
        return "a list"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return "a mapping" if dataclasses.is_dataclass(tp) else str(tp)


def _coerce(tp: Any, value: Any, key: str, where: str, base: Path | None) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it; raise naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        alternatives = [a for a in args if a is not type(None)]
        if len(alternatives) == 1 and dataclasses.is_dataclass(alternatives[0]):  # an optional section: its key's error
            return _coerce(alternatives[0], value, key, where, base)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, where, base)
            except ConfigError as e:
                errors.append(str(e))
        allowed = " or ".join(_type_name(a) for a in args if a is not type(None))
        allowed += " or null" if type(None) in args else ""
        raise ConfigError(f"{where}: '{key}' must be {allowed}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(item, v, f"{key}[{i}]", where, base) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key, where, base)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
        return _expand_env(value, where)
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _build(cls: type, raw: dict, prefix: str, where: str, base: Path | None) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"{where}: unknown key '{full}' (known keys here: {known})")
        value = _coerce(hints[key], value, full, where, base)
        keywords = fields[key].metadata.get("keywords", ())
        is_keyword = value in keywords or (isinstance(value, str) and value.startswith("pipeline:"))
        if fields[key].metadata.get("path") and isinstance(value, str) and base is not None and not is_keyword:
            value = str((base / value).resolve()) if not os.path.isabs(value) else value
        _check_range(fields[key].metadata.get("range"), value, full, where)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        raise ConfigError(f"{where}: {prefix or 'pipeline'}: {e}") from None


def _check_range(allowed: Range | None, value: Any, key: str, where: str) -> None:
    """Refuse a number (or a list's number) outside the field's range, naming the key, the value and the range."""
    if allowed is None:
        return
    for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (v != v or v not in allowed):
            raise ConfigError(f"{where}: '{key}' must be {allowed}; got {v!r}")


def _check_together(cfg: PipelineConfig, where: str) -> None:
    """Rules between settings, checked once the whole configuration is built."""
    ft, m = cfg.finetune, cfg.model
    if ft.bg_low >= ft.fg_threshold:
        raise ConfigError(
            f"{where}: 'finetune.bg_low' ({ft.bg_low:g}) must be below 'finetune.fg_threshold' ({ft.fg_threshold:g})"
        )
    if cfg.svm.evict_threshold >= cfg.svm.hard_threshold:
        raise ConfigError(
            f"{where}: 'svm.evict_threshold' ({cfg.svm.evict_threshold:g}) must be below "
            f"'svm.hard_threshold' ({cfg.svm.hard_threshold:g}), or evicted negatives would count as hard"
        )
    sizes = INPUT_SIZES[m.backbone]
    if m.input_size is not None and m.input_size not in sizes:
        raise ConfigError(f"{where}: 'model.input_size' must be {sizes} for backbone {m.backbone}; got {m.input_size}")


def _dotted_keys(raw: dict, prefix: str = "") -> list[str]:
    """The leaf keys of a nested mapping, dotted (``{"a": {"b": 1}}`` -> ``["a.b"]``)."""
    keys = []
    for key, value in raw.items():
        full = f"{prefix}{key}"
        keys.extend(_dotted_keys(value, full + ".") if isinstance(value, dict) and value else [full])
    return keys


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check_override_path(cls: type, dotted: str) -> None:
    """Reject ``--set`` keys that name no field, naming the first wrong part."""
    tp: Any = cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        # Unwrap Optional[Dataclass] so nested optional sections can be overridden.
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"--set {dotted}: '{'.'.join(parts[:i])}' is not a section")
        hints = typing.get_type_hints(tp)
        if part not in hints or part == "name":
            known = ", ".join(h for h in hints if h != "name")
            raise ConfigError(f"--set {dotted}: unknown key '{part}' (known keys here: {known})")
        tp = hints[part]


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)`` with the value parsed as YAML (so 3 is an int)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _apply_override(raw: dict, dotted: str, value: Any) -> dict:
    parts = dotted.split(".")
    node = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        node = {part: node}
    return _merge(raw, node)


class PipelineFile:
    """The parsed ``pipelines.yaml``: raw sections per pipeline, built on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"pipeline file '{self.path}' does not exist")
        try:
            doc = yaml.safe_load(self.path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{self.path}: not valid YAML{at}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("pipelines"), dict):
            raise ConfigError(f"{self.path}: expected a top-level 'pipelines:' mapping")
        unknown = set(doc) - {"pipelines"}
        if unknown:
            raise ConfigError(f"{self.path}: unknown top-level key '{sorted(unknown)[0]}' (only 'pipelines')")
        self._raw: dict[str, dict] = doc["pipelines"]
        for name, section in self._raw.items():
            # A pipeline's name is its folder in the runs folder, beside the runs folder's own '_data'.
            problem = name_problem(name) or ("it starts with '_' or '.'" if name.startswith(("_", ".")) else None)
            if problem is None and SEEDED_NAME.match(name):
                problem = "NAME@seed<k> means pipeline NAME with seed k"
            if problem is not None:
                raise ConfigError(f"{self.path}: pipeline name {name!r} cannot be a folder name ({problem})")
            if not isinstance(section, dict):
                raise ConfigError(f"{self.path}: pipeline '{name}' must be a mapping")

    @property
    def relative_to(self) -> Path:
        """The folder relative paths in the file are resolved against: the file's own, except for the copy
        installed inside the package, whose relative paths can only mean the working directory."""
        folder = self.path.resolve().parent
        return Path.cwd() if folder == SHIPPED_PIPELINES.parent.resolve() else folder

    @property
    def names(self) -> list[str]:
        return list(self._raw)

    def _resolved_raw(self, name: str, seen: tuple[str, ...] = ()) -> dict:
        if name not in self._raw:
            known = ", ".join(self._raw)
            raise ConfigError(f"unknown pipeline '{name}' in {self.path} (known: {known})")
        if name in seen:
            raise ConfigError(f"{self.path}: pipeline '{name}' extends itself through {' -> '.join(seen)}")
        raw = dict(self._raw[name])
        parent = raw.pop("extends", None)
        if parent is None:
            return raw
        if not isinstance(parent, str):
            raise ConfigError(f"{self.path}: '{name}.extends' must be a pipeline name")
        base = self._resolved_raw(parent, seen + (name,))
        base.pop("description", None)
        return _merge(base, raw)

    def environment_variables(self, name: str, dotted: str) -> list[str]:
        """The ``${VAR}`` names the raw (unexpanded) value of ``dotted`` reads, e.g. ``["RCNN_VOC07_MINI"]``."""
        node: Any = self._resolved_raw(split_seeded_name(name)[0])
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return [m[0] for m in _ENV.findall(node)] if isinstance(node, str) else []

    def origins(self, name: str, overrides: typing.Sequence[str] = ()) -> dict[str, str]:
        """Where each dotted key that is set comes from: ``--set``, ``pipeline`` or ``parent NAME``.

        Keys absent from the result keep their defaults.
        """
        base, seed = split_seeded_name(name)
        if seed is not None:
            return {**self.origins(base, overrides), **dict.fromkeys(SEED_KEYS, f"name @seed{seed}")}
        chain, current = [], name
        while current is not None:
            chain.append(current)
            current = self._raw[current].get("extends") if current in self._raw else None
        out: dict[str, str] = {}
        for k, section in enumerate(reversed(chain)):  # the farthest ancestor first, so nearer ones win
            origin = "pipeline" if k == len(chain) - 1 else f"parent {section}"
            raw = {key: v for key, v in self._raw[section].items() if key != "extends"}
            if section != name:
                raw.pop("description", None)
            out.update(dict.fromkeys(_dotted_keys(raw), origin))
        for text in overrides:
            key, value = parse_override(text)
            if not isinstance(value, dict):  # a mapping merges into the section; anything else replaces it whole
                out = {k: v for k, v in out.items() if k != key and not k.startswith(key + ".")}
            out.update(dict.fromkeys(_dotted_keys({key: value}), "--set"))
        return out

    def load(self, name: str, overrides: typing.Sequence[str] = ()) -> PipelineConfig:
        """Build pipeline ``name`` with ``--set`` style overrides applied, fully validated.

        ``NAME@seed<k>`` builds NAME with :data:`SEED_KEYS` set to k, named ``NAME@seed<k>``.
        """
        base, seed = split_seeded_name(name)
        if seed is not None:
            for text in overrides:
                key = parse_override(text)[0]
                if key in SEED_KEYS:
                    raise ConfigError(f"--set {key}: pipeline '{name}' has seed {seed} by its name; run '{base}' to set it")
            cfg = self.load(base, [*overrides, *(f"{key}={seed}" for key in SEED_KEYS)])
            return dataclasses.replace(cfg, name=name)
        where = f"{self.path} (pipeline '{name}')"
        raw = self._resolved_raw(name)
        cfg = _build(PipelineConfig, {"name": name, **raw}, "", where, self.relative_to)
        if not overrides:
            _check_together(cfg, where)
            return cfg
        # Overrides are resolved against the working directory, as a user typing
        # a path on the command line expects; values from the file were already
        # resolved against the file's folder above.
        raw = dataclasses.asdict(cfg)
        for text in overrides:
            key, value = parse_override(text)
            _check_override_path(PipelineConfig, key)
            raw = _apply_override(raw, key, value)
        where = f"--set on pipeline '{name}'"
        cfg = _build(PipelineConfig, raw, "", where, Path.cwd())
        _check_together(cfg, where)
        return cfg


def fingerprint_params(section: Any) -> dict:
    """The fields of a config section that change a stage's output, as plain JSON values."""
    out = {}
    for f in dataclasses.fields(section):
        if not f.metadata.get("fingerprint", True):
            continue
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            value = fingerprint_params(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


# The pipelines shipped with the package (in a checkout, a link to the top-level pipelines.yaml).
SHIPPED_PIPELINES = Path(__file__).parent / "pipelines.yaml"


def default_pipelines_file() -> Path:
    """``$RCNN_PIPELINES``, else ``./pipelines.yaml``, else the one shipped with the package."""
    env = os.environ.get("RCNN_PIPELINES")
    if env:
        return Path(env)
    local = Path("pipelines.yaml")
    if local.is_file():
        return local
    return SHIPPED_PIPELINES
