"""How a configuration field is declared: its default, its one-line doc, its range and how stages treat it."""

from __future__ import annotations

from dataclasses import dataclass, field

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
