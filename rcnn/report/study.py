"""The ``rcnn compare`` study: two or more finished runs side by side, as Markdown and self-contained HTML.

The runs come from :func:`rcnn.report.runs.load_run`; the PNGs from :mod:`rcnn.report.figures`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rcnn.report import figures as figs
from rcnn.report import seeds as report_seeds
from rcnn.report.render import Table, html_page, human_size, markdown, write_text
from rcnn.report.runs import MAX_PR_CLASSES, RunSummary, number, resumed_note

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


def _fmt(value, spec: str = ".4f", none: str = "n/a") -> str:
    v = number(value)
    return none if v is None else format(v, spec)


def _ratio(baseline: float | None, value: float | None, faster: str = "faster", slower: str = "slower") -> str | None:
    """``"24.3x faster"`` when ``value`` takes 24.3 times less than ``baseline``."""
    if not baseline or not value:
        return None
    r = baseline / value
    return f"{r:.1f}x {faster}" if r >= 1 else f"{1 / r:.1f}x {slower}"


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
        proposals = run.complete("proposals", run.test_split)
        if proposals is not None and proposals.data.get("skipped"):  # the count is of the images kept
            test_images += f" ({len(proposals.data['skipped'])} left out by --skip-bad)"
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
        like = res.get("metric") == base.get("metric") and run.test_data == s.runs[0].test_data  # else no difference
        for key in ("mAP", "mAP_bbox"):
            a, b = number(res.get(key)), number(base.get(key))
            diffs.append("baseline" if run is s.runs[0] else "n/a" if a is None or b is None or not like else f"{a - b:+.4f}")
        rows.append([label, str(res.get("metric", "n/a")), _fmt(res.get("mAP")), diffs[0], _fmt(res.get("mAP_bbox")), diffs[1]])
    headers = ["run", "metric", "mAP", f"Δ vs {s.baseline}", "mAP +bbox", f"Δ vs {s.baseline}"]
    blocks.append(("table", Table(headers, rows)))
    if len({(run.results or {}).get("metric") for run in s.runs if run.results}) > 1:
        blocks.append(("p", "**The runs use different AP metrics (voc07 / voc10): their mAPs are not comparable.**"))
    if any(run.results is None for run in s.runs):
        blocks.append(("p", "Runs marked n/a have no evaluation results; see *What is missing*."))
    return blocks


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
    rows = [[c] + [_fmt(a[v].get(c)) for a in aps for v in ("plain", "bbox")] for c in [*classes, "mAP"]]
    rows[-1] = [f"**{cell}**" for cell in rows[-1]]
    metric = next((run.results["metric"] for run in s.runs if run.results and "metric" in run.results), "AP")
    path = figs.ap_bars(s.figure_dir / "ap_per_class.png", s.labels, classes, aps, metric)
    s.figures["ap_per_class"] = path
    caption = "AP per class and mAP, one bar per run: top without, bottom with box regression."
    return blocks + [("table", Table(headers, rows)), ("figure", "ap_per_class", caption)]


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


def _section_stages(s: _Study) -> list:
    rows = []
    for label, run in zip(s.labels, s.runs):
        own = shared = 0.0
        for u in run.units:
            m = u.metrics
            spi = number(m.get("seconds_per_image"))
            images_per_s = number(m.get("images_per_s")) or (1 / spi if spi else None)
            note = f"shared with {u.shared_with}" if u.shared_with else "" if u.state == "complete" else "**missing**"
            note = "; ".join(filter(None, [note, resumed_note(m)]))
            size = human_size(u.output_bytes) if u.state == "complete" else ""
            speeds = [_fmt(images_per_s, ".2f", ""), _fmt(m.get("boxes_per_s"), ".0f", "")]
            rows.append([label, u.stage, u.split, _fmt(u.wall_s, ".1f", ""), *speeds, size, note])
            if u.shared_with:
                shared += u.wall_s or 0.0
            else:
                own += u.wall_s or 0.0
        note = f"+ {shared:.1f} s in shared units" if shared else ""
        rows.append([label, "**total**", "", f"**{own:.1f}**", "", "", "", note])
    headers = ["run", "stage", "split", "wall s", "images/s", "boxes/s", "outputs", "note"]
    text = (
        "Wall time of every stage and split as recorded in its manifest. A unit *shared with* another pipeline reused "
        "that pipeline's outputs (same inputs and parameters); its time is the other pipeline's and is left out of the total."
    )
    return [("h2", "Stages: wall time and throughput"), ("p", text), ("table", Table(headers, rows))]


def _section_test_time(s: _Study) -> list:
    blocks: list = [("h2", "Test time per image")]
    times = [run.test_time() for run in s.runs]
    base = times[0]
    rows, sentences = [], []
    for label, t in zip(s.labels, times):
        stages = f" ({' + '.join(t.feature_stages)})" if t.features is not None else ""
        feat_ratio = _ratio(base.features, t.features) if t is not base else "baseline"
        total_ratio = _ratio(base.total, t.total) if t is not base else "baseline"
        again = _fmt(t.pooled_again) if t.pooled_again is not None else "-"
        seconds = [_fmt(t.proposals), _fmt(t.features) + stages, _fmt(t.caching), again, _fmt(t.classification), _fmt(t.total)]
        rows.append([label, *seconds, feat_ratio or "n/a", total_ratio or "n/a"])
        if t is not base:
            if feat_ratio:
                sentences.append(f"{label} features {feat_ratio} than {s.baseline}.")
            if total_ratio:
                sentences.append(f"{label} in total {total_ratio} than {s.baseline}.")
    headers = [
        "run",
        "proposals s",
        "features s",
        "caching s",
        "computed again s",
        "classification s",
        "total s",
        "features vs baseline",
        "total vs baseline",
    ]
    text = (
        "Seconds per test image: proposals (one worker), features (every feature stage on the test split: image "
        "decoding, warping or the conv trunk, pooling and fc layers, as a detector computes them, including what box "
        "regression reads), and classification (SVM scoring, box regression and NMS). Caching is what the feature "
        "stages spent on top writing their features to disk. Computed again is what box regression reads and the "
        "pipeline does not cache, so computes a second time while evaluating: SPP-net's pyramid, pooled again from "
        "the conv maps, or R-CNN's pool5 under features.bbox_rows: regression, the test boxes warped through the "
        "network again; a detector keeps what it computed for the SVMs' features. A detector pays neither, so "
        "neither is in the total."
    )
    blocks += [("p", text), ("table", Table(headers, rows))]
    if sentences:
        blocks.append(("list", sentences))
    if any(t.total is None for t in times):
        blocks.append(("p", "n/a: the run's manifests do not record that part; see *What is missing*."))
    if any(v is not None for t in times for v in t.as_dict().values()):
        s.figures["test_time"] = figs.time_bars(s.figure_dir / "test_time.png", s.labels, [t.as_dict() for t in times])
        blocks.append(("figure", "test_time", "Test seconds per image, split into proposals, features and classification."))
    return blocks


def _section_cache(s: _Study) -> list:
    caches = [run.feature_cache() for run in s.runs]
    base, base_units, base_missing = caches[0]
    rows, sentences = [], []
    for r, (label, (size, units, missing)) in enumerate(zip(s.labels, caches)):
        stages = ", ".join(f"{u.stage}/{u.split}" for u in units) or "none"
        if missing:
            stages += "; missing: " + ", ".join(f"{u.stage}/{u.split}" for u in missing)
        ratio = f"{size / base:.3f}x" if base and units else "n/a"
        rows.append([label, stages, (human_size(size) if units else "n/a") + (" (incomplete)" if missing else ""), ratio])
        if r > 0 and units and base_units and not missing and not base_missing:
            sentences.append(f"{label}'s feature cache is {_ratio(base, size, 'smaller', 'larger')} than {s.baseline}'s.")
    text = "Bytes on disk of the feature-caching stages' outputs (every split), from the manifests."
    blocks: list = [("h2", "Feature cache on disk"), ("p", text)]
    blocks.append(("table", Table(["run", "units", "size", f"size / {s.baseline}"], rows)))
    return blocks + ([("list", sentences)] if sentences else [])


def _section_grid(s: _Study, grid_images: int) -> list:
    blocks: list = [("h2", "Detections on test images")]
    grid = figs.grid_contents(s.data, grid_images) if grid_images > 0 else None
    if grid is None:
        return blocks + [("p", "No grid: it needs detection files and readable test data; see *What is missing*.")]
    images, top = grid
    s.figures["detections"] = figs.detection_grid(s.figure_dir / "detections.png", s.labels, images, top, _all_classes(s))
    caption = (
        f"The first {len(images)} test images with objects; each run's top detections (box-regressed, the best "
        "objects + 2 per image over all classes, labelled with class and SVM score, 0 being the SVM's boundary); "
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
    for section in (*ap_sections, _section_pr, _section_stages, _section_test_time, _section_cache):
        blocks += section(s)
    blocks += _section_grid(s, grid_images)
    blocks += _section_missing(s)
    paths = {"markdown": out_dir / "report.md", "html": out_dir / "report.html"}
    write_text(paths["markdown"], markdown(blocks, s.figures, out_dir))
    write_text(paths["html"], html_page(title, blocks, s.figures))
    return {**paths, **s.figures}
