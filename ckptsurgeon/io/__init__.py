"""All checkpoint file I/O: nothing else in ckptsurgeon opens or writes a checkpoint file.

* :mod:`.load`: :func:`load_checkpoint` (safe loading through one open file, the torch fallback,
  finding the state_dict), :class:`Checkpoint`, :func:`verify_data`;
* :mod:`.save`: :func:`save_checkpoint` / :func:`write_checkpoint` (torch zip or safetensors by
  byte copy, torch.save for torch tensors, the Hub's sharded directories, `--verify`),
  :func:`output_format`, :func:`parse_size`, :func:`plan_shards`;
* :mod:`.atomic`: :func:`atomic_output` (temp file, fsync, rename), :func:`atomic_directory` (temp
  directory, swapped in), :func:`check_output`, the clean-up of temporary files a killed run left;
* :mod:`.stage`: :func:`staged_tensors`, results parked on disk one tensor at a time.

Every public name (and the private helpers tests reach) is importable from `ckptsurgeon.io`.
"""

# The private helpers tests reach are re-exported too (`name as name`). A monkeypatch must go to the
# module that calls the helper (`ckptsurgeon.io.atomic._temp_beside`): a name rebound here is unseen.
from .atomic import TMP_MARK, atomic_directory, atomic_output, check_output, layout_intruders, refuse_non_regular
from .atomic import _temp_beside as _temp_beside
from .load import Checkpoint, as_torch, iter_tensors, load_checkpoint, verify_data
from .load import _read_raw as _read_raw
from .save import (
    OutputFormat,
    ShardPlan,
    Written,
    compact_views,
    make_state_dict,
    output_format,
    parse_size,
    plan_shards,
    save_checkpoint,
    with_state_dict,
    write_checkpoint,
)
from .save import _try_raw_write as _try_raw_write
from .save import _write_torch as _write_torch
from .stage import TensorStage, staged_tensors

__all__ = [
    "TMP_MARK",
    "Checkpoint",
    "OutputFormat",
    "ShardPlan",
    "TensorStage",
    "Written",
    "as_torch",
    "atomic_directory",
    "atomic_output",
    "check_output",
    "compact_views",
    "iter_tensors",
    "layout_intruders",
    "load_checkpoint",
    "make_state_dict",
    "output_format",
    "parse_size",
    "plan_shards",
    "refuse_non_regular",
    "save_checkpoint",
    "staged_tensors",
    "verify_data",
    "with_state_dict",
    "write_checkpoint",
]
