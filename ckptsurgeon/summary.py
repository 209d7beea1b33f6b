"""What `inspect` reports about a state_dict: pure, from tensor metadata only (no tensor data)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .engine.meta import DTYPE_ITEMSIZE, TensorMeta
from .tensors import (
    dtype_name,
    is_tensor,
    kind_facts,
    nbytes_of,
    numel_of,
    shape_of,
    shared_storage_groups,
)

if TYPE_CHECKING:
    from .engine.sharded import Shard

SCHEMA_VERSION = 1


class TensorRow(NamedTuple):
    key: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    nbytes: int
    kind: Mapping[str, Any] | None = None  # sparse, quantized, conj/neg views: `tensors.kind_facts`

    @property
    def dtype_text(self) -> str:
        """The dtype as the table shows it: `float32`, `sparse_csr float32 (nnz 11)`,
        `quantized quint8 (per_tensor_affine)`, `conjugate view complex64`."""
        if self.kind is None:
            return self.dtype
        text = f"{self.kind['kind']} {self.dtype}"
        if "nnz" in self.kind:
            return f"{text} (nnz {self.kind['nnz']:,})"
        if "qscheme" in self.kind:
            return f"{text} ({self.kind['qscheme']})"
        return text

    def to_dict(self) -> dict[str, Any]:
        data = {
            "key": self.key,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "numel": self.numel,
            "nbytes": self.nbytes,
        }
        if self.kind is not None:
            data.update(self.kind)
        return data


class DtypeTotal(NamedTuple):
    dtype: str
    num_tensors: int
    num_elements: int
    total_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "num_tensors": self.num_tensors,
            "num_elements": self.num_elements,
            "total_bytes": self.total_bytes,
        }


class InspectReport:
    """Rows, totals, per-dtype breakdown, container entries and storage sharing of a state_dict.

    `extra_state` holds the state_dict's non-tensor entries (a module's `get_extra_state`, key
    `<module>._extra_state`) as (key, short description); they are not rows and not counted.
    For an input of several files (Hugging Face shards), `shards` lists them and `tensor_files`
    gives each key's file (both None for one file).
    """

    __slots__ = (
        "format",
        "state_dict_key",
        "tensors",
        "dtypes",
        "shared_storage",
        "other_entries",
        "num_selected_of",
        "model",
        "extra_state",
        "opaque_entries",
        "shards",
        "tensor_files",
    )

    def __init__(
        self,
        format: str,
        state_dict_key: str | None,
        tensors: tuple[TensorRow, ...],
        dtypes: tuple[DtypeTotal, ...],
        shared_storage: tuple[tuple[str, ...], ...],
        other_entries: tuple[tuple[str, str], ...] = (),
        num_selected_of: int = 0,  # size of the whole state_dict (rows may be a selection)
        model: Mapping[str, Any] | None = None,
        extra_state: tuple[tuple[str, str], ...] = (),
        opaque_entries: tuple[Any, ...] = (),  # containers.OpaqueEntry: values read, not built
        shards: Sequence[Shard] | None = None,
        tensor_files: Mapping[str, str] | None = None,
    ) -> None:
        self.format = format
        self.state_dict_key = state_dict_key
        self.tensors = tensors
        self.dtypes = dtypes
        self.shared_storage = shared_storage
        self.other_entries = other_entries
        self.num_selected_of = num_selected_of
        self.model = model
        self.extra_state = extra_state
        self.opaque_entries = opaque_entries
        self.shards = tuple(shards) if shards is not None else None
        self.tensor_files = tensor_files

    @property
    def num_tensors(self) -> int:
        return len(self.tensors)

    @property
    def num_elements(self) -> int:
        return sum(r.numel for r in self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "format": self.format,
            "state_dict_key": self.state_dict_key,
            "tensors": [r.to_dict() for r in self.tensors],
            "num_tensors": self.num_tensors,
            "num_elements": self.num_elements,
            "total_bytes": self.total_bytes,
            "num_tensors_in_state_dict": self.num_selected_of,
            "dtypes": [d.to_dict() for d in self.dtypes],
            "shared_storage": [list(g) for g in self.shared_storage],
            "other_entries": {k: v for k, v in self.other_entries},
            "extra_state": {k: v for k, v in self.extra_state},
            "opaque_entries": [e.to_dict() for e in self.opaque_entries],
        }
        if self.shards is not None:
            out["shards"] = [s.to_dict() for s in self.shards]
        if self.tensor_files is not None:
            for row in out["tensors"]:
                row["file"] = self.tensor_files.get(row["key"])
        if self.model is not None:
            out.update(self.model)
        return out


def _row(key: str, t: Any) -> TensorRow:
    if type(t) is TensorMeta:  # the engine's tensors, tens of thousands at a time: no adapters
        numel = t.numel
        return TensorRow(key, t.shape, t.dtype, numel, numel * DTYPE_ITEMSIZE[t.dtype])
    return TensorRow(key, shape_of(t), dtype_name(t), numel_of(t), nbytes_of(t), kind_facts(t))


def inspect_state_dict(
    state_dict: Mapping[str, Any],
    keys: Sequence[str],
    *,
    format: str,
    state_dict_key: str | None = None,
    other_entries: Sequence[tuple[str, str]] = (),
    opaque_entries: Sequence[Any] = (),
    shards: Sequence[Shard] | None = None,
    tensor_files: Mapping[str, str] | None = None,
) -> InspectReport:
    """Summarise the tensors of `state_dict` named by `keys` (a selection, in order); selected
    non-tensor entries (extra state) are listed apart, with a short description. `shards` and
    `tensor_files` describe an input of several files (see InspectReport)."""
    values = [state_dict[k] for k in keys]
    num_in_state_dict = len(state_dict)
    extra: tuple[tuple[str, str], ...] = ()
    if not all(type(v) is TensorMeta or is_tensor(v) for v in values) or (
        len(values) != len(state_dict) and not all(map(is_tensor, state_dict.values()))
    ):
        from .containers import describe_value

        extra = tuple((k, describe_value(v)) for k, v in zip(keys, values) if not is_tensor(v))
        keys = [k for k, v in zip(keys, values) if is_tensor(v)]
        values = [state_dict[k] for k in keys]
        num_in_state_dict = sum(1 for v in state_dict.values() if is_tensor(v))
    rows = tuple(map(_row, keys, values))
    totals: dict[str, list[int]] = {}
    for r in rows:
        acc = totals.setdefault(r.dtype, [0, 0, 0])
        acc[0] += 1
        acc[1] += r.numel
        acc[2] += r.nbytes
    dtypes = tuple(DtypeTotal(d, *v) for d, v in sorted(totals.items(), key=lambda kv: -kv[1][2]))
    shared = shared_storage_groups(dict(zip(keys, values)))
    return InspectReport(
        format=format,
        state_dict_key=state_dict_key,
        tensors=rows,
        dtypes=dtypes,
        shared_storage=tuple(tuple(g) for g in shared),
        other_entries=tuple(other_entries),
        num_selected_of=num_in_state_dict,
        extra_state=extra,
        opaque_entries=tuple(opaque_entries),
        shards=shards,
        tensor_files=tensor_files,
    )
