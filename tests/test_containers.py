"""Finding the state_dict inside a container, the same rules for every command."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from ckptsurgeon.containers import find_state_dict, replace_at
from ckptsurgeon.errors import ContainerError


def sd(*names):
    return OrderedDict((n, torch.zeros(1)) for n in names)


def test_bare_state_dict_is_the_top_level():
    obj = sd("a", "b")
    path, found = find_state_dict(obj)
    assert path is None and found is obj


@pytest.mark.parametrize(
    "name", ["state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params"]
)
def test_known_names(name):
    obj = {"epoch": 3, name: sd("w"), "optimizer_state_dict": {"state": {}, "param_groups": []}}
    assert find_state_dict(obj)[0] == (name,)


def test_first_known_name_wins_over_later_ones():
    obj = {"model": sd("m"), "state_dict": sd("s")}
    path, found = find_state_dict(obj)
    assert path == ("state_dict",) and list(found) == ["s"]


def test_single_nested_mapping_of_tensors():
    obj = {"epoch": 1, "stuff": {"inner": sd("x")}}
    assert find_state_dict(obj)[0] == ("stuff", "inner")


def test_ambiguous_lists_candidates():
    obj = {"ema": sd("a"), "student": sd("b")}
    with pytest.raises(ContainerError) as exc:
        find_state_dict(obj)
    assert "ema" in str(exc.value) and "student" in str(exc.value) and "--key" in str(exc.value)


def test_nothing_found():
    with pytest.raises(ContainerError, match="no state_dict found"):
        find_state_dict({"epoch": 1, "loss": 0.5})


def test_explicit_key_with_dotted_path_and_dotted_names():
    obj = {"ema": sd("a"), "student": {"net.v2": sd("b")}}
    assert find_state_dict(obj, "ema")[0] == ("ema",)
    assert find_state_dict(obj, "student.net.v2")[0] == ("student", "net.v2")
    with pytest.raises(ContainerError, match="no entry"):
        find_state_dict(obj, "teacher")
    with pytest.raises(ContainerError, match="not name a mapping of tensors"):
        find_state_dict({"epoch": 1, "m": sd("a")}, "epoch")


def test_replace_at_keeps_other_entries_and_metadata():
    inner = sd("a")
    inner._metadata = OrderedDict([("", {"version": 1})])
    outer = OrderedDict([("epoch", 5), ("model", inner)])
    outer._metadata = "kept"
    new_inner = sd("b")
    out = replace_at(outer, ("model",), new_inner)
    assert out["epoch"] == 5 and out["model"] is new_inner and outer["model"] is inner
    assert out._metadata == "kept"
