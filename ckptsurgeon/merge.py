"""Merging state_dicts: a key-level union plan, or a streaming weighted average."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .engine.meta import FLOATING_DTYPES, TensorMeta
from .errors import ConflictError, UsageError, sorted_list
from .tensors import RAW_BITS_DTYPES, dtype_name, is_tensor, kind_text, nbytes_of, plain_values, shape_of, tensor_kind


class OnConflict(str, Enum):
    error = "error"
    first = "first"
    last = "last"


@dataclass(frozen=True)
class MergeReport:
    """Where each output key came from (input index) and what the user should be told.

    `taken_from_first` (--average) names the integer and bool tensors whose values differ between
    the inputs, taken from the first; `warnings` has one line for each of them.
    """

    sources: Mapping[str, int]
    conflicts: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)
    taken_from_first: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_tensors": len(self.sources),
            "sources": dict(self.sources),
            "conflicts": list(self.conflicts),
            "warnings": list(self.warnings),
        }


def plan_merge(key_lists: Sequence[Sequence[str]], on_conflict: OnConflict = OnConflict.error) -> MergeReport:
    """The union of the inputs' keys in first-seen order, each mapped to the input it comes from.

    A key present in several inputs is a conflict: `error` raises ConflictError listing them,
    `first` / `last` choose.
    """
    sources: OrderedDict[str, int] = OrderedDict()
    seen_in: dict[str, list[int]] = {}
    for index, keys in enumerate(key_lists):
        for key in keys:
            seen_in.setdefault(key, []).append(index)
            if key not in sources:
                sources[key] = index
            elif on_conflict == OnConflict.last:
                sources[key] = index
    conflicts = tuple(k for k, where in seen_in.items() if len(where) > 1)
    if conflicts and on_conflict == OnConflict.error:
        raise ConflictError(
            f"{len(conflicts)} key(s) present in more than one input: {sorted_list(conflicts)}; "
            "choose with --on-conflict first|last"
        )
    return MergeReport(sources=sources, conflicts=conflicts)


def merge_metadata(metadatas: Sequence[Mapping[str, Any] | None]) -> OrderedDict[str, Any] | None:
    """Union of the inputs' `_metadata`, first seen wins; None when no input has any."""
    if all(m is None for m in metadatas):
        return None
    out: OrderedDict[str, Any] = OrderedDict()
    for m in metadatas:
        for path, info in (m or {}).items():
            out.setdefault(path, info)
    return out


def merge_state_dicts(
    state_dicts: Sequence[Mapping[str, Any]], on_conflict: OnConflict = OnConflict.error
) -> tuple[OrderedDict[str, Any], MergeReport]:
    """The union of the state_dicts (values untouched, `_metadata` merged) and its report."""
    report = plan_merge([list(sd) for sd in state_dicts], on_conflict)
    out: OrderedDict[str, Any] = OrderedDict((k, state_dicts[i][k]) for k, i in report.sources.items())
    meta = merge_metadata([getattr(sd, "_metadata", None) for sd in state_dicts])
    if meta is not None:
        out._metadata = meta  # type: ignore[attr-defined]
    return out, report


def normalise_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise UsageError(f"--weights has {len(weights)} values for {n} inputs")
    total = float(sum(weights))
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not (math.isfinite(total) and total > 0):
        raise UsageError("--weights must be finite, non-negative numbers with a positive finite sum")
    return [w / total for w in weights]


def check_averageable(state_dicts: Sequence[Mapping[str, Any]]) -> None:
    """--average needs the same keys and shapes everywhere; raise ConflictError listing differences."""
    first = state_dicts[0]
    problems: list[str] = []
    for i, sd in enumerate(state_dicts[1:], start=2):
        missing = [k for k in first if k not in sd]
        extra = [k for k in sd if k not in first]
        if missing:
            problems.append(f"input {i} lacks {sorted_list(missing, 5)}")
        if extra:
            problems.append(f"input {i} has extra {sorted_list(extra, 5)}")
        shapes = [k for k in first if k in sd and _shape(first[k]) != _shape(sd[k])]
        if shapes:
            problems.append(f"input {i} differs in shape at {sorted_list(shapes, 5)}")
    if problems:
        raise ConflictError("--average needs the same keys and shapes in every input: " + "; ".join(problems))


def _shape(value: Any) -> tuple[int, ...] | None:
    """A tensor's shape; None for a non-tensor value (a module's extra state)."""
    return shape_of(value) if is_tensor(value) else None


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, Any]],
    weights: Sequence[float] | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    sink: Callable[[Any], Any] | None = None,
) -> tuple[OrderedDict[str, Any], MergeReport]:
    """Weighted mean of every floating-point tensor (computed in at least float32, cast back).

    Integer and bool tensors, and non-tensor values (a module's extra state), are taken from the
    first input, with a warning where inputs disagree.
    Streams key by key: one output tensor and the inputs' tensors for that key are in memory at a
    time (engine tensors are read from disk as needed). Each finished tensor goes to `sink` (e.g.
    `io.staged_tensors(...).add`, which puts it on disk and returns a TensorMeta) and the result
    holds what `sink` returns; without a sink it holds the tensors themselves. Tensors tied in
    every input stay tied.
    """
    import torch

    from .diff import compare_values, values_equal
    from .tensors import storage_id

    def load(t: Any, key: str) -> Any:
        if isinstance(t, TensorMeta):
            from .engine.materialize import tensor_from_meta

            return tensor_from_meta(t)
        return plain_values(t, key, "average")  # conj/neg bits resolved

    if len(state_dicts) < 2:
        raise UsageError("--average needs at least two inputs")
    check_averageable(state_dicts)
    w = normalise_weights(weights, len(state_dicts))
    first = state_dicts[0]
    out: OrderedDict[str, Any] = OrderedDict()
    warnings: list[str] = []
    differing: list[str] = []
    done: dict[Any, Any] = {}
    for key in first:  # before anything is computed or written
        _check_averageable_tensors(key, [sd[key] for sd in state_dicts])
    for key, t0 in first.items():
        if not is_tensor(t0):
            out[key] = t0
            if not all(values_equal(t0, sd[key]) for sd in state_dicts[1:]):
                warnings.append(f"{key}: extra state differs between inputs; taken from the first")
            continue
        tie = (storage_id(t0), shape_of(t0), _stride(t0), _offset(t0), tuple(storage_id(sd[key]) for sd in state_dicts))
        if tie in done:
            out[key] = done[tie]
            continue
        dtype = dtype_name(t0)
        if dtype in FLOATING_DTYPES or dtype.startswith("complex"):
            target = getattr(torch, dtype)
            # float8 types do not promote: they are averaged in float32 and cast back
            acc_dtype = torch.float32 if dtype.startswith("float8") else torch.promote_types(target, torch.float32)
            acc = load(t0, key).to(acc_dtype) * w[0]
            for sd, wi in zip(state_dicts[1:], w[1:]):
                acc.add_(load(sd[key], key).to(acc_dtype), alpha=wi)
            value = acc.to(target)
        else:
            value = load(t0, key).clone()
            if any(compare_values(key, t0, sd[key]) is not None for sd in state_dicts[1:]):
                warnings.append(f"{key}: {dtype} values differ between inputs; taken from the first")
                differing.append(key)
        if getattr(t0, "is_parameter", False) or isinstance(t0, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=bool(t0.requires_grad) and value.is_floating_point())
        stored = sink(value) if sink is not None else value
        out[key] = stored
        done[tie] = stored
        if progress is not None:
            progress(nbytes_of(t0) * len(state_dicts))
    meta = merge_metadata([getattr(sd, "_metadata", None) for sd in state_dicts])
    if meta is not None:
        out._metadata = meta  # type: ignore[attr-defined]
    return out, MergeReport(sources={k: 0 for k in out}, warnings=tuple(warnings), taken_from_first=tuple(differing))


def _check_averageable_tensors(key: str, tensors: Sequence[Any]) -> None:
    """Refuse (UsageError) what --average cannot read as plain values or has no arithmetic for:
    meta, nested, sparse and quantized tensors, and bit-pattern dtypes (bits8, float4_e2m1fn_x2, ...)."""
    for t in tensors:
        if not is_tensor(t):  # extra state: taken from the first input, never averaged
            continue
        kind = tensor_kind(t)
        if kind is not None and kind not in ("conjugate view", "negative view"):
            raise UsageError(f"cannot average {kind_text(t)} tensor {key!r}: only dense tensors are averaged")
        if dtype_name(t) in RAW_BITS_DTYPES:
            raise UsageError(f"cannot average {dtype_name(t)} tensor {key!r}: its bit patterns have no arithmetic")


def _stride(t: Any) -> tuple[int, ...]:
    return tuple(t.stride) if isinstance(t, TensorMeta) else tuple(t.stride())


def _offset(t: Any) -> int:
    return t.storage_offset if isinstance(t, TensorMeta) else int(t.storage_offset())
