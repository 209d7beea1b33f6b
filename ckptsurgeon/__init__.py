"""ckptsurgeon: safe, scriptable surgery on PyTorch checkpoints.

The same pure functions the command line uses, over plain `OrderedDict[str, Tensor]` state_dicts.
Importing this package imports nothing heavy (no torch, typer or rich): each public name below is
loaded from its module on first use, so the CLI's start-up pays only for what a command needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_PUBLIC: dict[str, str] = {
    "find_state_dict": "containers",
    "DiffReport": "diff",
    "diff_state_dicts": "diff",
    "BadCheckpointError": "errors",
    "CheckpointError": "errors",
    "CollisionError": "errors",
    "ConflictError": "errors",
    "ContainerError": "errors",
    "ModelSpecError": "errors",
    "OutputError": "errors",
    "SelectionError": "errors",
    "UnsafeCheckpointError": "errors",
    "UsageError": "errors",
    "Checkpoint": "io",
    "load_checkpoint": "io",
    "save_checkpoint": "io",
    "MergeReport": "merge",
    "OnConflict": "merge",
    "average_state_dicts": "merge",
    "merge_state_dicts": "merge",
    "plan_merge": "merge",
    "compile_selection": "patterns",
    "select_keys": "patterns",
    "RenameRules": "rename",
    "parse_sub": "rename",
    "plan_rename": "rename",
    "InspectReport": "summary",
    "inspect_state_dict": "summary",
    "extract_state_dict": "surgery",
    "rename_state_dict": "surgery",
    "TransplantReport": "transfer",
    "transplant": "transfer",
    "unfreeze": "transfer",
    "ModelReport": "model",
    "check_model": "model",
    "load_model": "model",
}

__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptsurgeon' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:
    from .containers import find_state_dict
    from .diff import DiffReport, diff_state_dicts
    from .errors import (
        BadCheckpointError,
        CheckpointError,
        CollisionError,
        ConflictError,
        ContainerError,
        ModelSpecError,
        OutputError,
        SelectionError,
        UnsafeCheckpointError,
        UsageError,
    )
    from .io import Checkpoint, load_checkpoint, save_checkpoint
    from .merge import MergeReport, OnConflict, average_state_dicts, merge_state_dicts, plan_merge
    from .model import ModelReport, check_model, load_model
    from .patterns import compile_selection, select_keys
    from .rename import RenameRules, parse_sub, plan_rename
    from .summary import InspectReport, inspect_state_dict
    from .surgery import extract_state_dict, rename_state_dict
    from .transfer import TransplantReport, transplant, unfreeze
