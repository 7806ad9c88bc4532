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

# Field metadata: ``path`` marks values resolved relative to the YAML file;
# ``fingerprint=False`` marks values that do not change a stage's output (worker
# counts, progress), so changing them never makes a stage stale.
PATH = {"path": True}
NO_FINGERPRINT = {"fingerprint": False}


@dataclass(frozen=True)
class SyntheticConfig:
    """Synthetic shapes data, generated under the runs folder when missing."""

    images: int = 60
    seed: int = 0
    size: int = 256


@dataclass(frozen=True)
class DataConfig:
    """A VOC-layout dataset: a root folder and the names of its two splits."""

    root: str | None = field(default=None, metadata=PATH)
    trainval: str = "trainval"
    test: str = "test"
    # None: the sorted set of object names found in the trainval annotations.
    classes: tuple[str, ...] | None = None
    # Used when ``root`` is None: the data is generated under the runs folder.
    synthetic: SyntheticConfig | None = None
    # Train on objects marked difficult too (py-faster-rcnn's default: no). Scoring
    # always follows the VOC devkit, where difficult objects count neither way.
    use_difficult: bool = False


@dataclass(frozen=True)
class ProposalsConfig:
    """Selective search (Uijlings et al., IJCV 2013) as R-CNN ran it."""

    # fast: Uijlings' fast mode as used by R-CNN (HSV+Lab, k=50/100, two strategies).
    mode: Literal["fast", "opencv-fast", "opencv-quality", "single"] = "fast"
    # Resize to this width before the search (R-CNN's release used 500); None: as is.
    resize_width: int | None = None
    # Boxes narrower or shorter than this are dropped (Uijlings' demo: minBoxWidth 20).
    min_size: float = 20.0
    # Keep at most this many boxes, in the search's own ranking; None: all of them.
    max_proposals: int | None = None
    seed: int = 0
    # Worker processes; -1: all cores.
    n_jobs: int = field(default=-1, metadata=NO_FINGERPRINT)


@dataclass(frozen=True)
class ModelConfig:
    """The CNN: backbone, its initialisation and where it runs."""

    backbone: Literal["alexnet", "vgg16", "squeezenet1_0", "tiny"] = "alexnet"
    # imagenet (torchvision's weights API), scratch, a path to a state dict file, or
    # pipeline:NAME for the fine-tuned model of another pipeline in the same runs folder.
    weights: str = field(default="imagenet", metadata={"path": True, "keywords": ("imagenet", "scratch")})
    # Side of the warped region; None: the backbone's own (227 AlexNet as in R-CNN, 224 VGG16).
    input_size: int | None = None
    # Width of fc6/fc7 for backbones whose head is new (squeezenet1_0, tiny); None: default.
    fc_dim: int | None = None
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=NO_FINGERPRINT)


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning on warped regions (R-CNN section 2.3)."""

    context_pad: int = 16  # R-CNN appendix A: warp with p = 16 pixels of context
    fg_threshold: float = 0.5  # R-CNN: IoU >= 0.5 with a ground truth is that class
    bg_low: float = 0.0  # R-CNN: every other proposal is background (SPP-net: 0.1)
    batch_size: int = 128  # R-CNN: 128 regions per mini-batch ...
    fg_fraction: float = 0.25  # ... of which 32 foreground
    # Random horizontal flips: R-CNN's fine-tuning data layer mirrored crops; SPP-net's code fine-tunes on the
    # maps of the mirror images too (their maps are cached beside the others).
    mirror: bool = True
    # R-CNN: SGD. Adam is offered for small networks trained from scratch (the demo).
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.001  # R-CNN: 1/10 of the pre-training rate
    momentum: float = 0.9
    weight_decay: float = 0.0005
    max_iter: int = 40000
    step_size: int = 20000  # multiply lr by gamma every step_size iterations
    gamma: float = 0.1
    eval_every: int = 1000  # an "epoch": validate and checkpoint this often
    val_fraction: float = 0.1  # trainval images held out for validation accuracy
    seed: int = 0


@dataclass(frozen=True)
class FeaturesConfig:
    """Cached CNN features of every proposal and ground-truth box."""

    layers: tuple[str, ...] = ("pool5", "fc7")  # R-CNN: fc7 for SVMs, pool5 for box regression
    batch_size: int = field(default=256, metadata=NO_FINGERPRINT)


@dataclass(frozen=True)
class SVMConfig:
    """Per-class linear SVMs with hard-negative mining (R-CNN's released rcnn_train.m)."""

    layer: str = "fc7"
    C: float = 0.001
    pos_loss_weight: float = 2.0
    bias_mult: float = 10.0
    neg_overlap: float = 0.3  # R-CNN section 2.3: negatives below IoU 0.3
    neg_max_mutual_overlap: float | None = None  # SPP-net: 0.7 drops negatives overlapping another by > 70 %
    hard_threshold: float = -1.0001
    evict_threshold: float = -1.2
    retrain_limit: int = 2000
    target_norm: float = 20.0  # features scaled to mean norm 20
    n_jobs: int = field(default=-1, metadata=NO_FINGERPRINT)


@dataclass(frozen=True)
class BBoxConfig:
    """Class-specific ridge box regression from pool5 (R-CNN appendix C)."""

    layer: str = "pool5"
    min_overlap: float = 0.6
    ridge_lambda: float = 1000.0


@dataclass(frozen=True)
class EvaluateConfig:
    """Test-time detection and scoring."""

    nms_threshold: float = 0.3  # R-CNN: greedy NMS at IoU 0.3 per class
    max_per_image: int = 100  # detections kept per class and image
    metric: Literal["voc07", "voc10"] = "voc07"


@dataclass(frozen=True)
class SPPConfig:
    """SPP-net (He et al., ECCV 2014): conv maps once per image, windows pooled from them."""

    levels: tuple[int, ...] = (6, 3, 2, 1)  # SPP-net's 4-level pyramid for detection (50 bins)
    scales: tuple[int, ...] = (688,)  # shorter image side; SPP-net multi-scale: [480, 576, 688, 864, 1200]
    max_side: int | None = 2000  # cap on the longer side after resizing
    target_size: int = 224  # each window is pooled at the scale where its area is closest to 224 x 224
    # Not from the paper: fc6 starts afresh on a pyramid of arbitrary magnitude (SqueezeNet's: mean norm
    # ~17,000), so its input is scaled to this root-mean-square value, measured on training windows; null: unscaled.
    fc6_input_rms: float | None = 1.0
    # Where the window mapping puts conv cell j: on image pixel stride * j + offset. "trunk": the backbone's
    # own offset, worked out from its layers, as SPP-net's appendix says to add where layers are not padded
    # by floor(p/2) (tiny 3 px, AlexNet 15, VGG16 7.5, SqueezeNet 17); a number overrides it, 0 giving
    # the appendix's formula as printed, exact for the paper's padding.
    offset: float | Literal["trunk"] = "trunk"
    # Fine-tuning pools each training window at a scale drawn at random instead of the closest one (SPP-net's
    # released code: random_scale = 1 in spp_finetune_voc.m); validation and test keep the closest scale.
    random_scale: bool = False


@dataclass(frozen=True)
class PipelineConfig:
    """One named pipeline: everything a run needs, resolved."""

    name: str
    description: str = ""
    # rcnn: warp every region through the whole CNN; spp: conv maps once, pyramid-pool each window.
    method: Literal["rcnn", "spp"] = "rcnn"
    data: DataConfig = DataConfig()
    proposals: ProposalsConfig = ProposalsConfig()
    model: ModelConfig = ModelConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    features: FeaturesConfig = FeaturesConfig()
    svm: SVMConfig = SVMConfig()
    bbox: BBoxConfig = BBoxConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    spp: SPPConfig = SPPConfig()


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
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        raise ConfigError(f"{where}: {prefix or 'pipeline'}: {e}") from None


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
            if not isinstance(section, dict):
                raise ConfigError(f"{self.path}: pipeline '{name}' must be a mapping")

    @property
    def relative_to(self) -> Path:
        """The folder relative paths in the file are resolved against: the file's own, except for the copy
        installed inside the package, whose relative paths can only mean the working directory."""
        folder = self.path.resolve().parent
        return Path.cwd() if folder == SHIPPED_PIPELINES.resolve().parent else folder

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

    def load(self, name: str, overrides: typing.Sequence[str] = ()) -> PipelineConfig:
        """Build pipeline ``name`` with ``--set`` style overrides applied, fully validated."""
        where = f"{self.path} (pipeline '{name}')"
        raw = self._resolved_raw(name)
        cfg = _build(PipelineConfig, {"name": name, **raw}, "", where, self.relative_to)
        if not overrides:
            return cfg
        # Overrides are resolved against the working directory, as a user typing
        # a path on the command line expects; values from the file were already
        # resolved against the file's folder above.
        raw = dataclasses.asdict(cfg)
        for text in overrides:
            key, value = parse_override(text)
            _check_override_path(PipelineConfig, key)
            raw = _apply_override(raw, key, value)
        return _build(PipelineConfig, raw, "", f"--set on pipeline '{name}'", Path.cwd())


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
