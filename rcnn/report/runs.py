"""What ``rcnn compare`` knows of one run: read from its manifests and result files, never recomputed."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from rcnn.data.splitfile import read_split_file
from rcnn.errors import UserError
from rcnn.evaluation.detfiles import devkit_filename
from rcnn.store.artifacts import output_damage, read_manifest, rerun_hint
from rcnn.store.machine import machine_text

# Stages that train or score rather than cache features; every other stage (R-CNN's
# features, SPP-net's convmaps and features) counts towards the feature cache.
NOT_FEATURE_CACHE = frozenset({"proposals", "finetune", "train-svm", "train-bbox", "evaluate"})
MAX_PR_CLASSES = 20
_DETECTION_FOLDERS = {"plain": "detections", "bbox": "detections-bbox"}


# Linux's 1-minute load average is an exponential average of the run queue, updated every 5 s: over ``t`` seconds
# the value it had keeps the weight exp(-t / 60). Under half a minute it has hardly moved, and its 5 s steps
# and two decimals say little of what ran in between.
LOAD_TIME_CONSTANT_S = 60.0
LOAD_MIN_WALL_S = 30.0


def others_load(cpu_s: float | None, wall_s: float | None, start: float | None, end: float | None) -> float | None:
    """What else kept the machine busy during a unit, in cores: the run queue's mean over the unit, recovered from
    the 1-minute load average at its ``start`` and ``end``, as :class:`rcnn.store.machine.Stopwatch` records them
    (``end = start * d + mean * (1 - d)``, ``d`` the weight left to ``start``), less the cores the unit's own
    process kept busy (``cpu_s / wall_s``). None where a figure is missing or the unit took under
    :data:`LOAD_MIN_WALL_S`: a stage of a few seconds after a busy one read as another user's load, since the
    average still held the stage before."""
    if None in (cpu_s, wall_s, start, end) or wall_s < LOAD_MIN_WALL_S:
        return None
    kept = math.exp(-wall_s / LOAD_TIME_CONSTANT_S)
    mean = (end - start * kept) / (1 - kept)
    return max(0.0, mean - cpu_s / wall_s)


@dataclass(frozen=True)
class UnitSummary:
    """One (stage, split) unit of a run: ``state`` is ``complete`` or ``missing`` (``problem`` says why)."""

    stage: str
    split: str
    state: str
    wall_s: float | None = None
    started: float | None = None
    cpu_s: float | None = None  # processor seconds of the stage's own process
    load_1m: float | None = None  # others' load over the unit, in cores (others_load)
    output_bytes: int = 0
    metrics: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)  # the stage's settings, as its fingerprint recorded them
    libraries: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    data_digest: str | None = None  # the fingerprint of the split's images and annotations the unit read
    shared_with: str | None = None  # the pipeline whose outputs this unit reuses (hard links)
    problem: str | None = None
    machine: dict = field(default_factory=dict)  # where it was computed (rcnn.store.machine.machine_record)
    code: str = ""  # the rcnn version and the digest of the code it ran


@dataclass(frozen=True)
class TestTime:
    """Test seconds per image by part; ``None`` where the run did not record it.

    ``features`` is the feature computation a detector pays at test time (image decoding, warping or
    the conv trunk, pooling, fc layers); ``caching`` is the extra the feature stages spent writing it
    to the artifact store, which a detector does not do. Older manifests without the split give the
    stages' whole time as ``features`` and ``None`` for ``caching``. ``pooled_again`` is feature work
    the pipeline does twice because it does not cache the result: what box regression reads, computed
    again by the evaluation (SPP-net's pyramid pooled from the conv maps; R-CNN's pool5 under
    ``features.bbox_rows: regression``); a detector keeps the one it computed. Neither is in the total.
    """

    proposals: float | None
    features: float | None
    classification: float | None
    feature_stages: tuple[str, ...]
    caching: float | None = None
    pooled_again: float | None = None

    @property
    def total(self) -> float | None:
        parts = (self.proposals, self.features, self.classification)
        return None if None in parts else float(sum(parts))

    def as_dict(self) -> dict[str, float | None]:
        return {"proposals": self.proposals, "features": self.features, "classification": self.classification}


@dataclass
class RunSummary:
    """What one pipeline's run recorded, in pipeline order. ``label`` names it in the report."""

    name: str
    run_dir: Path
    units: list[UnitSummary]
    data_root: Path | None
    test_split: str | None
    classes: tuple[str, ...]
    test_images: int | None
    results: dict | None
    detections: dict[str, Path]
    detections_bbox: dict[str, Path]
    missing: list[str]
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    def unit(self, stage: str, split: str | None) -> UnitSummary | None:
        return next((u for u in self.units if u.stage == stage and u.split == split), None)

    def complete(self, stage: str, split: str | None) -> UnitSummary | None:
        u = self.unit(stage, split)
        return u if u is not None and u.state == "complete" else None

    @property
    def test_data(self) -> object:
        """What the run was tested on: the fingerprint of the test images and annotations its evaluation read, as
        that unit recorded it among its inputs (a copied runs folder or a moved dataset keeps it; proposals rebuilt
        since from other data do not change it), else as its test proposals recorded it, else where the data was
        and the split."""
        units = (self.complete("evaluate", self.test_split), self.complete("proposals", self.test_split))
        return next((u.data_digest for u in units if u is not None and u.data_digest), None) or (self.data_root, self.test_split)

    @property
    def scored_classes(self) -> frozenset[str] | None:
        """The classes the evaluation scored, whose APs its mAP averages (None without results)."""
        if self.results is None:
            return None
        per_class = self.results.get("per_class")
        return frozenset(per_class if isinstance(per_class, dict) else self.classes)

    def test_load(self) -> tuple[float | None, str, int | None] | None:
        """The highest load of others over a unit on the test split (those the test time is taken from; a shared
        unit's, when it was computed), the unit (``features/test``) and that machine's cores; None where none
        recorded the figures (older manifests, work on a cluster); ``(None, "", None)`` where every such unit
        took too short a time to tell (:func:`others_load`)."""
        timed = [u for u in self.units if u.split == self.test_split and u.state == "complete" and u.stage != "proposals"]
        # proposals' worker processes are not its own process's: its estimate would count them as others
        loads = [u for u in timed if u.load_1m is not None]
        if not loads:
            return (None, "", None) if any(u.cpu_s is not None for u in timed) else None
        top = max(loads, key=lambda u: u.load_1m)
        cores = top.machine.get("cores")
        return top.load_1m, f"{top.stage}/{top.split}", cores if isinstance(cores, int) else None

    def provenance(self) -> tuple[str, str, str]:
        """Of the units timed on the test split (not those shared from another run): the rcnn version and code
        digest of the last one (each stage's digest covers its own modules), when the first started, and the
        machine: the processor, with the cards the stages that ran on a device named (the others name none)."""
        timed = [u for u in self.units if u.split == self.test_split and u.state == "complete" and u.shared_with is None]
        when = min((u.started for u in timed if u.started), default=None)
        hosts = sorted({machine_text({**u.machine, "gpu": None}) for u in timed} - {"n/a"})
        gpus = sorted({u.machine["gpu"] for u in timed if u.machine.get("gpu")})
        where = (f"{', '.join(gpus)} ({' / '.join(hosts)})" if gpus else " / ".join(hosts)) or "n/a"
        code = next((u.code for u in reversed(timed) if u.code), "n/a")
        return code, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when)) if when else "n/a", where

    @property
    def fixed_trunk(self) -> str | None:
        """``model.weights`` where fine-tuning starts from another pipeline's network (``pipeline:NAME``)."""
        for u in self.units:
            weights = (u.params.get("model") or {}).get("weights") if isinstance(u.params.get("model"), dict) else None
            if isinstance(weights, str) and weights.startswith("pipeline:"):
                return weights
        return None

    def test_time(self) -> TestTime:
        proposals = self.complete("proposals", self.test_split)
        feature_units = [
            u
            for u in self.units
            if u.split == self.test_split
            and u.state == "complete"
            and u.stage not in ("proposals", "evaluate")
            and number(u.metrics.get("seconds_per_image")) is not None
        ]
        # A feature stage that has not run on the test split, or ran without timing anything (all of it
        # resumed), would make the sum look faster than it is.
        unfinished = any(
            u.split == self.test_split
            and u.stage not in ("proposals", "evaluate")
            and (u.state != "complete" or ("seconds_per_image" in u.metrics and u not in feature_units))
            for u in self.units
        )
        features = caching = None
        stages = tuple(u.stage for u in feature_units)
        if feature_units and not unfinished:
            whole = sum(u.metrics["seconds_per_image"] for u in feature_units)
            compute = [number(u.metrics.get("compute_seconds_per_image")) for u in feature_units]
            if None in compute:
                features = whole
            else:
                features, caching = float(sum(compute)), max(0.0, whole - float(sum(compute)))
        # Features the evaluation computed again for box regression (not cached); 0 for cached ones.
        again = number((self.results or {}).get("seconds_per_image_features"))
        return TestTime(
            proposals=number(proposals.metrics.get("seconds_per_image_worker")) if proposals else None,
            features=features,
            classification=number((self.results or {}).get("seconds_per_image_classify")),
            feature_stages=stages,
            caching=caching,
            pooled_again=again or None,
        )

    def feature_cache(self) -> tuple[int, list[UnitSummary], list[UnitSummary]]:
        """Bytes on disk of every complete feature-caching unit, those units, and the caching units missing."""
        units = [u for u in self.units if u.stage not in NOT_FEATURE_CACHE]
        done = [u for u in units if u.state == "complete"]
        return sum(u.output_bytes for u in done), done, [u for u in units if u.state != "complete"]


def resumed_note(metrics: dict) -> str:
    """``resumed: the time of K of N images`` (or iterations) where a unit's recorded time covers only the share
    a resumed run computed; empty otherwise."""
    for what in ("images", "iterations"):
        done, total = metrics.get(f"{what}_computed"), metrics.get(what)
        if isinstance(done, int) and isinstance(total, int) and done < total:
            return f"resumed: the time of {done} of {total} {what}"
    return ""


def number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def fmt(value, spec: str = ".4f", none: str = "n/a") -> str:
    v = number(value)
    return none if v is None else format(v, spec)


def _read_unit(unit_dir: Path, pipeline: str) -> UnitSummary:
    stage, split = unit_dir.parent.name, unit_dir.name
    try:
        m = read_manifest(unit_dir)
    except UserError as err:
        return UnitSummary(stage, split, "missing", problem=f"{stage}/{split} cannot be read: {err}")
    if m is None:
        # The lock file appears on any attempt; the work folder only while a run is under way or cut short.
        how = "has not finished (work in progress or interrupted)" if (unit_dir / ".work").is_dir() else "has not run"
        return UnitSummary(stage, split, "missing", problem=f"{stage}/{split} {how}: run `rcnn {stage} {pipeline}`")
    # Sizes of every output, and the bytes of the evaluation's (small) files the report shows: a damaged unit's
    # figures are left out, not reported.
    damage = output_damage(unit_dir, m, verify=stage == "evaluate")
    if damage:
        return UnitSummary(stage, split, "missing", problem=f"{stage}/{split} is damaged ({damage[0]}): {rerun_hint(unit_dir)}")
    timings = m.get("timings") or {}
    reused = m.get("reused_from")
    # This process's processor time: workers a stage keeps for the next (joblib's) are counted only when they exit,
    # perhaps during another stage, so children_cpu_s is left out.
    cpu_s, wall_s, start, end = (number(timings.get(k)) for k in ("cpu_s", "wall_s", "load_1m_start", "load_1m_end"))
    others = others_load(cpu_s, wall_s, start, end)
    return UnitSummary(
        stage,
        split,
        "complete",
        wall_s=number(timings.get("wall_s")),
        started=number(timings.get("started")),
        cpu_s=cpu_s,
        load_1m=others,
        output_bytes=sum(int(o.get("bytes", 0)) for o in m["outputs"].values()),
        metrics=m.get("metrics") or {},
        params=m.get("params") or {},
        libraries=m.get("libraries") or {},
        data=m.get("data") or {},
        inputs=tuple(m.get("inputs") or ()),
        data_digest=(m.get("inputs") or {}).get(f"data/{split}"),
        # reused_from is the twin unit, <runs>/<pipeline>/<stage>/<split>.
        shared_with=Path(reused).parent.parent.name if reused else None,
        machine=m.get("machine") if isinstance(m.get("machine"), dict) else {},
        code=" ".join(str(v)[:12] for v in ((m.get("code") or {}).get(k) for k in ("version", "digest")) if v),
    )


def _pipeline_order(units: list[UnitSummary]) -> list[UnitSummary]:
    # Only proposals (first) and evaluate (last) have a known place; the stages between,
    # which differ between R-CNN and SPP-net, run in the order they were started.
    first_start: dict[str, float] = {}
    for u in units:
        if u.started is not None:
            first_start[u.stage] = min(first_start.get(u.stage, math.inf), u.started)

    def key(u: UnitSummary):
        rank = 0 if u.stage == "proposals" else 2 if u.stage == "evaluate" else 1
        return rank, first_start.get(u.stage, math.inf), u.stage, u.started if u.started is not None else math.inf, u.split

    return sorted(units, key=key)


def _test_split(units: list[UnitSummary]) -> str | None:
    evaluated = [u.split for u in units if u.stage == "evaluate"]
    if evaluated:
        return evaluated[0]
    splits = {u.split for u in units}
    if "test" in splits:
        return "test"
    trained = {u.split for u in units if u.stage == "finetune"}
    return next((u.split for u in units if u.stage == "proposals" and u.split not in trained), None)


def load_run(run_dir: Path) -> RunSummary:
    """Summarise the run in ``run_dir`` (``<runs>/<pipeline>``) from its manifests, results and devkit files.

    Reads only; whatever is absent or damaged goes to ``RunSummary.missing`` as a sentence
    naming the command that fixes it.

    Raises:
        UserError: ``run_dir`` does not exist or holds no manifest at all.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder '{run_dir}' does not exist (expected <runs-dir>/<pipeline>, e.g. runs/demo)")
    name = run_dir.name
    units = [
        _read_unit(unit_dir, name)
        for stage_dir in sorted(run_dir.iterdir())
        if stage_dir.is_dir() and not stage_dir.name.startswith((".", "_"))
        for unit_dir in sorted(stage_dir.iterdir())
        if unit_dir.is_dir() and not unit_dir.name.startswith(".")
    ]
    if not any(u.state == "complete" for u in units):
        damaged = [u.problem for u in units if u.problem and "cannot be read" in u.problem]
        raise UserError(
            damaged[0] if damaged else f"'{run_dir}' holds no manifest (<stage>/<split>/manifest.json); is it a pipeline folder?"
        )
    test = _test_split(units)
    present = {(u.stage, u.split) for u in units}
    stages = {u.stage for u in units}
    expected = [("proposals", test), ("evaluate", test)] if test else [("evaluate", None)]
    # What a completed unit was made from must exist too (e.g. upstream outputs deleted since).
    # (Inputs that are not stages: the dataset's content and a weights file.)
    upstream = [k for u in units for k in u.inputs if not k.startswith("data") and k != "weights"]
    expected += [tuple(k.split("/", 1)) if "/" in k else (k, None) for k in upstream]
    for stage, split in dict.fromkeys(expected):
        if (stage, split) not in present and not (split is None and stage in stages):
            where = f"{stage}/{split}" if split else stage
            units.append(UnitSummary(stage, split or "", "missing", problem=f"{where} has not run: run `rcnn {stage} {name}`"))
            present.add((stage, split))
    units = _pipeline_order(units)
    missing = [u.problem for u in units if u.problem]

    complete = [u for u in units if u.state == "complete"]
    described = sorted(complete, key=lambda u: (u.stage != "evaluate", u.split != test))
    data = next((u.data for u in described if u.data.get("root")), {})
    data_root = Path(data["root"]) if data.get("root") else None
    classes = tuple(data.get("classes") or ())

    results = None
    detections: dict[str, dict[str, Path]] = {"plain": {}, "bbox": {}}
    ev = next((u for u in complete if u.stage == "evaluate" and u.split == test), None)
    if ev is not None:
        unit_dir = run_dir / "evaluate" / test
        try:
            results = json.loads((unit_dir / "results.json").read_text())
        except (OSError, ValueError):
            results = ev.metrics
        if not isinstance(results, dict) or number(results.get("mAP")) is None:
            results = None
            missing.append(f"evaluate/{test} recorded no mAP: rerun `rcnn evaluate {name} --force`")
        classes = classes or tuple((results or {}).get("per_class", {}))
        for variant, folder in _DETECTION_FOLDERS.items():
            absent = []
            for cls in classes:
                path = unit_dir / folder / devkit_filename(test, cls)
                if path.is_file():
                    detections[variant][cls] = path
                else:
                    absent.append(path.name)
            if absent:
                missing.append(f"evaluate/{test}/{folder} lacks {', '.join(absent)}: rerun `rcnn evaluate {name} --force`")

    test_images = None
    proposals = next((u for u in complete if u.stage == "proposals" and u.split == test), None)
    scored = ev.data_digest if ev is not None else None
    if proposals is not None and (scored is None or proposals.data_digest in (None, scored)):  # else of other data
        test_images = proposals.metrics.get("images")
    split_file = data_root / "ImageSets" / "Main" / f"{test}.txt" if data_root and test else None
    if test_images is None and split_file is not None and split_file.is_file():
        try:
            listed = len(read_split_file(split_file))  # as the stages read it: UTF-16, VOC's per-class layout
        except UserError:
            listed = None  # a split file no stage could read either: no count, rather than a wrong one
        skipped = len((ev.data if ev is not None else {}).get("skipped") or ())
        test_images = listed - skipped if listed is not None else None
    return RunSummary(
        name=name,
        run_dir=run_dir,
        units=units,
        data_root=data_root,
        test_split=test,
        classes=classes,
        test_images=test_images,
        results=results,
        detections=detections["plain"],
        detections_bbox=detections["bbox"],
        missing=missing,
    )
