"""The report's Markdown and its self-contained HTML (figures inlined), rendered from blocks of text, tables and figures."""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass
from pathlib import Path

_NUMERIC = re.compile(r"^[-+]?\d")


@dataclass(frozen=True)
class Table:
    """A table block: header cells and rows of cells (text), numeric columns right-aligned."""

    headers: list[str]
    rows: list[list[str]]

    def numeric(self) -> list[bool]:
        """Per column: whether it holds numbers (right-aligned)."""
        cells = list(zip(*self.rows)) if self.rows else [()] * len(self.headers)
        return [
            i > 0 and all(_NUMERIC.match(c.strip("*")) or c in ("", "-", "n/a", "baseline", "about the same") for c in col)
            for i, col in enumerate(cells)
        ]


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def markdown(blocks: list, figures: dict[str, Path], out_dir: Path) -> str:
    out = []
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            out.append(f"{'#' * int(kind[1])} {args[0]}")
        elif kind == "p":
            out.append(args[0])
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in args[0]))
        elif kind == "table":
            t: Table = args[0]

            def row(cells):
                return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

            rule = "|" + "|".join("---:" if num else "---" for num in t.numeric()) + "|"
            out.append("\n".join([row(t.headers), rule] + [row(r) for r in t.rows]))
        elif kind == "figure":
            rel = figures[args[0]].relative_to(out_dir).as_posix()
            out.append(f"![{args[0]}]({rel})\n\n*{args[1]}*")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f2f2f2; text-align: left; } .num { text-align: right; }
tr:nth-child(even) td { background: #fafafa; }
code { font-size: 0.9em; background: #f4f4f4; padding: 0 0.2em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
"""


def _inline(text: str) -> str:
    """The little Markdown the report uses (``code``, **bold**, *italic*) as HTML."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", text)


def html_page(title: str, blocks: list, figures: dict[str, Path]) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
    ]
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{_inline(args[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(args[0])}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in args[0]) + "</ul>")
        elif kind == "table":
            t: Table = args[0]
            align = [' class="num"' if num else "" for num in t.numeric()]
            head = "".join(f"<th{a}>{_inline(h)}</th>" for h, a in zip(t.headers, align))
            body = "".join("<tr>" + "".join(f"<td{a}>{_inline(c)}</td>" for c, a in zip(r, align)) + "</tr>" for r in t.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "figure":
            data = base64.b64encode(figures[args[0]].read_bytes()).decode("ascii")
            img = f'<img src="data:image/png;base64,{data}" alt="{html.escape(args[1], quote=True)}">'
            out.append(f"<figure>{img}<figcaption>{_inline(args[1])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def human_size(n: float) -> str:
    """``n`` bytes in binary units, as the report and ``rcnn status`` write them: 43,072 is 42.1 KiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
