"""Configurations for people to read: a pipeline's resolved settings with their origins (``rcnn config``),
and the reference of every setting, its default, range and source (docs/pipelines.md)."""

from __future__ import annotations

import dataclasses

import yaml

from rcnn.config import PipelineConfig


def _scalar(value) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True).removesuffix("\n...\n").strip()


def render_config(cfg: PipelineConfig, origins: dict[str, str]) -> str:
    """``cfg`` as YAML, each value followed by where it came from (``origins``; a key missing there: default)."""
    lines: list[tuple[str, str]] = []

    def walk(section, prefix: str, indent: str) -> None:
        for f in dataclasses.fields(section):
            value, key = getattr(section, f.name), f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                lines.append((f"{indent}{f.name}:", ""))
                walk(value, key + ".", indent + "  ")
            elif key != "name":
                lines.append((f"{indent}{f.name}: {_scalar(value)}", origins.get(key, "default")))

    walk(cfg, "", "")
    width = min(40, max(len(text) for text, origin in lines if origin))
    return "\n".join(f"{text:<{width}}  # {origin}" if origin else text for text, origin in lines)


def _type_text(tp) -> str:
    import typing

    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    names = {int: "integer", float: "number", str: "string", bool: "true/false", type(None): "null"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is tuple:
        return f"list of {_type_text(args[0])}"
    if args:
        return " or ".join(_type_text(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def render_reference() -> str:
    """docs/pipelines.md: every setting with its type, default, range and what it is, from the dataclasses."""
    import typing

    out = [
        "# Pipeline settings",
        "",
        "Generated from `rcnn/config/schema.py` by `python -m rcnn.config.view docs/pipelines.md`; a test checks that it",
        "matches the code. A pipeline in `pipelines.yaml` sets any of these under its section; `--set section.key=value`",
        "overrides one on the command line; `rcnn config PIPELINE` prints what a pipeline resolves to and where each",
        "value comes from. A number outside its range or not finite (`.inf`, `1e400`, `.nan`), and an empty path, are",
        "refused when the configuration loads (exit status 2). Values are read as YAML 1.2 reads them: `1e-4` is a",
        "number, and only `true` and `false` (or `True`, `FALSE`, ...) are booleans: `yes`, `no`, `on` and `off` are",
        "strings. A key given twice in one mapping is refused, naming it and its lines.",
        "Settings marked *not in the fingerprint* change how fast a stage runs, never what it computes, so",
        "changing them leaves finished stages up to date.",
        "",
        "Sources: R-CNN: Girshick, Donahue, Darrell, Malik, *Rich feature hierarchies for accurate object detection",
        "and semantic segmentation*, CVPR 2014, and its released code; SPP-net: He, Zhang, Ren, Sun, *Spatial Pyramid",
        "Pooling in Deep Convolutional Networks for Visual Recognition*, ECCV 2014, and its released code; selective",
        "search: Uijlings, van de Sande, Gevers, Smeulders, IJCV 2013.",
        "",
        "Rules between settings: `finetune.bg_low` < `finetune.fg_threshold`; `svm.evict_threshold` <",
        "`svm.hard_threshold`; `data.classes` null or at least one class, none twice; `model.input_size` within what",
        "the backbone accepts:",
        "",
    ]
    from rcnn.config import INPUT_SIZES

    out += [f"- `{name}`: {allowed}" for name, allowed in INPUT_SIZES.items()]
    out.append("")

    def section(cls, prefix: str, title: str) -> None:
        hints = typing.get_type_hints(cls)
        rows, nested = [], []
        for f in dataclasses.fields(cls):
            if f.name == "name":
                continue
            inner = next((a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)), None)
            if inner is not None:
                nested.append((inner, f"{prefix}{f.name}", f.metadata.get("doc", "")))
                if f.default is None:
                    rows.append((f.name, "null or a mapping", "null", "", f.metadata["doc"] + f" (see `{prefix}{f.name}`)"))
                continue
            allowed = f.metadata.get("range")
            note = "" if f.metadata.get("fingerprint", True) else ". *Not in the fingerprint.*"
            note += (
                ". A relative path is from the folder of the pipelines file that sets it (the working directory "
                "for the file installed with the package)"
                if f.metadata.get("path")
                else ""
            )
            rows.append(
                (f.name, _type_text(hints[f.name]), _scalar(f.default), str(allowed) if allowed else "", f.metadata["doc"] + note)
            )
        if rows:
            out.extend([f"## {title}", ""])
            doc = (cls.__doc__ or "").strip().splitlines()[0]
            out.extend([doc, "", "| key | type | default | range | what it is |", "|---|---|---|---|---|"])
            for name, tp, default, allowed, doc in rows:
                out.append(f"| `{name}` | {tp} | `{default}` | {allowed} | {doc.replace('|', '/')} |")
            out.append("")
        for inner, key, _ in nested:
            section(inner, key + ".", f"`{key}`")

    section(PipelineConfig, "", "Top level")
    return "\n".join(out)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    Path(sys.argv[1]).write_text(render_reference())
