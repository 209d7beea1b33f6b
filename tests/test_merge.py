"""Merging: key-union plans with conflict policies; weighted averaging."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from ckptsurgeon.errors import ConflictError, UsageError
from ckptsurgeon.merge import OnConflict, average_state_dicts, merge_state_dicts, plan_merge
from ckptsurgeon.patterns import select_keys
from ckptsurgeon.surgery import extract_state_dict


def test_union_in_first_seen_order():
    r = plan_merge([["a", "b"], ["c", "a2"], ["d"]])
    assert list(r.sources.items()) == [("a", 0), ("b", 0), ("c", 1), ("a2", 1), ("d", 2)]


def test_conflict_policies():
    with pytest.raises(ConflictError, match="'b'"):
        plan_merge([["a", "b"], ["b", "c"]])
    assert plan_merge([["a", "b"], ["b", "c"]], OnConflict.first).sources["b"] == 0
    last = plan_merge([["a", "b"], ["b", "c"]], OnConflict.last)
    assert last.sources["b"] == 1 and list(last.sources) == ["a", "b", "c"] and last.conflicts == ("b",)


def test_merge_keeps_tensors_and_merges_metadata():
    x = OrderedDict(a=torch.ones(2))
    x._metadata = OrderedDict([("", {"version": 1})])
    y = OrderedDict(b=torch.zeros(2))
    y._metadata = OrderedDict([("", {"version": 9}), ("b", {"version": 2})])
    out, _ = merge_state_dicts([x, y])
    assert out["a"] is x["a"] and out["b"] is y["b"]
    assert out._metadata == OrderedDict([("", {"version": 1}), ("b", {"version": 2})])


def test_extract_then_merge_with_complement_is_the_input():
    sd = OrderedDict((k, torch.randn(2)) for k in ["conv1.weight", "conv1.bias", "conv10.weight", "fc.weight"])
    keep = select_keys(sd, ["conv1"])
    rest = select_keys(sd, exclude=["conv1"])
    merged, _ = merge_state_dicts([extract_state_dict(sd, keep), extract_state_dict(sd, rest)])
    assert set(merged) == set(sd) and all(merged[k] is sd[k] for k in sd)


def test_average_weights_dtypes_and_integers():
    a = OrderedDict(w=torch.tensor([0.0, 4.0]), h=torch.tensor([1.0], dtype=torch.bfloat16), n=torch.tensor(3))
    b = OrderedDict(w=torch.tensor([4.0, 0.0]), h=torch.tensor([3.0], dtype=torch.bfloat16), n=torch.tensor(5))
    out, report = average_state_dicts([a, b], [3, 1])
    assert torch.equal(out["w"], torch.tensor([1.0, 3.0]))
    assert out["h"].dtype == torch.bfloat16 and out["h"].item() == 1.5
    assert out["n"].item() == 3 and out["n"].dtype == torch.int64
    assert any("n" in w for w in report.warnings)


def test_average_requires_same_keys_and_shapes():
    a = OrderedDict(w=torch.zeros(2), v=torch.zeros(1))
    with pytest.raises(ConflictError, match="lacks"):
        average_state_dicts([a, OrderedDict(w=torch.zeros(2))])
    with pytest.raises(ConflictError, match="shape"):
        average_state_dicts([a, OrderedDict(w=torch.zeros(3), v=torch.zeros(1))])
    with pytest.raises(UsageError):
        average_state_dicts([a, a], [1.0])


def test_average_keeps_ties():
    w = torch.randn(4, 3)
    a = OrderedDict(emb=w, out=w)
    v = torch.randn(4, 3)
    b = OrderedDict(emb=v, out=v)
    out, _ = average_state_dicts([a, b])
    assert out["emb"] is out["out"]
    assert torch.allclose(out["emb"], (w + v) / 2)
