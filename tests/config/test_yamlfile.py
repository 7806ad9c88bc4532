"""YAML as rcnn reads it: YAML 1.2 booleans and numbers, and no key given twice in a mapping."""

from __future__ import annotations

import math

import pytest

from rcnn.config import PipelineFile, parse_override
from rcnn.config.yamlfile import load_yaml
from rcnn.errors import ConfigError


def test_only_true_and_false_are_booleans():
    # YAML 1.1 (PyYAML) read yes/no/on/off as booleans: `classes: [yes, no]` loaded as [True, False].
    words = ["yes", "no", "on", "off", "Yes", "NO", "On", "OFF", "y", "n", "Y", "N"]
    assert load_yaml(f"a: [{', '.join(words)}]") == {"a": words}
    assert load_yaml("a: [true, True, TRUE, false, False, FALSE, tRue]") == {"a": [True, True, True, False, False, False, "tRue"]}
    assert load_yaml("on: 1\nyes: 2") == {"on": 1, "yes": 2}
    assert parse_override("data.use_difficult=off") == ("data.use_difficult", "off")


def test_yes_and_no_are_class_names_and_not_a_boolean_setting(tmp_path):
    (tmp_path / "p.yaml").write_text("pipelines:\n  a:\n    data: {root: d, classes: [yes, no]}\n")
    pf = PipelineFile(tmp_path / "p.yaml")
    assert pf.load("a").data.classes == ("yes", "no")
    with pytest.raises(ConfigError, match=r"'data.use_difficult' must be true or false, got 'no'$"):
        pf.load("a", ["data.use_difficult=no"])
    assert pf.load("a", ["data.use_difficult=False"]).data.use_difficult is False


@pytest.mark.parametrize(
    "text, needle",
    [
        (
            "pipelines:\n  a:\n    data: {root: x}\n  a:\n    data: {root: y}\n",
            "key 'a' is given twice in one mapping (lines 2 and 4)",
        ),
        (
            "pipelines:\n  a:\n    data:\n      root: x\n      root: y\n",
            "key 'root' is given twice in one mapping (lines 4 and 5)",
        ),
        ("pipelines:\n  a: {data: {root: x}, data: {root: y}}\n", "key 'data' is given twice in one mapping (line 2)"),
    ],
)
def test_a_key_given_twice_is_refused_naming_the_key_and_lines(tmp_path, text, needle):
    # PyYAML keeps the last silently: a second pipeline of the same name replaced the first unnoticed.
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        PipelineFile(tmp_path / "p.yaml")
    assert str(e.value) == f"{tmp_path / 'p.yaml'}: {needle}; YAML would keep only the last: remove one, or rename it"


def test_a_key_given_twice_in_set_is_refused_and_a_merge_may_override():
    with pytest.raises(ConfigError, match=r"^--set data=\{root: a, root: b\}: key 'root' is given twice"):
        parse_override("data={root: a, root: b}")
    # A key merged in with << may be given again: that is what a merge is for.
    assert load_yaml("base: &b {x: 1, y: 2}\nmine:\n  <<: *b\n  x: 3\n") == {"base": {"x": 1, "y": 2}, "mine": {"x": 3, "y": 2}}


def test_plain_scalars_resolve_as_yaml_1_2s_core_schema():
    # PyYAML's YAML 1.1 read 017 as octal 15, 1:30 as 90, 0b11 as 3, 2007_000 as 2007000 and a date as a date.
    texts = ["017", "0o17", "0x1F", "-3", "1:30", "0b11", "2007_000", "2024-01-05", "1.", ".5", "-.inf", "1e"]
    assert [load_yaml(t) for t in texts] == [17, 15, 31, -3, "1:30", "0b11", "2007_000", "2024-01-05", 1.0, 0.5, -math.inf, "1e"]
    assert math.isnan(load_yaml(".NaN"))


def test_a_key_overriding_a_merged_one_is_not_a_duplicate_wherever_the_anchor_sits():
    # The check ran after PyYAML had flattened a deeper anchored mapping into its user, in place.
    text = "base: &base {lr: 0.001}\na:\n  b:\n    c: &mid\n      <<: *base\n      lr: 0.01\nuser:\n  <<: *mid\n"
    assert load_yaml(text)["user"] == {"lr": 0.01}
