"""Classes for tests/test_opaque.py: what training code puts in a checkpoint's container.

Importing this module with CKPTSURGEON_IMPORT_MARKER set creates that file, and `touch(path)`
creates `path`: a command that imported or called anything named here would leave a file behind.
"""

from __future__ import annotations

import collections
import enum
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

if os.environ.get("CKPTSURGEON_IMPORT_MARKER"):
    with open(os.environ["CKPTSURGEON_IMPORT_MARKER"], "w") as _f:
        _f.write("opaque_classes was imported")


def touch(path: str) -> str:
    """A function a pickle can REDUCE: running it leaves a file."""
    with open(path, "w") as f:
        f.write("touched")
    return path


class AnyNode:
    """A value node of DictConfig below, pointing back to its parent (a reference cycle)."""

    def __init__(self, value: Any, parent: DictConfig):
        self._val = value
        self._parent = parent


class DictConfig:
    """Shaped like OmegaConf's DictConfig: its values are nodes that point back to it, its metadata
    names builtin types (`dict`, `int`) and `typing.Any`, its flags are a defaultdict, and it
    pickles a state of its own making."""

    def __init__(self, content: dict[str, Any], flags: dict[str, bool] | None = None):
        self._metadata = {"object_type": dict, "key_type": typing.Any, "element_type": int}
        self._flags = collections.defaultdict(bool, flags or {})
        self._content = {k: AnyNode(v, self) for k, v in content.items()}

    def __getstate__(self) -> dict[str, Any]:
        return {"_metadata": self._metadata, "_flags": self._flags, "_content": self._content}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is DictConfig
            and other._metadata == self._metadata
            and other._flags == self._flags
            and {k: n._val for k, n in other._content.items()} == {k: n._val for k, n in self._content.items()}
            and all(n._parent is other for n in other._content.values())
        )


class ZeroStageEnum(enum.IntEnum):
    """As DeepSpeed's: a model-state file stores the stage as this enum."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class LossScaler:
    """As DeepSpeed's dynamic loss scaler: plain attributes."""

    def __init__(self, scale: float = 65536.0):
        self.cur_scale = scale
        self.cur_iter = 0
        self.history: list[float] = [scale]

    def __eq__(self, other: object) -> bool:
        return type(other) is LossScaler and vars(other) == vars(self)


@dataclass
class TrainConfig:
    lr: float = 0.1
    layers: list[int] = field(default_factory=lambda: [64, 32])
    name: str = "cnn"


class AttributeDict(dict):  # type: ignore[type-arg]
    """As Lightning's AttributeDict: a dict subclass (pickled as NEWOBJ + SETITEMS)."""


class Collection(list):  # type: ignore[type-arg]
    """A list subclass (pickled as NEWOBJ + APPENDS)."""


class MyTensor(torch.Tensor):
    """A tensor subclass: a tensor that depends on a global outside the allowlist."""
