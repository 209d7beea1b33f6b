"""ckptsurgeon: safe, scriptable surgery on PyTorch checkpoints.

The same pure functions the command line uses, over plain `OrderedDict[str, Tensor]` state_dicts.
Importing this package does not import torch, typer or rich.
"""

from ._version import __version__
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
from .patterns import compile_selection, select_keys
from .rename import RenameRules, parse_sub, plan_rename
from .summary import InspectReport, inspect_state_dict
from .surgery import extract_state_dict, rename_state_dict
from .transfer import TransplantReport, transplant, unfreeze

__all__ = [
    "__version__",
    "BadCheckpointError",
    "Checkpoint",
    "CheckpointError",
    "CollisionError",
    "ConflictError",
    "ContainerError",
    "DiffReport",
    "InspectReport",
    "MergeReport",
    "ModelSpecError",
    "OnConflict",
    "OutputError",
    "RenameRules",
    "SelectionError",
    "TransplantReport",
    "UnsafeCheckpointError",
    "UsageError",
    "average_state_dicts",
    "compile_selection",
    "diff_state_dicts",
    "extract_state_dict",
    "find_state_dict",
    "inspect_state_dict",
    "load_checkpoint",
    "merge_state_dicts",
    "parse_sub",
    "plan_merge",
    "plan_rename",
    "rename_state_dict",
    "save_checkpoint",
    "select_keys",
    "transplant",
    "unfreeze",
]
