"""One pipeline run with several seeds, summarised: each AP as the mean and sample standard deviation over
the seed runs, with their number and range. Used by ``rcnn run --seeds`` and ``rcnn compare --seeds``.

The spread is the sample standard deviation (divisor n - 1), the usual estimate of how much one seed's AP
varies; with n = 1 there is none, and the text says so rather than showing 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rcnn.config.seeds import split_seeded_name

VARIANTS = ("plain", "bbox")  # without and with box regression
_RESULT_KEYS = {"plain": ("per_class", "mAP"), "bbox": ("per_class_bbox", "mAP_bbox")}


@dataclass(frozen=True)
class Spread:
    """The values one AP took over ``n`` seed runs."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return math.fsum(self.values) / self.n

    @property
    def std(self) -> float | None:
        """Sample standard deviation (divisor n - 1); None for a single value."""
        if self.n < 2:
            return None
        m = self.mean
        return math.sqrt(math.fsum((v - m) ** 2 for v in self.values) / (self.n - 1))

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def text(self) -> str:
        """``"0.4123 ± 0.0123"``; ``"0.4123 (n = 1)"`` when there is no spread to show."""
        return f"{self.mean:.4f} (n = 1)" if self.std is None else f"{self.mean:.4f} ± {self.std:.4f}"

    def range_text(self) -> str:
        return f"{self.low:.4f}–{self.high:.4f}"


def spread(values: Sequence[float | None]) -> Spread | None:
    """The spread of ``values``; None when there are none, or one is missing or not finite (a class scored n/a)."""
    if not values or any(not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) for v in values):
        return None
    return Spread(tuple(float(v) for v in values))


def ap_spreads(results: Sequence[Mapping], classes: Sequence[str]) -> dict[str, dict[str, Spread | None]]:
    """Per variant (``plain``, ``bbox``), each class's AP and the mAP over the seed runs' ``results``.

    ``results`` are the evaluate stage's ``results.json`` of each seed run (``per_class``, ``mAP``,
    ``per_class_bbox``, ``mAP_bbox``).
    """
    out: dict[str, dict[str, Spread | None]] = {}
    for variant in VARIANTS:
        per_class_key, map_key = _RESULT_KEYS[variant]
        out[variant] = {c: spread([(r.get(per_class_key) or {}).get(c) for r in results]) for c in classes}
        out[variant]["mAP"] = spread([r.get(map_key) for r in results])
    return out


def seeds_table(classes: Sequence[str], seeds: Sequence[int], results: Sequence[Mapping]) -> str:
    """The AP table of ``rcnn run --seeds``: each seed's mAP, then every class as mean ± sample std."""
    spreads = ap_spreads(results, classes)
    n = len(results)
    metric = next((r["metric"] for r in results if r.get("metric")), None)
    what = f"{metric} AP, mean" if metric else "mean"
    lines = [f"  over {n} seed{'s' if n != 1 else ''} ({', '.join(map(str, seeds))}): {what} ± sample standard deviation (n - 1)"]
    lines.append(f"  {'seed':<16}{'mAP':>8}{'mAP bbox':>10}")
    for seed, r in zip(seeds, results):
        lines.append(f"  {seed:<16}{_cell(r.get('mAP')):>8}{_cell(r.get('mAP_bbox')):>10}")
    lines.append(f"  {'class':<16}{'AP':>18}{'AP bbox':>20}")
    for name in [*classes, "mAP"]:
        a, b = spreads["plain"][name], spreads["bbox"][name]
        lines.append(f"  {name:<16}{a.text() if a else 'n/a':>18}{b.text() if b else 'n/a':>20}")
    mAP = spreads["plain"]["mAP"]
    if mAP is not None and n > 1:
        lines.append(f"  range of mAP over the seeds: {mAP.range_text()}")
    return "\n".join(lines)


def _cell(value) -> str:
    s = spread([value])
    return "n/a" if s is None else f"{s.mean:.4f}"


# ----------------------------------------------------------------------------- rcnn compare --seeds


def _seed_label(name: str) -> str:
    seed = split_seeded_name(name)[1]
    return f"seed {seed}" if seed is not None else name


def _group_spreads(groups: Sequence[Sequence], classes: Sequence[str]) -> list[dict[str, dict[str, Spread | None]]]:
    return [ap_spreads([r.results for r in group if r.results], classes) for group in groups]


def map_tables(labels: Sequence[str], groups: Sequence[Sequence], classes: Sequence[str]) -> tuple[tuple, tuple]:
    """(headers, rows) of the mAP over each group of seed runs (:class:`rcnn.report.runs.RunSummary`), the
    first group the baseline, and (headers, rows) of every seed run's own mAP."""
    spreads = _group_spreads(groups, classes)
    scored = [next((r for r in group if r.results), None) for group in groups]
    rows = []
    for label, group, sp, first in zip(labels, groups, spreads, scored):
        cells = [label, ", ".join(_seed_label(r.name) for r in group), str(sum(1 for r in group if r.results))]
        # no difference between groups scored with different metrics, on different data or over different classes
        like = first is not None and scored[0] is not None and first.results.get("metric") == scored[0].results.get("metric")
        data = (first.test_data, scored[0].test_data) if like else (None, None)
        like = like and not (all(isinstance(d, str) for d in data) and data[0] != data[1])
        like = like and first.scored_classes == scored[0].scored_classes
        for variant in VARIANTS:
            this, base = sp[variant]["mAP"], spreads[0][variant]["mAP"]
            none = this is None or base is None or not like
            diff = "baseline" if sp is spreads[0] else "n/a" if none else f"{this.mean - base.mean:+.4f}"
            cells += [this.text() if this else "n/a", this.range_text() if this else "n/a", diff]
        rows.append(cells)
    headers = ["run", "seed runs", "n"]
    for name in ("mAP", "mAP +bbox"):
        headers += [f"{name} mean ± std", f"{name} min–max", f"Δ mean vs {labels[0]}"]
    each = [
        [
            label,
            _seed_label(r.name),
            f"`{r.run_dir}`",
            _cell((r.results or {}).get("mAP")),
            _cell((r.results or {}).get("mAP_bbox")),
        ]
        for label, group in zip(labels, groups)
        for r in group
    ]
    return (headers, rows), (["run", "seed", "folder", "mAP", "mAP +bbox"], each)


def per_class_table(labels: Sequence[str], groups: Sequence[Sequence], classes: Sequence[str]) -> tuple:
    """(headers, rows) of each class's AP as mean ± sample std per group of seed runs, the mAP row last and bold,
    and the means and standard deviations as :func:`rcnn.report.figures.ap_bars` draws them."""
    spreads = _group_spreads(groups, classes)
    headers = ["class"] + [h for label in labels for h in (label, f"{label} +bbox")]
    rows = [[c] + [sp[v][c].text() if sp[v][c] else "n/a" for sp in spreads for v in VARIANTS] for c in [*classes, "mAP"]]
    rows[-1] = [f"**{c}**" for c in rows[-1]]
    means = [{v: {c: x.mean if x else None for c, x in sp[v].items()} for v in VARIANTS} for sp in spreads]
    errors = [{v: {c: x.std if x else None for c, x in sp[v].items()} for v in VARIANTS} for sp in spreads]
    return headers, rows, means, errors


def poolable(group: Sequence, left_out: list[str]) -> list:
    """The seed runs (:class:`rcnn.report.runs.RunSummary`) scored like the group's first scored one, with its
    metric, on its test data and over its classes; each other one is named in ``left_out`` with why."""
    ref = next((r for r in group if r.results), None)
    kept = []
    for r in group:
        metric, ref_metric = (r.results or {}).get("metric"), (ref.results if ref else {}).get("metric")
        why = f"scored with {metric}, `{ref.name}` with {ref_metric}" if r.results and metric != ref_metric else None
        known = isinstance(r.test_data, str) and isinstance(ref.test_data, str)  # fingerprints both recorded
        if why is None and r.results and known and r.test_data != ref.test_data:
            why = f"tested on other data than `{ref.name}`"
        if why is None and r.results and r.scored_classes != ref.scored_classes:
            lacks = ", ".join(sorted(ref.scored_classes - r.scored_classes))
            adds = ", ".join(sorted(r.scored_classes - ref.scored_classes))
            how = "; ".join(filter(None, [lacks and f"without {lacks}", adds and f"with {adds}"]))
            why = f"its mAP averages other classes than `{ref.name}`'s ({how})"
        if why:
            left_out.append(f"`{r.name}` ({why})")
        else:
            kept.append(r)
    return kept
