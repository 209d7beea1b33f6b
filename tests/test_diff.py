"""diff_state_dicts: structure, dtype, value mismatches with tolerances; diff(x, x) is empty."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptsurgeon.diff import diff_state_dicts


def test_identical_and_counts():
    a = OrderedDict(w=torch.randn(3, 4), b=torch.arange(3))
    r = diff_state_dicts(a, OrderedDict((k, v.clone()) for k, v in a.items()))
    assert r.identical and r.num_equal == 2
    assert r.to_dict()["identical"] is True and r.to_dict()["schema_version"] == 1


def test_structure_mismatches():
    a = OrderedDict(x=torch.zeros(2), y=torch.zeros(2, 2), z=torch.zeros(2))
    b = OrderedDict(y=torch.zeros(4), z=torch.zeros(2, dtype=torch.float64), w=torch.zeros(1))
    r = diff_state_dicts(a, b)
    assert r.only_in_a == ("x",) and r.only_in_b == ("w",)
    assert [(m.key, m.a, m.b) for m in r.shape_mismatches] == [("y", (2, 2), (4,))]
    assert [(m.key, m.a, m.b) for m in r.dtype_mismatches] == [("z", "float32", "float64")]
    assert not r.value_mismatches and r.num_equal == 0 and not r.identical


def test_value_statistics():
    a = OrderedDict(w=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    b = OrderedDict(w=torch.tensor([1.0, 2.5, 3.0, 2.0]))
    (m,) = diff_state_dicts(a, b).value_mismatches
    assert m.num_different == 2 and m.numel == 4
    assert m.max_abs_diff == pytest.approx(2.0) and m.max_rel_diff == pytest.approx(1.0)


def test_tolerances_follow_the_formula():
    a = OrderedDict(w=torch.tensor([1.0, 100.0]))
    b = OrderedDict(w=torch.tensor([1.001, 100.1]))
    assert not diff_state_dicts(a, b).identical
    assert diff_state_dicts(a, b, atol=0.11).identical
    assert diff_state_dicts(a, b, rtol=1e-3).identical  # |a-b| <= rtol*|b|
    assert not diff_state_dicts(a, b, rtol=1e-4).identical


def test_nan_in_same_place_is_equal_and_inf_counts():
    a = OrderedDict(w=torch.tensor([math.nan, 1.0, math.inf]))
    assert diff_state_dicts(a, OrderedDict(w=torch.tensor([math.nan, 1.0, math.inf]))).identical
    r = diff_state_dicts(a, OrderedDict(w=torch.tensor([0.0, 1.0, math.inf])))
    (m,) = r.value_mismatches
    assert m.num_different == 1 and math.isinf(m.max_abs_diff)
    assert r.to_dict()["value_mismatches"][0]["max_abs_diff"] is None  # JSON has no inf


def test_relative_diff_against_zero_is_infinite():
    (m,) = diff_state_dicts(OrderedDict(w=torch.tensor([1.0])), OrderedDict(w=torch.tensor([0.0]))).value_mismatches
    assert math.isinf(m.max_rel_diff)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_every_kind_of_dtype(dtype):
    base = torch.tensor([0, 1, 1, 0]).to(dtype)
    other = base.clone()
    other[0] = torch.tensor(1).to(dtype)
    assert diff_state_dicts(OrderedDict(w=base), OrderedDict(w=base.clone())).identical
    (m,) = diff_state_dicts(OrderedDict(w=base), OrderedDict(w=other)).value_mismatches
    assert m.num_different == 1 and m.max_abs_diff == pytest.approx(1.0)


def test_non_contiguous_and_views():
    base = torch.randn(6, 5)
    a = OrderedDict(t=base.t(), s=base[2:4])
    b = OrderedDict(t=base.t().contiguous(), s=base[2:4].clone())
    assert diff_state_dicts(a, b).identical


def test_cross_dtype_values_are_compared_after_promotion():
    a = OrderedDict(w=torch.tensor([1.0, 2.0]))
    r = diff_state_dicts(a, OrderedDict(w=torch.tensor([1.0, 2.0], dtype=torch.bfloat16)))
    assert r.dtype_mismatches and not r.value_mismatches


def test_chunked_comparison_counts_across_chunks(monkeypatch):
    import ckptsurgeon.diff as d

    monkeypatch.setattr(d, "CHUNK_BYTES", 64)
    a = torch.zeros(1000)
    b = a.clone()
    b[::100] = 1.0
    (m,) = diff_state_dicts(OrderedDict(w=a), OrderedDict(w=b)).value_mismatches
    assert m.num_different == 10 and m.numel == 1000


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(allow_nan=True, width=32), min_size=0, max_size=50))
def test_diff_of_x_with_itself_is_empty(values):
    t = torch.tensor(values, dtype=torch.float32)
    assert diff_state_dicts(OrderedDict(w=t), OrderedDict(w=t.clone())).identical
