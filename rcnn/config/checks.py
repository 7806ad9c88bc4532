"""The rules a configuration's values obey beyond their types: numbers finite and in their ranges, paths not
empty, and the rules between settings, checked once the whole configuration is built."""

from __future__ import annotations

import math
from typing import Any

from rcnn.config.fields import Range
from rcnn.config.schema import INPUT_SIZES, PipelineConfig
from rcnn.errors import ConfigError


def check_number(allowed: Range | None, value: Any, key: str, where: str) -> None:
    """Refuse a number (or a list's number) that is not finite or lies outside the field's range, naming the key,
    the value and the range. No setting means infinity (null is "no limit"), and NaN or inf in one would only
    surface, if at all, as a ruined run."""
    for v in value if isinstance(value, tuple) else (value,):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if not math.isfinite(v):
            raise ConfigError(f"{where}: '{key}' must be a finite number{f' {allowed}' if allowed else ''}; got {v!r}")
        if allowed is not None and v not in allowed:
            raise ConfigError(f"{where}: '{key}' must be {allowed}; got {v!r}")


def check_path(value: str, written: Any, key: str, where: str) -> None:
    """Refuse an empty path (``--set data.root=``), which would resolve to the folder it is relative to; ``written``
    is the value as given, to name the environment variable that left it empty."""
    if value.strip():
        return
    source = f" (from {written.strip()})" if isinstance(written, str) and "$" in written else ""
    raise ConfigError(f"{where}: '{key}' is an empty path{source}; give a path")


def check_together(cfg: PipelineConfig, where: str) -> None:
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
    if cfg.data.classes == ():  # every object would be refused as of no class, with advice that trains on nothing
        raise ConfigError(
            f"{where}: 'data.classes' is an empty list; give at least one class, or null for the classes of the "
            "trainval split's objects"
        )
    for key, value in (("spp.scales", cfg.spp.scales), ("spp.levels", cfg.spp.levels), ("fast.scales", cfg.fast.scales)):
        if not value:  # an image needs a size and a window a bin
            raise ConfigError(f"{where}: '{key}' is an empty list; give at least one")
    repeated = sorted({c for c in cfg.data.classes or () if cfg.data.classes.count(c) > 1})
    if repeated:
        raise ConfigError(f"{where}: 'data.classes' lists {', '.join(map(repr, repeated))} more than once")
    if cfg.data.root is None and cfg.data.synthetic is None:
        raise ConfigError(f"{where}: set 'data.root' (a VOC-layout folder) or 'data.synthetic' (data generated for it)")
    sizes = INPUT_SIZES[m.backbone]
    if m.input_size is not None and m.input_size not in sizes:
        raise ConfigError(f"{where}: 'model.input_size' must be {sizes} for backbone {m.backbone}; got {m.input_size}")
