"""Rename plans: order of rules, sed parsing, collisions, _metadata renaming."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptsurgeon.errors import CollisionError, SelectionError, UsageError
from ckptsurgeon.rename import (
    RenameRules,
    filter_metadata,
    invert_plan,
    parse_sub,
    plan_rename,
    rename_metadata,
)

DP_KEYS = ["module.conv1.weight", "module.conv1.bias", "module.fc.weight"]


def test_strip_prefix_only_where_it_starts():
    plan = plan_rename(DP_KEYS + ["other.module.x"], RenameRules(strip_prefixes=("module.",)))
    assert list(plan.values()) == ["conv1.weight", "conv1.bias", "fc.weight", "other.module.x"]


def test_rules_apply_in_documented_order():
    rules = RenameRules(
        mapping={"module.fc.weight": "module.head.weight"},
        strip_prefixes=("module.",),
        subs=(parse_sub(r"s/conv(\d)/c\1/"),),
        add_prefix="backbone.",
    )
    plan = plan_rename(DP_KEYS, rules)
    assert list(plan.items()) == [
        ("module.conv1.weight", "backbone.c1.weight"),
        ("module.conv1.bias", "backbone.c1.bias"),
        ("module.fc.weight", "backbone.head.weight"),
    ]


def test_sub_any_delimiter_escapes_and_flags():
    pat, repl = parse_sub("s|a/b|c|")
    assert pat.sub(repl, "xa/b") == "xc"
    pat, repl = parse_sub(r"s/a\/b/c/")
    assert pat.sub(repl, "a/b") == "c"
    pat, repl = parse_sub("s/CONV/conv/gi")
    assert pat.sub(repl, "Conv1.conv2") == "conv1.conv2"
    pat, repl = parse_sub(r"s/(?P<n>\d+)/<\g<n>>/")
    assert pat.sub(repl, "l12.w3") == "l<12>.w<3>"


@pytest.mark.parametrize("bad", ["s/a/b", "x/a/b/", "s/a/b/q", "s/(/b/", r"s/a/\2/", "s"])
def test_bad_sub_is_a_usage_error(bad):
    with pytest.raises(UsageError):
        parse_sub(bad)


def test_collision_names_both_keys_and_target():
    with pytest.raises(CollisionError) as exc:
        plan_rename(["a.w", "b.w"], RenameRules(subs=(parse_sub("s/^[ab]/x/"),)))
    assert "'a.w'" in str(exc.value) and "'b.w'" in str(exc.value) and "'x.w'" in str(exc.value)


def test_map_with_unknown_key_is_refused():
    with pytest.raises(SelectionError, match="nope"):
        plan_rename(["a"], RenameRules(mapping={"nope": "b"}))


def test_rename_to_empty_is_refused():
    with pytest.raises(CollisionError):
        plan_rename(["module."], RenameRules(strip_prefixes=("module.",)))


def test_metadata_follows_dataparallel_strip():
    meta = OrderedDict(
        [
            ("", {"version": 1}),
            ("module", {"version": 1}),
            ("module.conv1", {"version": 1}),
            ("module.bn", {"version": 2}),
        ]
    )
    keys = ["module.conv1.weight", "module.bn.weight", "module.bn.num_batches_tracked"]
    rules = RenameRules(strip_prefixes=("module.",))
    new = rename_metadata(meta, plan_rename(keys, rules), rules)
    assert list(new) == ["", "conv1", "bn"]
    assert new["bn"] == {"version": 2}


def test_metadata_follows_add_prefix():
    meta = OrderedDict([("", {"version": 1}), ("bn", {"version": 2})])
    rules = RenameRules(add_prefix="backbone.")
    new = rename_metadata(meta, plan_rename(["bn.weight"], rules), rules)
    assert new == OrderedDict([("backbone", {"version": 1}), ("backbone.bn", {"version": 2})])


def test_filter_metadata_keeps_owners_and_ancestors():
    meta = OrderedDict([("", 0), ("layer1", 1), ("layer1.0", 2), ("layer1.0.bn", 3), ("fc", 4), ("layer10", 5)])
    assert list(filter_metadata(meta, ["layer1.0.bn.weight"])) == ["", "layer1", "layer1.0", "layer1.0.bn"]


names = st.from_regex(r"[a-z]{1,3}(\.[a-z0-9]{1,3}){0,3}", fullmatch=True)


@given(st.lists(names, unique=True, max_size=25), st.sampled_from(["module.", "backbone.", "m."]))
def test_add_prefix_then_strip_is_identity(keys, prefix):
    plan = plan_rename(keys, RenameRules(add_prefix=prefix))
    back = plan_rename(list(plan.values()), RenameRules(strip_prefixes=(prefix,)))
    assert list(back.values()) == keys
    assert invert_plan(plan) == OrderedDict((new, old) for old, new in plan.items())
