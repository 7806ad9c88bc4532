"""The report's speed sections: each stage's wall and processor time, test time per image, the feature cache's
size, their ratios against the baseline, and whether the machine's load makes those ratios unfair.

Each time is one measurement, taken under whatever else the machine ran then; the manifests record the load
average beside it (:class:`rcnn.store.machine.Stopwatch`), and the report says when it differed between the runs.
"""

from __future__ import annotations

from pathlib import Path

from rcnn.report import figures as figs
from rcnn.report.render import Table, human_size
from rcnn.report.runs import LOAD_MIN_WALL_S, RunSummary, fmt, number, resumed_note

SAME_WITHIN = 0.05  # a ratio this close to 1 is said to be about the same: one measurement each is no finer


def ratio(baseline: float | None, value: float | None, faster: str = "faster", slower: str = "slower") -> str | None:
    """``"24.3x faster"`` when ``value`` takes 24.3 times less than ``baseline``; ``"about the same"`` when ``value``
    is within ±5% of ``baseline``; None where either is unknown or zero."""
    if not baseline or not value:
        return None
    if round(abs(value / baseline - 1), 9) <= SAME_WITHIN:  # 0.95 / 1 - 1 is -0.050000000000000044
        return "about the same"
    r = baseline / value
    return f"{r:.1f}x {faster}" if r >= 1 else f"{1 / r:.1f}x {slower}"


def _than(subject: str, how: str, baseline: str, same: str) -> str:
    """``"spp features 25.0x faster than rcnn."``, or ``same`` (``"about as fast as"``) within ±5%."""
    if how == "about the same":
        return f"{subject} {same} {baseline} (within ±{SAME_WITHIN:.0%})."
    return f"{subject} {how} than {baseline}."


def section_stages(labels: list[str], runs: list[RunSummary]) -> list:
    rows = []
    for label, run in zip(labels, runs):
        own = shared = 0.0
        for u in run.units:
            m = u.metrics
            spi = number(m.get("seconds_per_image"))
            images_per_s = number(m.get("images_per_s")) or (1 / spi if spi else None)
            note = f"shared with {u.shared_with}" if u.shared_with else "" if u.state == "complete" else "**missing**"
            note = "; ".join(filter(None, [note, resumed_note(m)]))
            size = human_size(u.output_bytes) if u.state == "complete" else ""
            speeds = [fmt(images_per_s, ".2f", ""), fmt(m.get("boxes_per_s"), ".0f", "")]
            times = [fmt(u.wall_s, ".1f", ""), fmt(u.cpu_s, ".1f", ""), fmt(u.load_1m, ".2f", "")]
            rows.append([label, u.stage, u.split, *times, *speeds, size, note])
            if u.shared_with:
                shared += u.wall_s or 0.0
            else:
                own += u.wall_s or 0.0
        note = f"+ {shared:.1f} s in shared units" if shared else ""
        rows.append([label, "**total**", "", f"**{own:.1f}**", "", "", "", "", "", note])
    headers = ["run", "stage", "split", "wall s", "CPU s", "load", "images/s", "boxes/s", "outputs", "note"]
    text = (
        "Wall time of every stage and split as recorded in its manifest. A unit *shared with* another pipeline reused "
        "that pipeline's outputs (same inputs and parameters); its time is the other pipeline's and is left out of the "
        "total. CPU s: the processor seconds of the stage's own process (more than the wall time where it kept several "
        "cores busy; the worker processes of proposals are not counted). Load: what else kept the machine busy, in "
        "cores: the mean number of processes running or waiting for a core over the stage, recovered from the 1-minute "
        "load average (an exponential average over about a minute) at its start and end, less the cores its own "
        "process kept busy (CPU s over wall s); for proposals it counts its workers too. Blank where the manifest does "
        f"not record them, or for a stage under {LOAD_MIN_WALL_S:.0f} s, too short for that average to tell."
    )
    return [("h2", "Stages: wall time and throughput"), ("p", text), ("table", Table(headers, rows))]


def load_warning(labels: list[str], runs: list[RunSummary]) -> list:
    """A sentence giving what else kept the machine busy while each run's test split was timed, and a bold warning
    where it reached half the machine's cores (at least one) or differed between the runs by as much: the ratios
    then measure the load as well as the methods. Nothing where no run recorded it."""
    loads = [run.test_load() for run in runs]
    if all(x is None for x in loads):
        return []
    known = [x for x in loads if x is not None and x[0] is not None]
    said, reasons = [], []
    for label, x in zip(labels, loads):
        if x is None or x[0] is None:
            short = f"not known (every such stage took under {LOAD_MIN_WALL_S:.0f} s)"
            said.append(f"{label}: {'not recorded' if x is None else short}")
            continue
        load, unit, cores = x
        said.append(f"{label}: {load:.2f} (in {unit}" + (f", on {cores} cores)" if cores else ")"))
        if load >= max(1.0, (cores or 1) / 2):
            of = f" of the machine's {cores}" if cores else ""
            reasons.append(f"other work kept about {load:.1f} cores{of} busy while {label}'s test split was timed")
    text = (
        "What else kept the machine busy while the test split was timed, in cores (the stages table's load), the "
        "highest over the test-split stages after the proposals: " + "; ".join(said) + "."
    )
    cores = max((x[2] or 1 for x in known), default=1)
    low, high = min((x[0] for x in known), default=0.0), max((x[0] for x in known), default=0.0)
    if len(known) > 1 and high - low >= max(1.0, cores / 2):
        reasons.append(f"what else ran differs between the runs ({low:.1f} against {high:.1f} cores)")
    blocks: list = [("p", text)]
    if reasons:
        warning = "; ".join(reasons)
        blocks.append(("p", f"**The speed ratios measure the machine's load too: {warning}. Time the runs on an idle machine.**"))
    return blocks


def section_test_time(labels: list[str], runs: list[RunSummary], figure_dir: Path, figures: dict[str, Path]) -> list:
    blocks: list = [("h2", "Test time per image")]
    times = [run.test_time() for run in runs]
    base, baseline = times[0], labels[0]
    rows, sentences = [], []
    for label, t in zip(labels, times):
        stages = f" ({' + '.join(t.feature_stages)})" if t.features is not None else ""
        feat_ratio = ratio(base.features, t.features) if t is not base else "baseline"
        total_ratio = ratio(base.total, t.total) if t is not base else "baseline"
        again = fmt(t.pooled_again) if t.pooled_again is not None else "-"
        seconds = [fmt(t.proposals), fmt(t.features) + stages, fmt(t.caching), again, fmt(t.classification), fmt(t.total)]
        rows.append([label, *seconds, feat_ratio or "n/a", total_ratio or "n/a"])
        if t is not base:
            if feat_ratio:
                sentences.append(_than(f"{label} features", feat_ratio, baseline, "about as fast as"))
            if total_ratio:
                sentences.append(_than(f"{label} in total", total_ratio, baseline, "about as fast as"))
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
        "regression reads), and classification (SVM scoring, or Fast R-CNN's softmax read from its outputs; box "
        "regression and NMS). Caching is what the feature "
        "stages spent on top writing their features to disk. Computed again is what box regression reads and the "
        "pipeline does not cache, so computes a second time while evaluating: SPP-net's pyramid, pooled again from "
        "the conv maps, or R-CNN's pool5 under features.bbox_rows: regression, the test boxes warped through the "
        "network again; a detector keeps what it computed for the SVMs' features. A detector pays neither, so "
        "neither is in the total."
    )
    blocks += [("p", text), ("table", Table(headers, rows))]
    if sentences:
        blocks.append(("list", sentences))
    blocks += load_warning(labels, runs)
    if any(t.total is None for t in times):
        blocks.append(("p", "n/a: the run's manifests do not record that part; see *What is missing*."))
    if any(v is not None for t in times for v in t.as_dict().values()):
        figures["test_time"] = figs.time_bars(figure_dir / "test_time.png", labels, [t.as_dict() for t in times])
        blocks.append(("figure", "test_time", "Test seconds per image, split into proposals, features and classification."))
    return blocks


def section_cache(labels: list[str], runs: list[RunSummary]) -> list:
    caches = [run.feature_cache() for run in runs]
    base, base_units, base_missing = caches[0]
    rows, sentences = [], []
    for r, (label, (size, units, missing)) in enumerate(zip(labels, caches)):
        stages = ", ".join(f"{u.stage}/{u.split}" for u in units) or "none"
        if missing:
            stages += "; missing: " + ", ".join(f"{u.stage}/{u.split}" for u in missing)
        share = f"{size / base:.3f}x" if base and units else "n/a"
        rows.append([label, stages, (human_size(size) if units else "n/a") + (" (incomplete)" if missing else ""), share])
        complete = r > 0 and units and base_units and not missing and not base_missing
        if complete and (how := ratio(base, size, "smaller", "larger")):
            sentences.append(_than(f"{label}'s feature cache is", how, f"{labels[0]}'s", "about the same size as"))
    text = "Bytes on disk of the feature-caching stages' outputs (every split), from the manifests."
    blocks: list = [("h2", "Feature cache on disk"), ("p", text)]
    blocks.append(("table", Table(["run", "units", "size", f"size / {labels[0]}"], rows)))
    return blocks + ([("list", sentences)] if sentences else [])
