"""pipelines.yaml loading: typing, unknown keys, overrides, extends, env vars."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rcnn.config import PipelineFile, fingerprint_params, parse_override
from rcnn.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


def test_shipped_pipelines_all_load():
    pf = PipelineFile(REPO / "pipelines.yaml")
    assert {"demo", "voc07-mini", "bccd"} <= set(pf.names)
    for name in pf.names:
        cfg = pf.load(name)
        assert cfg.name == name and cfg.description
    voc = pf.load("voc07-mini")
    assert len(voc.data.classes) == 20
    # Relative roots resolve against the YAML's folder, not the working directory.
    assert Path(voc.data.root) == (REPO / ".." / "shared" / "data" / "voc07-mini").resolve()


def test_config_is_frozen():
    cfg = PipelineFile(REPO / "pipelines.yaml").load("demo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.proposals.mode = "single"


@pytest.mark.parametrize(
    "body, needle",
    [
        ("  p:\n    proposals: {bogus: 1}\n", "unknown key 'proposals.bogus'"),
        ("  p:\n    proposals: {min_size: big}\n", "'proposals.min_size' must be a number"),
        ("  p:\n    proposals: {max_proposals: 2.5}\n", "'proposals.max_proposals' must be an integer or null"),
        ("  p:\n    proposals: {mode: slow}\n", "'proposals.mode' must be one of fast, opencv-fast"),
        ("  p:\n    data: {classes: cat}\n", "'data.classes' must be"),
        ("  p:\n    data: 3\n", "'data' must be a mapping"),
        ("  p:\n    extends: p\n", "extends itself"),
    ],
)
def test_bad_values_name_the_key(tmp_path, body, needle):
    pf = PipelineFile(write(tmp_path, "pipelines:\n" + body))
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        pf.load("p")


def test_unknown_pipeline_and_missing_file(tmp_path):
    pf = PipelineFile(write(tmp_path, "pipelines:\n  a: {}\n"))
    with pytest.raises(ConfigError, match="unknown pipeline 'b'.*known: a"):
        pf.load("b")
    with pytest.raises(ConfigError, match="does not exist"):
        PipelineFile(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        PipelineFile(write(tmp_path, "pipelines:\n  a: [\n"))


def test_overrides_are_typed_and_checked(tmp_path):
    pf = PipelineFile(write(tmp_path, "pipelines:\n  a: {data: {root: d}}\n"))
    cfg = pf.load("a", ["proposals.max_proposals=2000", "proposals.mode=single", "data.classes=[x, y]"])
    assert cfg.proposals.max_proposals == 2000 and cfg.proposals.mode == "single"
    assert cfg.data.classes == ("x", "y")
    assert pf.load("a", ["proposals.max_proposals=null"]).proposals.max_proposals is None
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        pf.load("a", ["proposals.nope=1"])
    with pytest.raises(ConfigError, match="'proposals.min_size' must be a number"):
        pf.load("a", ["proposals.min_size=abc"])
    with pytest.raises(ConfigError, match="expected key=value"):
        pf.load("a", ["proposals.min_size"])
    assert parse_override("a.b= 3") == ("a.b", 3)


def test_exponent_without_a_dot_is_a_number_in_the_file_and_in_set(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as a string; users write it, as YAML 1.2 and every other parser allow.
    pf = PipelineFile(write(tmp_path, "pipelines:\n  a:\n    data: {root: d}\n    finetune: {lr: 1e-4}\n"))
    assert pf.load("a").finetune.lr == pytest.approx(1e-4)
    assert pf.load("a", ["finetune.lr=5E-3"]).finetune.lr == pytest.approx(5e-3)
    with pytest.raises(ConfigError, match=r"'finetune.lr' must be > 0; got -0.0005"):  # a number, so its range applies
        pf.load("a", ["finetune.lr=-.5e-3"])
    texts = ("2e3", "1.0e-4", "3", "1e", "e5", "abc")
    assert [parse_override(f"x={t}")[1] for t in texts] == [2000.0, 1e-4, 3, "1e", "e5", "abc"]


def test_override_of_nested_optional_section(tmp_path):
    pf = PipelineFile(write(tmp_path, "pipelines:\n  a: {}\n"))
    cfg = pf.load("a", ["data.synthetic.images=7"])
    assert cfg.data.synthetic.images == 7 and cfg.data.synthetic.size == 256


def test_extends_merges_sections(tmp_path):
    pf = PipelineFile(
        write(
            tmp_path,
            (
                "pipelines:\n"
                "  base: {description: b, data: {root: voc}, proposals: {mode: single, min_size: 5}}\n"
                "  child: {extends: base, proposals: {min_size: 9}}\n"
            ),
        )
    )
    child = pf.load("child")
    assert child.proposals.mode == "single" and child.proposals.min_size == 9.0
    assert child.description == ""


def test_environment_variables(tmp_path, monkeypatch):
    pf = PipelineFile(write(tmp_path, "pipelines:\n  a: {data: {root: '${MY_ROOT:-fallback}'}}\n"))
    assert pf.load("a").data.root == str((tmp_path / "fallback").resolve())
    monkeypatch.setenv("MY_ROOT", "/elsewhere")
    assert pf.load("a").data.root == "/elsewhere"


def test_fingerprint_ignores_worker_count(tmp_path):
    pf = PipelineFile(write(tmp_path, "pipelines:\n  a: {data: {root: voc}}\n"))
    one = fingerprint_params(pf.load("a", ["proposals.n_jobs=1"]).proposals)
    two = fingerprint_params(pf.load("a", ["proposals.n_jobs=2"]).proposals)
    assert one == two and "n_jobs" not in one
    assert fingerprint_params(pf.load("a", ["proposals.seed=1"]).proposals) != one


def _ranged_fields(cls=None, prefix=""):
    """(dotted key, Range) of every numeric setting, walking the nested sections."""
    import typing

    from rcnn.config import PipelineConfig

    cls = cls or PipelineConfig
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        section = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), None)
        if section is not None:
            yield from _ranged_fields(section, f"{prefix}{f.name}.")
        elif "range" in f.metadata:
            yield f"{prefix}{f.name}", f.metadata["range"], f.type


def _outside(r) -> list[float]:
    """Values just outside a range, on every side it has."""
    out = []
    if r.ge is not None:
        out.append(r.ge - 1 if r.ge - 1 not in r.also else r.ge - 2)
    if r.gt is not None:
        out.append(r.gt)
    if r.le is not None:
        out.append(r.le + 1)
    if r.lt is not None:
        out.append(r.lt)
    return out


RANGED = list(_ranged_fields())


def test_every_number_has_a_range():
    import typing

    from rcnn.config import PipelineConfig

    def numeric(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            args = (tp, *typing.get_args(tp), *[b for a in typing.get_args(tp) for b in typing.get_args(a)])
            section = next((a for a in args if dataclasses.is_dataclass(a)), None)
            if section is not None:
                yield from numeric(section, f"{prefix}{f.name}.")
            elif int in args or float in args:
                yield f"{prefix}{f.name}"

    # The thresholds of hard-negative mining and SPP-net's offset are any real numbers; every other number has a range.
    unbounded = {"svm.hard_threshold", "svm.evict_threshold", "spp.offset"}
    assert set(numeric(PipelineConfig)) - unbounded == {key for key, _, _ in RANGED}


@pytest.mark.parametrize("key, allowed", [(k, r) for k, r, _ in RANGED], ids=[k for k, _, _ in RANGED])
def test_out_of_range_settings_are_refused_with_key_value_and_range(key, allowed):
    pf = PipelineFile(REPO / "pipelines.yaml")
    for value in _outside(allowed):
        value = int(value) if float(value).is_integer() else value
        text = f"[{value}]" if key in ("spp.levels", "spp.scales", "fast.scales") else str(value)
        with pytest.raises(ConfigError) as e:
            pf.load("demo", [f"{key}={text}"])
        message = str(e.value)
        assert f"'{key}' must be {allowed}; got {value!r}" in message and "\n" not in message


@pytest.mark.parametrize(
    "override, needle",
    [
        ("finetune.batch_size=0", "'finetune.batch_size' must be >= 1; got 0"),
        ("model.input_size=8", "'model.input_size' must be >= 16; got 8"),
        ("finetune.lr=-1", "'finetune.lr' must be > 0; got -1"),
        ("finetune.max_iter=0", "'finetune.max_iter' must be >= 1; got 0"),
        ("proposals.n_jobs=0", "'proposals.n_jobs' must be >= 1, or -1; got 0"),
        ("finetune.fg_threshold=1.5", "'finetune.fg_threshold' must be in (0, 1]; got 1.5"),
        ("finetune.bg_low=0.6", "'finetune.bg_low' (0.6) must be below 'finetune.fg_threshold' (0.5)"),
        ("svm.evict_threshold=-0.5", "'svm.evict_threshold' (-0.5) must be below 'svm.hard_threshold'"),
        ("finetune.lr=.nan", "'finetune.lr' must be a finite number > 0; got nan"),
        ("finetune.lr=.inf", "'finetune.lr' must be a finite number > 0; got inf"),
        ("data.root=", "'data.root' is an empty path; give a path"),
    ],
)
def test_the_reported_bad_settings(override, needle, tmp_path, capsys, monkeypatch):
    from conftest import run_cli

    monkeypatch.setenv("RCNN_RUNS_DIR", str(tmp_path))
    code, _, err = run_cli(["proposals", "demo", "--set", override], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert needle in err
    assert not any(tmp_path.iterdir())  # refused before anything was computed


def test_backbone_input_sizes():
    pf = PipelineFile(REPO / "pipelines.yaml")
    # AlexNet's ImageNet fc6 reads a 6 x 6 pool5 grid: 223 to 254 px give it; R-CNN's 227 is inside.
    assert pf.load("demo", ["model.backbone=alexnet", "model.input_size=227"]).model.input_size == 227
    for size in (222, 255):
        with pytest.raises(ConfigError, match="in \\[223, 254\\] for backbone alexnet"):
            pf.load("demo", ["model.backbone=alexnet", f"model.input_size={size}"])


def test_range_text():
    from rcnn.config import Range

    assert str(Range(ge=0, lt=1)) == "in [0, 1)" and 0 in Range(ge=0, lt=1) and 1 not in Range(ge=0, lt=1)
    assert str(Range(gt=0)) == "> 0" and 0 not in Range(gt=0) and 1e-9 in Range(gt=0)
    assert str(Range(ge=1, also=(-1,))) == ">= 1, or -1" and -1 in Range(ge=1, also=(-1,)) and 0 not in Range(ge=1, also=(-1,))


def test_config_command_prints_the_resolved_values_with_their_origins(capsys):
    import yaml
    from conftest import run_cli

    from rcnn.config import PipelineFile

    overrides = ["finetune.lr=0.01", "data.synthetic={images: 12}"]
    code, out, err = run_cli(["config", "demo-spp", *[a for o in overrides for a in ("--set", o)]], capsys)
    assert code == 0, err
    cfg = PipelineFile(REPO / "pipelines.yaml").load("demo-spp", overrides)
    printed = yaml.safe_load(out)
    expected = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg)))  # tuples as lists
    assert printed == expected
    origin = {line.split(":")[0].strip(): line.rsplit("# ", 1)[1] for line in out.splitlines() if ": " in line and "# " in line}
    assert origin["method"] == "pipeline"  # demo-spp's own section
    assert origin["mode"] == "parent demo"  # proposals.mode, inherited through extends
    assert origin["momentum"] == "default"
    assert origin["lr"] == "--set" and origin["images"] == "--set"
    assert origin["size"] == "parent demo"  # the rest of data.synthetic still comes from demo


def test_origins_of_a_section_replaced_by_a_scalar():
    pf = PipelineFile(REPO / "pipelines.yaml")
    origins = pf.origins("demo", ["data.synthetic=null"])
    assert origins["data.synthetic"] == "--set" and not any(k.startswith("data.synthetic.") for k in origins)


def test_settings_reference_matches_the_code():
    from rcnn.config.view import render_reference

    text = (REPO / "docs" / "pipelines.md").read_text()
    assert text == render_reference(), "regenerate with: python -m rcnn.config.view docs/pipelines.md"
    assert "| `max_iter` | integer | `40000` | >= 1 |" in text


@pytest.mark.parametrize(
    "name, why", [("'../escape'", "contains '/'"), ("_data", "starts with '_'"), ("'..'", "folder"), ("3", "int")]
)
def test_pipeline_names_must_be_plain_folder_names(tmp_path, name, why):
    # A pipeline's name is its folder in the runs folder.
    with pytest.raises(ConfigError, match=f"pipeline name .* cannot be a folder name .*{why}"):
        PipelineFile(write(tmp_path, f"pipelines:\n  {name}:\n    description: x\n"))


def test_a_shipped_parents_relative_paths_keep_their_meaning_in_a_pipeline_extending_it(tmp_path, monkeypatch):
    # voc07-mini's data and weights are relative to the shipped file (behind variables); a pipeline of your own that
    # extends it must find them where voc07-mini does, not beside your file.
    for var in ("RCNN_VOC07_MINI", "RCNN_SQUEEZENET_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    mine = tmp_path / "elsewhere" / "pipelines.yaml"
    mine.parent.mkdir()
    mine.write_text("pipelines:\n  more-boxes:\n    extends: voc07-mini\n    proposals: {max_proposals: 1000}\n")
    shipped = PipelineFile(REPO / "pipelines.yaml").load("voc07-mini")
    pf = PipelineFile(mine)
    cfg = pf.load("more-boxes")
    assert (cfg.data.root, cfg.model.weights) == (shipped.data.root, shipped.model.weights)
    assert not cfg.data.root.startswith(str(mine.parent)) and cfg.proposals.max_proposals == 1000
    assert pf.environment_variables("more-boxes", "data.root") == ["RCNN_VOC07_MINI"]  # still named in hints
    monkeypatch.setenv("RCNN_VOC07_MINI", "/data/mini")
    assert pf.load("more-boxes").data.root == "/data/mini"
    # A relative path written in your own file is still from your file's folder.
    mine.write_text("pipelines:\n  more-boxes:\n    extends: voc07-mini\n    data: {root: mini}\n")
    assert PipelineFile(mine).load("more-boxes").data.root == str((mine.parent / "mini").resolve())


def test_a_pipeline_without_data_is_refused_when_loaded(tmp_path):
    pf = PipelineFile(write(tmp_path, "pipelines:\n  z:\n    description: no data\n"))
    with pytest.raises(ConfigError, match="pipeline 'z'.*set 'data.root' .* or 'data.synthetic'"):
        pf.load("z")


def test_a_file_of_your_own_adds_to_the_shipped_pipelines(tmp_path, monkeypatch, capsys):
    """README's own-data example: a pipelines.yaml in the working folder extends a shipped pipeline."""
    from conftest import run_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipelines.yaml").write_text(
        "pipelines:\n"
        "  cells:\n"
        "    extends: bccd\n"
        "    data: {root: /data/cells, classes: [Platelets, RBC, WBC]}\n"
        "  demo:\n"  # a shipped name: this file's definition replaces the shipped one
        "    extends: demo-spp\n"
        "    finetune: {max_iter: 7}\n"
    )
    shipped = PipelineFile(REPO / "pipelines.yaml")
    code, out, err = run_cli(["config", "cells"], capsys)
    assert code == 0, err
    origin = {line.split(":")[0].strip(): line.rsplit("# ", 1)[1] for line in out.splitlines() if ": " in line and "# " in line}
    assert "root: /data/cells" in out and origin["root"] == "pipeline" and origin["max_iter"] == "parent bccd"
    assert origin["mode"] == "parent voc07"  # bccd extends voc07-mini, which extends voc07
    assert out.startswith(f"# pipeline cells from {tmp_path / 'pipelines.yaml'};")
    code, out, err = run_cli(["config", "bccd@seed1"], capsys)
    assert code == 0 and out.startswith(f"# pipeline bccd@seed1 from {(REPO / 'pipelines.yaml').resolve()};"), (out, err)
    pf = PipelineFile("pipelines.yaml")
    cells = pf.load("cells")
    assert cells.model.backbone == shipped.load("bccd").model.backbone and cells.data.classes == ("Platelets", "RBC", "WBC")
    # Shipped pipelines it leaves alone are the shipped ones, parents and relative paths included.
    assert pf.load("voc07-mini-spp") == shipped.load("voc07-mini-spp")
    assert pf.load("demo-spp@seed1") == shipped.load("demo-spp@seed1")
    assert pf.load("demo").finetune.max_iter == 7 and pf.load("demo").method == "spp"
    # Its parent demo-spp extends the shipped demo, not this file's.
    assert pf.origins("demo")["finetune.max_iter"] == "pipeline" and pf.origins("demo")["method"] == "parent demo-spp"
    assert pf.origins("demo")["proposals.mode"] == "parent demo" and pf.load("demo").proposals == shipped.load("demo").proposals
    assert pf.names[:2] == ["cells", "demo"] and set(shipped.names) <= set(pf.names)
    code, out, err = run_cli(["pipelines"], capsys)
    assert code == 0, err
    mine, theirs = out.split("shipped with the package")
    assert "  demo: " in mine and "  bccd: " in theirs and "  demo: " not in theirs
    # Its parent's description would describe another pipeline: it is not inherited, and the line says so.
    assert "  cells: (no description; extends bccd)\n" in mine and "  bccd: voc07-mini's settings on BCCD" in theirs
    with pytest.raises(ConfigError, match="unknown pipeline 'cels' in pipelines.yaml or the shipped pipelines.yaml"):
        pf.load("cels")


def test_a_class_listed_twice_is_refused_when_loaded(tmp_path):
    # It was accepted; the run failed after fine-tuning and features with "RBC: no ground-truth box to train on".
    pf = PipelineFile(write(tmp_path, "pipelines:\n  z:\n    data: {root: d, classes: [a, RBC, b, RBC]}\n"))
    with pytest.raises(ConfigError, match=r"'data.classes' lists 'RBC' more than once$"):
        pf.load("z")


def test_a_home_folder_in_a_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    pf = PipelineFile(write(tmp_path, "pipelines:\n  z:\n    data: {root: ~/cells}\n"))
    assert pf.load("z").data.root == str(tmp_path / "home" / "cells")
    assert pf.load("z", overrides=["data.root=~/other"]).data.root == str(tmp_path / "home" / "other")


def test_an_unknown_pipeline_of_the_shipped_file_says_how_to_name_yours():
    from rcnn.config import default_pipelines_file

    with pytest.raises(ConfigError, match=r"\(pipelines of yours: ./pipelines.yaml, or the file --pipelines-file FILE or "):
        PipelineFile(default_pipelines_file()).load("cells")
