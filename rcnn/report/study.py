"""The ``rcnn compare`` study: two or more finished runs side by side, as Markdown and self-contained HTML.

The runs come from :func:`rcnn.report.runs.load_run`; the PNGs from :mod:`rcnn.report.figures`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rcnn.report import figures as figs
from rcnn.report import seeds as report_seeds
from rcnn.report.false_positives import section_false_positives
from rcnn.report.localisation import section_coco
from rcnn.report.render import Table, html_page, markdown, write_text
from rcnn.report.runs import MAX_PR_CLASSES, RunSummary, fmt, number
from rcnn.report.speed import section_cache, section_stages, section_test_time

# ---------------------------------------------------------------------------------------
# The report: a list of blocks, rendered once as Markdown and once as HTML.


class _Study:
    """The runs being compared, their labels, and the figures written so far."""

    def __init__(self, runs: list[RunSummary], figure_dir: Path, seed_runs: list[list[RunSummary]] | None = None):
        self.runs = runs
        self.left_out: list[str] = []  # seed runs not pooled with their group's, each with why
        # per run, its seed runs (``runs`` holds the first of each)
        self.seed_runs = [report_seeds.poolable(group, self.left_out) for group in seed_runs] if seed_runs else seed_runs
        self.labels = _unique_labels(runs)
        self.figure_dir = figure_dir
        self.figures: dict[str, Path] = {}
        self.data = figs.TestData(runs, self.labels)

    @property
    def baseline(self) -> str:
        return self.labels[0]


def _unique_labels(runs: list[RunSummary]) -> list[str]:
    seen: Counter[str] = Counter()
    labels = []
    for run in runs:
        seen[run.label] += 1
        labels.append(run.label if seen[run.label] == 1 else f"{run.label} #{seen[run.label]}")
    return labels


def _section_compared(s: _Study) -> list:
    runs = s.runs
    names = ", ".join(f"`{run.name}`" for run in runs)
    if s.seed_runs:
        names = "; ".join(f"{label}: " + ", ".join(f"`{r.name}`" for r in g) for label, g in zip(s.labels, s.seed_runs))
        names = f"each over seeds, {names}; the table shows the first seed run"
    compared = f"Compared {len(runs)} {'run' if len(runs) == 1 else 'runs'} ({names})"
    metrics = "metric voc07: VOC2007's 11-point interpolated AP; voc10: the area under the precision envelope"
    blocks: list = [
        (
            "p",
            f"{compared}; differences and ratios are against the first, **{s.baseline}**. A detection is correct "
            f"where it overlaps an object not yet matched by IoU ≥ 0.5, as in the VOC devkit ({metrics}).",
        )
    ]
    rows = []
    for label, run in zip(s.labels, runs):
        devices: dict[str, list[str]] = {}
        for u in run.units:
            if isinstance(u.metrics.get("device"), str):
                devices.setdefault(u.metrics["device"], []).append(u.stage)
        device = "; ".join(f"{d} ({', '.join(dict.fromkeys(st))})" for d, st in devices.items()) or "n/a"
        metric = (run.results or {}).get("metric", "n/a")
        root = f"`{run.data_root}`" if run.data_root else "n/a"
        test_images = str(run.test_images) if run.test_images is not None else "n/a"
        tested = run.complete("evaluate", run.test_split) or run.complete("proposals", run.test_split)
        if tested is not None and tested.data.get("skipped"):  # the count is of the images kept
            test_images += f" ({len(tested.data['skipped'])} left out by --skip-bad)"
        rows.append(
            [label, f"`{run.run_dir}`", root, run.test_split or "n/a", test_images, str(len(run.classes)), metric, device]
        )
    blocks.append(
        ("table", Table(["run", "folder", "data root", "test split", "test images", "classes", "metric", "devices"], rows))
    )
    if len({run.test_data for run in runs}) > 1:
        blocks.append(("p", "**The runs were tested on different data or splits: their numbers are not like for like.**"))
    blocks += _provenance(s)
    versions: dict[str, list[str]] = {}
    for r, run in enumerate(runs):
        for u in run.units:
            for lib, v in u.libraries.items():
                versions.setdefault(lib, [[] for _ in runs])[r].append(str(v))
    if versions:
        rows = [[lib, *(" / ".join(sorted(set(v))) or "n/a" for v in per_run)] for lib, per_run in sorted(versions.items())]
        blocks += [("p", "Library versions recorded in the manifests:"), ("table", Table(["library", *s.labels], rows))]
    return blocks + _settings(s)


def _provenance(s: _Study) -> list:
    """When, where and with which code each run's test-split timings were taken, and a warning where the machines
    differ: the speed ratios further down would compare the machines as well as the methods."""
    rows = [[label, *run.provenance()] for label, run in zip(s.labels, s.runs)]
    blocks = [("table", Table(["run", "rcnn version, last stage's code digest", "test split first timed", "machine"], rows))]
    if len({row[3] for row in rows} - {"n/a"}) > 1:
        blocks.append(("p", "**The runs were timed on different machines: the speed ratios compare the machines too.**"))
    return blocks


def _settings(s: _Study) -> list:
    """The stages' settings that differ between the runs, as their manifests recorded them."""
    per_run: list[dict[str, str]] = []
    for run in s.runs:
        flat: dict[str, str] = {}
        # a stage's settings are the same for every split: its first complete unit has them
        first = {u.stage: u for u in reversed(run.units) if u.state == "complete"}
        for stage, u in first.items():
            flat.update((f"{stage}: {key}", text) for key, text in _flatten(u.params).items())
        per_run.append(flat)
    # in pipeline order: that of the run with the most stages, then any others'
    runs = sorted(s.runs, key=lambda run: -len(run.units))
    stage_order = list(dict.fromkeys(u.stage for run in runs for u in run.units))
    keys = sorted(dict.fromkeys(k for flat in per_run for k in flat), key=lambda k: (stage_order.index(k.split(":")[0]), k))
    rows = [[f"`{k}`", *(flat.get(k, "-") for flat in per_run)] for k in keys if len({flat.get(k) for flat in per_run}) > 1]
    if not rows:
        return [("p", "Every setting the stages recorded is the same in all runs.")]
    intro = "Settings that differ between the runs, as each stage recorded them (- where a run has no such stage or setting):"
    return [("p", intro), ("table", Table(["stage: setting", *s.labels], rows))]


def _flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as ``{"section.key": text}``."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = _setting_text(value)
    return out


def _setting_text(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_setting_text(v) for v in value) + "]"
    return str(value)


def _section_map(s: _Study) -> list:
    blocks: list = [("h2", "Mean average precision")]
    base = s.runs[0].results or {}
    rows = []
    for label, run in zip(s.labels, s.runs):
        res = run.results
        if res is None:
            rows.append([label, "n/a", "n/a", "", "n/a", ""])
            continue
        diffs = []
        like = _scored_alike(run, s.runs[0]) and run.scored_classes == s.runs[0].scored_classes  # else no difference
        for key in ("mAP", "mAP_bbox"):
            a, b = number(res.get(key)), number(base.get(key))
            diffs.append("baseline" if run is s.runs[0] else "n/a" if a is None or b is None or not like else f"{a - b:+.4f}")
        rows.append([label, str(res.get("metric", "n/a")), fmt(res.get("mAP")), diffs[0], fmt(res.get("mAP_bbox")), diffs[1]])
    headers = ["run", "metric", "mAP", f"Δ vs {s.baseline}", "mAP +bbox", f"Δ vs {s.baseline}"]
    blocks.append(("table", Table(headers, rows)))
    if len({(run.results or {}).get("metric") for run in s.runs if run.results}) > 1:
        blocks.append(("p", "**The runs use different AP metrics (voc07 / voc10): their mAPs are not comparable.**"))
    blocks += _class_difference(s.labels, s.runs)
    if any(run.results is None for run in s.runs):
        blocks.append(("p", "Runs marked n/a have no evaluation results; see *What is missing*."))
    return blocks


def _scored_alike(run: RunSummary, base: RunSummary) -> bool:
    """Whether two runs were scored with the same metric on the same test data (their class lists aside)."""
    return (run.results or {}).get("metric") == (base.results or {}).get("metric") and run.test_data == base.test_data


def _names(classes: frozenset[str], most: int = 6) -> str:
    names = sorted(classes)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _class_difference(labels: list[str], runs: list[RunSummary], per_class: bool = True) -> list:
    """A bold sentence where a run's mAP averages other classes than the baseline's (``data.classes``, or
    ``data.other_classes: ignore`` on a subset): its mAP then differs by the classes as well as the method.
    ``per_class``: the report gives the AP differences on the classes both scored."""
    base = runs[0].scored_classes
    differ, tabled = [], False
    for label, run in zip(labels[1:], runs[1:]):
        own = run.scored_classes
        if base is None or own is None or own == base:
            continue
        tabled = tabled or _scored_alike(run, runs[0])  # else no table of per-class differences follows
        how = [f"without {_names(base - own)}" if base - own else "", f"with {_names(own - base)}" if own - base else ""]
        differ.append(f"{label}'s over {len(own)} ({', '.join(filter(None, how))})")
    if not differ:
        return []
    return [
        (
            "p",
            f"**The mAPs average different classes, {labels[0]}'s over {len(base)}, {'; '.join(differ)}: they are not "
            "like for like, so no difference is given"
            + ("; the per-class differences below cover the classes both scored.**" if per_class and tabled else ".**"),
        )
    ]


def _shared_class_deltas(s: _Study, aps: list[dict]) -> list:
    """Where a run scored other classes than the baseline (with its metric, on its test data): its AP minus the
    baseline's on each class both scored, and the mean of those differences."""
    base = s.runs[0]
    scored = [run.scored_classes or frozenset() for run in s.runs]
    cols = [
        k for k in range(1, len(s.runs)) if scored[0] and scored[k] and scored[k] != scored[0] and _scored_alike(s.runs[k], base)
    ]
    classes = [c for c in _all_classes(s) if c in scored[0] and any(c in scored[k] for k in cols)]
    if not cols or not classes:
        return []
    headers, rows = ["class"], [[c] for c in classes] + [["**mean over the classes both scored**"]]
    for k in cols:
        for v, suffix in (("plain", ""), ("bbox", " +bbox")):
            headers.append(f"Δ {s.labels[k]}{suffix}")
            pairs = {c: (number(aps[k][v].get(c)), number(aps[0][v].get(c))) for c in classes if c in scored[k]}
            diffs = {c: None if None in ab else ab[0] - ab[1] for c, ab in pairs.items()}
            for row, c in zip(rows, classes):
                row.append(fmt(diffs[c], "+.4f") if c in diffs else "-")
            known = [d for d in diffs.values() if d is not None]
            rows[-1].append(f"**{sum(known) / len(known):+.4f}**" if known else "n/a")
    text = (
        f"AP differences against {s.baseline} on the classes both runs scored (-: a class the run did not score; "
        "n/a: either run has no AP for it, having no test object of it)."
    )
    return [("p", text), ("table", Table(headers, rows))]


def _all_classes(s: _Study) -> list[str]:
    return list(dict.fromkeys(c for run in s.runs for c in (run.classes or (run.results or {}).get("per_class", {}))))


def _section_per_class(s: _Study) -> list:
    blocks: list = [("h2", "Average precision per class")]
    classes = _all_classes(s)
    if not classes or not any(run.results for run in s.runs):
        return blocks + [("p", "No run has evaluation results.")]
    aps = []
    for run in s.runs:
        res = run.results or {}
        aps.append(
            {
                "plain": {**res.get("per_class", {}), "mAP": res.get("mAP")},
                "bbox": {**res.get("per_class_bbox", {}), "mAP": res.get("mAP_bbox")},
            }
        )
    headers = ["class"] + [h for label in s.labels for h in (label, f"{label} +bbox")]
    scored = [run.scored_classes if run.results else None for run in s.runs]  # "-": a class the run did not score

    def cell(c: str, k: int, variant: str) -> str:
        return "-" if c != "mAP" and scored[k] is not None and c not in scored[k] else fmt(aps[k][variant].get(c))

    rows = [[c] + [cell(c, k, v) for k in range(len(aps)) for v in ("plain", "bbox")] for c in [*classes, "mAP"]]
    rows[-1] = [f"**{cell}**" for cell in rows[-1]]
    metric = next((run.results["metric"] for run in s.runs if run.results and "metric" in run.results), "AP")
    path = figs.ap_bars(s.figure_dir / "ap_per_class.png", s.labels, classes, aps, metric)
    s.figures["ap_per_class"] = path
    caption = "AP per class and mAP, one bar per run: top without, bottom with box regression."
    if any(own is not None and c not in own for own in scored for c in classes):
        blocks.append(("p", "-: a class the run did not score (not in its class list)."))
    blocks += [("table", Table(headers, rows)), ("figure", "ap_per_class", caption)]
    return blocks + _shared_class_deltas(s, aps)


def _section_map_seeds(s: _Study) -> list:
    table, each = report_seeds.map_tables(s.labels, s.seed_runs, _all_classes(s))
    text = (
        "Each run is a pipeline run once per seed (finetune.seed and model.seed; proposals and anything else no seed "
        "touches shared). mAP is the mean ± sample standard deviation (divisor n - 1) over its n seed runs with "
        "results, with the lowest and highest; the differences compare means. Every seed run's own mAP follows."
    )
    trunks = [f"{label}'s on `{w}`" for label, group in zip(s.labels, s.seed_runs) if (w := group[0].fixed_trunk)]
    if trunks:
        text += (
            " Seed runs that fine-tune on another pipeline's network all share that one network ("
            + "; ".join(trunks)
            + "): their spread leaves out its training, which the other runs' spread includes."
        )
    first = ", ".join(f"{label}: `{group[0].name}`" for label, group in zip(s.labels, s.seed_runs))
    later = f"The settings, curves, times, cache and detections further down are each run's first seed run ({first})."
    blocks = [("h2", "Mean average precision over seeds"), ("p", text), ("table", Table(*table))]
    if s.left_out:
        blocks.append(("p", f"**Left out of the means, as not like for like with their group: {'; '.join(s.left_out)}.**"))
    if len({(r.results or {}).get("metric") for group in s.seed_runs for r in group if r.results}) > 1:
        blocks.append(("p", "**The runs use different AP metrics (voc07 / voc10): their mAPs are not comparable.**"))
    firsts = [next((r for r in group if r.results), group[0]) for group in s.seed_runs]
    blocks += _class_difference(s.labels, firsts, per_class=False)
    return blocks + [("table", Table(*each)), ("p", later)]


def _section_per_class_seeds(s: _Study) -> list:
    blocks: list = [("h2", "Average precision per class over seeds")]
    classes = _all_classes(s)
    if not classes or not any(r.results for group in s.seed_runs for r in group):
        return blocks + [("p", "No run has evaluation results.")]
    headers, rows, means, errors = report_seeds.per_class_table(s.labels, s.seed_runs, classes)
    metric = next((r.results["metric"] for g in s.seed_runs for r in g if r.results and "metric" in r.results), "AP")
    s.figures["ap_per_class"] = figs.ap_bars(s.figure_dir / "ap_per_class.png", s.labels, classes, means, metric, errors)
    text = "Mean ± sample standard deviation over each run's seed runs; n/a: a class some seed run did not score."
    caption = "Mean AP per class and mAP over the seeds, one bar per run, with one sample standard deviation either side."
    return blocks + [("p", text), ("table", Table(headers, rows)), ("figure", "ap_per_class", caption)]


def _section_pr(s: _Study) -> list:
    blocks: list = [("h2", "Precision-recall curves")]
    curves = figs.recompute_curves(s.data)
    if all(c is None for c in curves):
        return blocks + [("p", "No run has both detection files and readable test data; see *What is missing*.")]
    classes = _all_classes(s)
    if len(classes) > MAX_PR_CLASSES:
        blocks.append(("p", f"The first {MAX_PR_CLASSES} of {len(classes)} classes are shown."))
        classes = classes[:MAX_PR_CLASSES]
    s.figures["pr_curves"] = figs.pr_grid(s.figure_dir / "pr_curves.png", s.labels, classes, curves)
    absent = [label for label, c in zip(s.labels, curves) if c is None]
    if absent:
        blocks.append(("p", f"No curves for {', '.join(absent)} (see *What is missing*)."))
    caption = (
        "Precision against recall per class, recomputed from each run's box-regressed devkit files and the "
        "ground truth: the raw precision at each detection, not the envelope the AP interpolates (the AP in each "
        "legend is recomputed too, and should equal the +bbox column above)."
    )
    return blocks + [("figure", "pr_curves", caption)]


def _section_grid(s: _Study, grid_images: int) -> list:
    blocks: list = [("h2", "Detections on test images")]
    grid = figs.grid_contents(s.data, grid_images) if grid_images > 0 else None
    if grid is None:
        return blocks + [("p", "No grid: it needs detection files and readable test data; see *What is missing*.")]
    images, top = grid
    s.figures["detections"] = figs.detection_grid(s.figure_dir / "detections.png", s.labels, images, top, _all_classes(s))
    caption = (
        f"The first {len(images)} test images with objects; each run's top detections (box-regressed, the best "
        "objects + 2 per image over all classes, labelled with class and score: an SVM's, 0 being its boundary, or "
        "Fast R-CNN's softmax probability); "
        "ground truth dotted white."
    )
    return blocks + [("figure", "detections", caption)]


def _section_missing(s: _Study) -> list:
    if s.seed_runs:  # every seed run's, named as on stderr: the later seeds' mAP is in the tables too
        items = [f"{run.name}: {sentence}" for group in s.seed_runs for run in group for sentence in run.missing]
    else:
        items = [f"{label}: {sentence}" for label, run in zip(s.labels, s.runs) for sentence in run.missing]
    items += s.data.notes
    return [("h2", "What is missing"), ("list", items)] if items else []


def write_report(
    runs: list[RunSummary], out_dir: Path, grid_images: int = 6, seed_runs: list[list[RunSummary]] | None = None
) -> dict[str, Path]:
    """Write ``report.md``, a self-contained ``report.html`` and ``figures/*.png`` into ``out_dir``.

    The first run is the baseline. With ``seed_runs`` (per run, its runs with each seed; ``runs`` holds the
    first of each), mAP and per-class AP are the mean ± sample standard deviation over the seeds, and the
    other sections show each run's first seed run. Returns ``{"markdown", "html", <figure name>...: path}``.
    """
    if not runs:
        raise ValueError("write_report needs at least one run")
    out_dir = Path(out_dir)
    s = _Study(list(runs), out_dir / "figures", seed_runs)
    title = "Detector comparison: " + " vs ".join(s.labels) + (" (over seeds)" if seed_runs else "")
    blocks: list = [("h1", title), ("h2", "What was compared"), *_section_compared(s)]
    ap_sections = (_section_map_seeds, _section_per_class_seeds) if seed_runs else (_section_map, _section_per_class)
    for section in (*ap_sections, _section_pr):
        blocks += section(s)
    blocks += section_coco(s.labels, s.runs, s.data, s.seed_runs)
    blocks += section_false_positives(s.labels, s.runs, s.data, s.figure_dir, s.figures, first_seed=bool(seed_runs))
    blocks += section_stages(s.labels, s.runs)
    blocks += section_test_time(s.labels, s.runs, s.figure_dir, s.figures)
    blocks += section_cache(s.labels, s.runs)
    blocks += _section_grid(s, grid_images)
    blocks += _section_missing(s)
    paths = {"markdown": out_dir / "report.md", "html": out_dir / "report.html"}
    write_text(paths["markdown"], markdown(blocks, s.figures, out_dir))
    write_text(paths["html"], html_page(title, blocks, s.figures))
    return {**paths, **s.figures}
