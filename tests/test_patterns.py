"""Key pattern rules: exact-or-module-prefix, globs over the whole key, regex search."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptsurgeon.errors import SelectionError
from ckptsurgeon.patterns import select_keys, unmatched_includes

KEYS = [
    "conv1.weight",
    "conv1.bias",
    "conv10.weight",
    "conv1x.bias",
    "bn1.running_mean",
    "layer1.0.conv1.weight",
    "fc.weight",
    "fc.bias",
    "conv1",
]


def test_plain_pattern_is_exact_key_or_module_prefix():
    assert select_keys(KEYS, ["conv1"]) == ["conv1.weight", "conv1.bias", "conv1"]


def test_plain_pattern_never_takes_a_longer_name():
    picked = select_keys(KEYS, ["conv1"])
    assert "conv10.weight" not in picked and "conv1x.bias" not in picked
    assert "layer1.0.conv1.weight" not in picked  # a prefix, not a substring


def test_nested_module_prefix():
    assert select_keys(KEYS, ["layer1.0"]) == ["layer1.0.conv1.weight"]
    assert select_keys(KEYS, ["layer1"]) == ["layer1.0.conv1.weight"]


def test_trailing_dot_is_a_prefix():
    assert select_keys(KEYS, ["fc."]) == ["fc.weight", "fc.bias"]


def test_glob_matches_whole_key_and_star_crosses_dots():
    assert select_keys(KEYS, ["*.bias"]) == ["conv1.bias", "conv1x.bias", "fc.bias"]
    assert select_keys(KEYS, ["layer*"]) == ["layer1.0.conv1.weight"]
    assert select_keys(KEYS, ["conv?.weight"]) == ["conv1.weight"]
    assert select_keys(KEYS, ["conv[0-9].*"]) == ["conv1.weight", "conv1.bias"]
    assert select_keys(KEYS, ["bias"]) == []  # no glob char: exact/prefix only


def test_exclude_wins_and_no_include_means_all():
    assert select_keys(KEYS, exclude=["fc", "conv1*"]) == ["bn1.running_mean", "layer1.0.conv1.weight"]
    assert select_keys(KEYS, ["conv1", "fc"], ["*.bias"]) == ["conv1.weight", "fc.weight", "conv1"]


def test_regex_searches_anywhere():
    assert select_keys(KEYS, [r"conv1\b"], regex=True) == [
        "conv1.weight",
        "conv1.bias",
        "layer1.0.conv1.weight",
        "conv1",
    ]
    assert select_keys(KEYS, ["^fc"], regex=True) == ["fc.weight", "fc.bias"]


def test_invalid_regex_is_a_selection_error():
    with pytest.raises(SelectionError, match="invalid regular expression"):
        select_keys(KEYS, ["("], regex=True)


def test_unmatched_includes_are_reported():
    assert unmatched_includes(KEYS, ["conv1", "head"]) == ["head"]


key_st = st.lists(st.from_regex(r"[a-z]{1,4}[0-9]?(\.[a-z0-9]{1,4}){0,3}", fullmatch=True), unique=True, max_size=30)


@given(key_st, st.lists(st.from_regex(r"[a-z]{1,4}[0-9]?", fullmatch=True), max_size=3))
def test_selection_and_its_complement_partition_the_keys(keys, patterns):
    picked = select_keys(keys, patterns)
    rest = select_keys(keys, exclude=patterns) if patterns else []
    assert sorted(picked + rest) == sorted(keys)
    assert not set(picked) & set(rest)
    # order is preserved
    assert picked == [k for k in keys if k in set(picked)]
