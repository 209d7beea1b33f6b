"""Applying plans to state_dicts: extract a selection, rename keys. Values are never touched."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import SelectionError
from .rename import RenameRules, filter_metadata, plan_rename, rename_metadata


def extract_state_dict(state_dict: Mapping[str, Any], keys: Sequence[str]) -> OrderedDict[str, Any]:
    """The selected entries as a bare state_dict, `_metadata` filtered to the modules kept."""
    if not keys:
        raise SelectionError("nothing selected: no key matches the patterns")
    out: OrderedDict[str, Any] = OrderedDict((k, state_dict[k]) for k in keys)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = filter_metadata(metadata, keys)  # type: ignore[attr-defined]
    return out


def rename_state_dict(
    state_dict: Mapping[str, Any], rules: RenameRules
) -> tuple[OrderedDict[str, Any], OrderedDict[str, str]]:
    """The state_dict with every key renamed by `rules` (and `_metadata` along with it), plus the plan."""
    plan = plan_rename(list(state_dict), rules)
    out: OrderedDict[str, Any] = OrderedDict((new, state_dict[old]) for old, new in plan.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = rename_metadata(metadata, plan, rules)  # type: ignore[attr-defined]
    return out, plan
