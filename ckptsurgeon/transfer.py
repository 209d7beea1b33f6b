"""Transfer learning in a few lines: load part of a checkpoint into a model, freeze it, unfreeze later.

`transplant` does the model side of what the CLI does to files: it finds the state_dict (same rules
and `key` as `--key`), renames it (`strip_prefix`, then `add_prefix`, as `ckptsurgeon rename`),
selects keys with the CLI's pattern rules (`conv1` never takes `conv10`), checks the selection
against the real model as `--model` does, copies the selected tensors into the model's existing
parameters and buffers (through ``model.load_state_dict(..., strict=False)``, so the model keeps its
dtype and device and `_metadata` versioning applies), and freezes exactly what it loaded.

Every check runs before the model is touched: when `transplant` raises, the model is unchanged.

Normalisation modules whose running statistics were transplanted are kept in eval mode, so the
statistics do not move while the rest of the model trains. This is done per module instance: the
module's `train` is replaced by a small callable (an instance attribute, found before the class's
method) that runs the class's own `train` (validation, children) and then sets `training = False`.
So ``model.train()`` and ``model.eval()`` work as usual everywhere else, ``module.training`` tells
the truth, and the lock survives ``copy.deepcopy`` and pickling of the whole model. `unfreeze`
removes the attribute again. This module imports torch only inside its functions.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .containers import find_state_dict, format_key_path
from .errors import BadCheckpointError, ConflictError, SelectionError, UsageError, sorted_list
from .io import Checkpoint, as_torch, load_checkpoint
from .patterns import select_keys, unmatched_includes
from .rename import RenameRules
from .surgery import extract_state_dict, rename_state_dict

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["TransplantReport", "transplant", "unfreeze"]

log = logging.getLogger("ckptsurgeon")

Patterns = str | Sequence[str] | None
Shape = tuple[int, ...]


@dataclass(frozen=True)
class TransplantReport:
    """What `transplant` did to a model. All names are model names (after any renaming).

    `loaded`: keys whose tensors were copied into the model. `missing`: model keys that were not
    loaded (they keep their current, e.g. freshly initialised, values and stay trainable); a key
    tied to a loaded tensor is not missing. `unexpected`: selected checkpoint keys the model does
    not have. `skipped`: shape mismatches left out with ``strict_shapes=False``, as
    ``(key, checkpoint_shape, model_shape)``. `frozen`: loaded keys that name parameters, now
    ``requires_grad=False`` (a tied parameter is listed under each name the checkpoint used).
    `frozen_norm_modules`: normalisation modules kept in eval mode. `state_dict_key`: where the
    state_dict was found in its container (None for a bare state_dict).

    The report holds names and a weak reference to the model (it never keeps a model alive):
    `trainable_parameters()` asks the model each time, so it stays right after `unfreeze`.
    """

    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    skipped: tuple[tuple[str, Shape, Shape], ...]
    frozen: tuple[str, ...]
    frozen_norm_modules: tuple[str, ...]
    state_dict_key: str | None
    model_ref: weakref.ref[nn.Module] | None = field(default=None, repr=False, compare=False)

    def trainable_parameters(self, model: nn.Module | None = None) -> list[torch.nn.Parameter]:
        """The parameters of the transplanted model (or of `model`) that still require grad, each
        tied parameter once: hand them to an optimizer as they are.

        >>> optimizer = torch.optim.SGD(report.trainable_parameters(), lr=0.1)  # doctest: +SKIP
        """
        if model is None:
            model = self.model_ref() if self.model_ref is not None else None
            if model is None:
                raise UsageError("trainable_parameters(): the transplanted model no longer exists; pass the model")
        return [p for p in model.parameters() if p.requires_grad]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (shapes as lists)."""
        return {
            "loaded": list(self.loaded),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "skipped": [{"key": k, "checkpoint": list(ckpt), "model": list(model)} for k, ckpt, model in self.skipped],
            "frozen": list(self.frozen),
            "frozen_norm_modules": list(self.frozen_norm_modules),
            "state_dict_key": self.state_dict_key,
        }


# ------------------------------------------------------------------------------- norm eval lock


class _NormStatsLock:
    """Installed as a norm module's `train`: the module obeys, then goes back to eval mode."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        type(self.module).train(self.module, mode)  # the class's own train: checks, children
        self.module.training = False
        return self.module


def _is_locked(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("train"), _NormStatsLock)


def _lock(module: nn.Module) -> None:
    if not _is_locked(module):
        module.__dict__["train"] = _NormStatsLock(module)
    module.training = False


def _release(model: nn.Module, name: str, module: nn.Module) -> None:
    del module.__dict__["train"]
    if name:  # follow the parent's mode, as model.train()/eval() would have set it
        module.train(model.get_submodule(name.rpartition(".")[0]).training)


def _has_running_stats(module: nn.Module) -> bool:
    from torch.nn.modules.batchnorm import _NormBase

    return isinstance(module, _NormBase) and getattr(module, "running_mean", None) is not None


def _own_state_keys(name: str, module: nn.Module) -> list[str]:
    """The state_dict keys of a module's own parameters and persistent buffers."""
    prefix = f"{name}." if name else ""
    keys = [prefix + n for n, p in module._parameters.items() if p is not None]
    keys += [
        prefix + n for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set
    ]
    return keys


# ------------------------------------------------------------------------------------- helpers


def _patterns(value: Patterns) -> tuple[str, ...]:
    """`"fc"` and `["fc"]` mean the same (a bare string is one pattern, not its characters)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _find(checkpoint: Any, key: str | None, unsafe: bool) -> tuple[Mapping[str, Any], str | None, str]:
    """(state_dict with torch tensors, where it was found, a label for messages)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        ckpt = load_checkpoint(checkpoint, unsafe=unsafe, key=key)
        found, where, label = ckpt.state_dict, ckpt.state_dict_key, str(ckpt.path)
    elif isinstance(checkpoint, Checkpoint):
        path, found = find_state_dict(checkpoint.container, key)
        where, label = (format_key_path(path) if path else None), str(checkpoint.path)
    else:
        path, found = find_state_dict(checkpoint, key)
        where, label = (format_key_path(path) if path else None), "in-memory checkpoint"
    metadata = getattr(found, "_metadata", None)
    state_dict = as_torch(found)
    if metadata is not None and getattr(state_dict, "_metadata", None) is None:
        state_dict = OrderedDict(state_dict)
        state_dict._metadata = metadata  # type: ignore[attr-defined]
    return state_dict, where, label


def _format_shapes(items: Sequence[tuple[str, Shape, Shape]]) -> str:
    shown = "; ".join(f"{k!r} checkpoint {tuple(c)} vs model {tuple(m)}" for k, c, m in sorted(items)[:10])
    if len(items) > 10:
        shown += f"; ... ({len(items) - 10} more)"
    return shown


def _rename_hint(renames: Sequence[Any]) -> str:
    if not renames:
        return ""
    best = renames[0]
    pairs = (("strip_prefix", best.strip_prefix), ("add_prefix", best.add_prefix))
    options = [f"{name}={value!r}" for name, value in pairs if value]
    return f"; try {', '.join(options)} ({best.matched} keys would match)"


def _check_tensors(label: str, selected: Mapping[str, Any], model_state: Mapping[str, Any]) -> None:
    """Refuse what `copy_` would fail on halfway through: tensors without data, layout changes."""
    import torch

    for k, v in selected.items():
        if not isinstance(v, torch.Tensor):
            raise BadCheckpointError(f"{label}: {k!r} is a {type(v).__name__}, not a tensor")
        if v.device.type == "meta":
            raise BadCheckpointError(f"{label}: {k!r} is a meta tensor (it has no data to load)")
        target = model_state.get(k)
        if isinstance(target, torch.Tensor) and target.layout != v.layout:
            raise ConflictError(f"{label}: {k!r} is {v.layout} in the checkpoint but {target.layout} in the model")


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _check_tied(label: str, selected: Mapping[str, Any], model_state: Mapping[str, Any]) -> None:
    """Several selected keys that name one model tensor must hold equal values (else one would win)."""

    groups: dict[int, list[str]] = {}
    for k in selected:
        if k in model_state:
            groups.setdefault(id(model_state[k]), []).append(k)
    for keys in groups.values():
        first = selected[keys[0]]
        differ = [k for k in keys[1:] if not _same_values(selected[k], first)]
        if differ:
            raise ConflictError(
                f"{label}: {sorted_list(keys)} name one tied model tensor but hold different values "
                "in the checkpoint; exclude all but one of them"
            )


# ------------------------------------------------------------------------------------ transplant


def transplant(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | Mapping[str, Any] | Checkpoint,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    regex: bool = False,
    key: str | None = None,
    strip_prefix: str | Sequence[str] | None = None,
    add_prefix: str | None = None,
    freeze: bool = True,
    freeze_batchnorm_stats: bool | None = None,
    strict_shapes: bool = True,
    unsafe: bool = False,
) -> TransplantReport:
    """Load the selected part of `checkpoint` into `model` and freeze what was loaded.

    `checkpoint` is a path (loaded safely, like the CLI; `unsafe=True` allows arbitrary pickles),
    a loaded `Checkpoint`, or an in-memory state_dict or container. `key` picks the state_dict in a
    container (as `--key`). Keys are renamed (`strip_prefix`, a str or several, then `add_prefix`)
    and then selected with `include` / `exclude` patterns (the CLI's rules, over the renamed keys,
    i.e. the model's names; a bare string is one pattern).

    With `freeze`, every loaded parameter gets ``requires_grad=False``. With
    `freeze_batchnorm_stats` (default: same as `freeze`), every normalisation module with running
    statistics (BatchNorm*, SyncBatchNorm, InstanceNorm with ``track_running_stats``) whose
    parameters and buffers were all loaded stays in eval mode, even after ``model.train()``, until
    `unfreeze` releases it.

    Raises (before touching the model): SelectionError when nothing is selected or nothing selected
    names a model key; ConflictError on shape mismatches (sorted, both shapes; pass
    ``strict_shapes=False`` to skip them, e.g. a head with another number of classes), on tied keys
    with different values, or when torch's loader would refuse the selection; the loading errors
    of `load_checkpoint` / `find_state_dict`.

    >>> import torch
    >>> from torch import nn
    >>> source = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 5))
    >>> report = transplant(model, source.state_dict(), exclude="2")
    >>> report.loaded
    ('0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var', '1.num_batches_tracked')
    >>> report.missing, report.frozen_norm_modules
    (('2.weight', '2.bias'), ('1',))
    >>> [n for n, p in model.named_parameters() if p.requires_grad]
    ['2.weight', '2.bias']
    >>> model.train().training, model[1].training
    (True, False)
    >>> optimizer = torch.optim.SGD(report.trainable_parameters(), lr=0.1)
    """
    from .model import check_model

    if freeze_batchnorm_stats is None:
        freeze_batchnorm_stats = freeze
    state_dict, where, label = _find(checkpoint, key, unsafe)
    if not state_dict:
        raise SelectionError(f"{label}: the state_dict is empty")

    strips = (strip_prefix,) if isinstance(strip_prefix, str) else tuple(strip_prefix or ())
    rules = RenameRules(strip_prefixes=strips, add_prefix=add_prefix or None)
    if not rules.is_empty:
        state_dict, _ = rename_state_dict(state_dict, rules)

    includes, excludes = _patterns(include), _patterns(exclude)
    keys = select_keys(state_dict, includes, excludes, regex=regex)
    if not keys:
        raise SelectionError(
            f"{label}: nothing selected: no key of {len(state_dict)} matches "
            f"include={list(includes)} exclude={list(excludes)}"
            + (f" (keys look like {sorted_list(list(state_dict)[:3], limit=3)})" if state_dict else "")
        )
    for pattern in unmatched_includes(state_dict, includes, regex=regex):
        log.warning("%s: include pattern %r matches no key", label, pattern)
    selected = extract_state_dict(state_dict, keys)
    metadata = getattr(selected, "_metadata", None)

    # Plan: judge the selection against the real model as its loader will, without touching it.
    model_state = model.state_dict(keep_vars=True)
    _check_tensors(label, selected, model_state)
    trial = check_model({k: tuple(v.shape) for k, v in selected.items()}, model, metadata=metadata)
    skipped = tuple((m.key, m.checkpoint, m.model) for m in trial.shape_mismatches)
    if skipped and strict_shapes:
        raise ConflictError(
            f"{label}: shape mismatch for {len(skipped)} key(s): {_format_shapes(skipped)}; "
            "exclude them or pass strict_shapes=False to skip them"
        )
    if trial.errors:
        raise ConflictError(f"{label}: the model's load_state_dict refuses the selection: {trial.errors[0]}")
    skipped_keys = {k for k, _, _ in skipped}
    to_load: OrderedDict[str, Any] = OrderedDict((k, v) for k, v in selected.items() if k not in skipped_keys)
    unexpected_plan = set(trial.unexpected_keys)
    if not any(k not in unexpected_plan for k in to_load):
        if not to_load:
            reason = f"all {len(skipped)} selected key(s) are shape mismatches: {_format_shapes(skipped)}"
        else:
            reason = (
                f"none of the {len(to_load)} selected key(s) names a model key "
                f"(checkpoint keys like {sorted_list(list(to_load)[:2])}, model keys like "
                f"{sorted_list(list(model_state)[:2])}){_rename_hint(trial.renames)}"
            )
        raise SelectionError(f"{label}: nothing to load: {reason}")
    _check_tied(label, {k: v for k, v in to_load.items() if k not in unexpected_plan}, model_state)

    # Apply.
    if metadata is not None:
        # copies: torch's loader may write into the per-module dicts
        to_load._metadata = OrderedDict((k, dict(v)) for k, v in metadata.items())  # type: ignore[attr-defined]
    result = model.load_state_dict(to_load, strict=False)
    unexpected = tuple(result.unexpected_keys)
    unexpected_set = set(unexpected)
    loaded = tuple(k for k in to_load if k not in unexpected_set)
    loaded_ids = {id(model_state[k]) for k in loaded if k in model_state}
    missing = tuple(k for k in result.missing_keys if not (k in model_state and id(model_state[k]) in loaded_ids))

    frozen: tuple[str, ...] = ()
    if freeze:
        params = dict(model.named_parameters(remove_duplicate=False))
        frozen = tuple(k for k in loaded if k in params)
        for k in frozen:
            params[k].requires_grad_(False)

    locked: list[str] = []
    if freeze_batchnorm_stats:
        missing_set, loaded_set = set(missing), set(loaded)
        for name, module in model.named_modules():
            if not _has_running_stats(module):
                continue
            own = _own_state_keys(name, module)
            touched = any(k in loaded_set or id(model_state.get(k)) in loaded_ids for k in own)
            if touched and not any(k in missing_set for k in own):
                _lock(module)
                locked.append(name)

    return TransplantReport(
        loaded=loaded,
        missing=missing,
        unexpected=unexpected,
        skipped=skipped,
        frozen=frozen,
        frozen_norm_modules=tuple(locked),
        state_dict_key=where,
        model_ref=weakref.ref(model),
    )


# -------------------------------------------------------------------------------------- unfreeze


def unfreeze(model: nn.Module, include: Patterns = None, exclude: Patterns = None, *, regex: bool = False) -> list[str]:
    """Make frozen parameters trainable again (gradual unfreezing); returns the names unfrozen.

    Patterns follow the CLI's rules over parameter names (no patterns: every parameter). A tied
    parameter is one object: unfreezing it under one name unfreezes it under all; the result
    lists the matched names whose parameter was frozen. A normalisation module kept in eval mode
    by `transplant` is released (it follows the model's train/eval mode again) when the patterns
    match it and all its parameters are now trainable. Patterns that match nothing raise
    SelectionError.

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    >>> _ = model.requires_grad_(False)
    >>> unfreeze(model, "1")
    ['1.weight', '1.bias']
    """
    named = list(model.named_parameters(remove_duplicate=False))
    locked = [(name, m) for name, m in model.named_modules() if _is_locked(m)]
    norm_keys = [k for name, m in locked for k in _own_state_keys(name, m)]
    universe = list(dict.fromkeys([n for n, _ in named] + norm_keys))
    includes, excludes = _patterns(include), _patterns(exclude)
    chosen = set(select_keys(universe, includes, excludes, regex=regex))
    if not chosen:
        raise SelectionError(f"unfreeze: no parameter matches include={list(includes)} exclude={list(excludes)}")
    # integer parameters can never require grad: they are left alone
    frozen_ids = {id(p) for _, p in named if not p.requires_grad and (p.is_floating_point() or p.is_complex())}
    unfrozen = [n for n, p in named if n in chosen and id(p) in frozen_ids]
    for n, p in named:
        if n in chosen and id(p) in frozen_ids:
            p.requires_grad_(True)
    for name, module in locked:
        own = _own_state_keys(name, module)
        if any(k in chosen for k in own) and all(p.requires_grad for p in module.parameters(recurse=False)):
            _release(model, name, module)
    return unfrozen
