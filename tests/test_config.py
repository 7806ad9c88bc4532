"""pipelines.yaml loading: typing, unknown keys, overrides, extends, env vars."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rcnn.config import PipelineFile, fingerprint_params, parse_override
from rcnn.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


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
                "  base: {description: b, proposals: {mode: single, min_size: 5}}\n"
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
    pf = PipelineFile(write(tmp_path, "pipelines:\n  a: {}\n"))
    one = fingerprint_params(pf.load("a", ["proposals.n_jobs=1"]).proposals)
    two = fingerprint_params(pf.load("a", ["proposals.n_jobs=2"]).proposals)
    assert one == two and "n_jobs" not in one
    assert fingerprint_params(pf.load("a", ["proposals.seed=1"]).proposals) != one


@pytest.mark.parametrize(
    "name, why", [("'../escape'", "contains '/'"), ("_data", "starts with '_'"), ("'..'", "folder"), ("3", "int")]
)
def test_pipeline_names_must_be_plain_folder_names(tmp_path, name, why):
    # A pipeline's name is its folder in the runs folder.
    with pytest.raises(ConfigError, match=f"pipeline name .* cannot be a folder name .*{why}"):
        PipelineFile(write(tmp_path, f"pipelines:\n  {name}:\n    description: x\n"))
