"""Classes for tests/test_opaque.py: what training code puts in a checkpoint's container.

Importing this module with CKPTSURGEON_IMPORT_MARKER set creates that file, and `touch(path)`
creates `path`: a command that imported or called anything named here would leave a file behind.
"""

from __future__ import annotations

import enum
import os
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


class DictConfig:
    """Shaped like OmegaConf's DictConfig: content and flags in a state of its own making."""

    def __init__(self, content: dict[str, Any], flags: dict[str, bool] | None = None):
        self._content = dict(content)
        self._flags = dict(flags or {})

    def __getstate__(self) -> dict[str, Any]:
        return {"_content": self._content, "_flags": self._flags}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __eq__(self, other: object) -> bool:
        return type(other) is DictConfig and vars(other) == vars(self)


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
