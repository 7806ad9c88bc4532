"""Values a configuration refuses beyond their types: numbers that are not finite, empty paths, an empty class list."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from rcnn.config import PipelineConfig, PipelineFile
from rcnn.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _float_fields(cls=PipelineConfig, prefix=""):
    """The dotted key of every setting that takes a float, walking the nested sections."""
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        section = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), None)
        if section is not None:
            yield from _float_fields(section, f"{prefix}{f.name}.")
        elif tp is float or float in typing.get_args(tp):
            yield f"{prefix}{f.name}"


FLOATS = list(_float_fields())


def test_the_float_settings_are_found():
    assert {"finetune.lr", "svm.hard_threshold", "spp.offset", "cluster.connect_timeout"} <= set(FLOATS)


@pytest.mark.parametrize("key", FLOATS)
def test_every_float_setting_refuses_what_is_not_finite(key):
    # inf passed a '> 0' range (finetune.lr=.inf), and 1e400 reads as inf; no setting means infinity (null is "no limit").
    pf = PipelineFile(REPO / "pipelines.yaml")
    huge = "1" + "0" * 400  # an integer beyond a float's range: an OverflowError traceback otherwise
    for text, shown in ((".inf", "inf"), ("-.inf", "-inf"), ("1e400", "inf"), ("-1e400", "-inf"), (huge, "inf"), (".nan", "nan")):
        with pytest.raises(ConfigError) as e:
            pf.load("demo", [f"{key}={text}"])
        message = str(e.value)
        assert f"'{key}' must be a finite number" in message and message.endswith(f"; got {shown}"), (text, message)


def test_a_non_finite_number_in_the_file_is_refused_with_its_range(tmp_path):
    (tmp_path / "p.yaml").write_text("pipelines:\n  a:\n    data: {root: d}\n    finetune: {lr: .inf}\n")
    with pytest.raises(ConfigError, match=r"^\S*p.yaml \(pipeline 'a'\): 'finetune.lr' must be a finite number > 0; got inf$"):
        PipelineFile(tmp_path / "p.yaml").load("a")


@pytest.mark.parametrize("key", ["data.root", "model.weights"])
def test_an_empty_path_is_refused_naming_the_key(key):
    # data.root= resolved to the working folder, which then read as a dataset root missing its split files.
    pf = PipelineFile(REPO / "pipelines.yaml")
    for text in ("", "  "):
        with pytest.raises(ConfigError, match=rf"^--set on pipeline 'demo': '{key}' is an empty path; give a path$"):
            pf.load("demo", [f"{key}={text}"])


def test_an_empty_path_in_the_file_or_from_a_variable_is_refused(tmp_path, monkeypatch):
    (tmp_path / "p.yaml").write_text("pipelines:\n  a: {data: {root: ''}}\n  b: {data: {root: '${MY_ROOT}'}}\n")
    pf = PipelineFile(tmp_path / "p.yaml")
    with pytest.raises(ConfigError, match=r"\(pipeline 'a'\): 'data.root' is an empty path; give a path$"):
        pf.load("a")
    monkeypatch.setenv("MY_ROOT", "")
    with pytest.raises(ConfigError, match=r"'data.root' is an empty path \(from \$\{MY_ROOT\}\); give a path$"):
        pf.load("b")
    monkeypatch.setenv("MY_ROOT", "cells")
    assert pf.load("b").data.root == str((tmp_path / "cells").resolve())


def test_an_empty_class_list_is_refused_when_loaded(tmp_path):
    # It loaded, and the run then refused every object, advising to add its class to a list that trains on nothing.
    (tmp_path / "p.yaml").write_text("pipelines:\n  a:\n    data: {root: d, classes: []}\n")
    pf = PipelineFile(tmp_path / "p.yaml")
    needle = r"'data.classes' is an empty list; give at least one class, or null for the classes of the trainval split's"
    with pytest.raises(ConfigError, match=needle):
        pf.load("a")
    with pytest.raises(ConfigError, match=r"^--set on pipeline 'demo': " + needle):
        PipelineFile(REPO / "pipelines.yaml").load("demo", ["data.classes=[]"])
    assert PipelineFile(REPO / "pipelines.yaml").load("demo", ["data.classes=null"]).data.classes is None


@pytest.mark.parametrize("key", ["spp.scales", "spp.levels", "fast.scales"])
def test_an_empty_list_of_scales_or_levels_is_refused_when_loaded(key):
    # It loaded, and the first image then stopped the stage with a traceback from the scale arithmetic.
    with pytest.raises(ConfigError, match=rf"^--set on pipeline 'demo': '{key}' is an empty list; give at least one$"):
        PipelineFile(REPO / "pipelines.yaml").load("demo", [f"{key}=[]"])
