"""Classes for tests/test_globals.py: what `--allow-global` must build, and what it must refuse.

None of these modules is refused by name, so each refusal here is by behaviour. Every class that
must be refused would create the file at `self.path` (or its argument) if unpickling ran its code.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple


def _touch(path: str) -> None:
    with open(path, "w") as f:
        f.write("touched")


class Touch:
    """A plain class whose constructor reaches the disk: allowed, but never called with file data."""

    def __init__(self, path: str):
        self.path = path
        _touch(path)


class ReopensInSetstate:
    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _touch(state["path"])


class WritesInDel:
    def __del__(self) -> None:
        if "path" in self.__dict__:
            _touch(self.path)


class LazyAttrs:
    def __getattr__(self, name: str) -> Any:
        _touch(self.__dict__["path"])
        raise AttributeError(name)


class CustomReduce:
    def __reduce__(self) -> Any:
        _touch(self.path)
        return (CustomReduce, ())


class Guarded:
    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        _touch(value)
        self._path = value


class LogHandler(logging.FileHandler):
    """A subclass: refused because a base belongs to logging."""


class DictSubclass(dict):
    """A C base (dict): its construction is out of sight."""


@dataclass(frozen=True)
class Hparams:
    lr: float = 0.1
    layers: tuple[int, ...] = (1, 2)


@dataclass(frozen=True, slots=True)
class Slotted:
    seed: int = 0
    tags: tuple[str, ...] = ()


class Pair(NamedTuple):
    first: int
    second: str


class Mode(enum.Enum):
    TRAIN = "train"
    EVAL = "eval"
