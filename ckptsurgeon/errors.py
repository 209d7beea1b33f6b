"""The one exception family of ckptsurgeon, and the exit codes it maps to.

Every expected failure is a :class:`CheckpointError` subclass carrying its exit code; the CLI maps
them to a one-line message on stderr in one place. Anything else is a bug (exit 3).
"""

from __future__ import annotations

from collections.abc import Iterable

EXIT_OK = 0
EXIT_DIFFERENT = 1  # diff found a difference, or --model found an incompatibility
EXIT_BAD_INPUT = 2  # usage error or bad input
EXIT_INTERNAL = 3  # a bug


def sorted_list(keys: Iterable[str], limit: int = 10) -> str:
    """Render keys for an error message: sorted, repr-quoted, cut after `limit`."""
    items = sorted(keys)
    shown = ", ".join(repr(k) for k in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown


class CheckpointError(Exception):
    """Base of every expected error; `exit_code` is what the CLI exits with, `kind` what
    `--json` error documents call it."""

    exit_code = EXIT_BAD_INPUT
    kind = "error"


class UsageError(CheckpointError):
    """Options that contradict each other or cannot be parsed."""

    kind = "usage"


class BadCheckpointError(CheckpointError):
    """The file is unreadable, not a checkpoint, corrupt, or hostile."""

    kind = "bad_checkpoint"


class UnsafeCheckpointError(BadCheckpointError):
    """The file needs pickle globals outside the safe allowlist."""

    kind = "unsafe_checkpoint"

    def __init__(self, path: str, globals_: Iterable[str]):
        self.path = path
        self.globals = sorted(set(globals_))
        names = ", ".join(self.globals) if self.globals else "(unknown)"
        super().__init__(
            f"{path}: refused to unpickle: the file references globals outside the safe allowlist: "
            f"{names}; --allow-global MODULE.NAME builds a plain data class without calling it, "
            "--unsafe would import and execute code from the file"
        )


class RestrictedPickleError(BadCheckpointError):
    """The pickle uses an opcode or a construct the restricted reader refuses, as torch's
    weights_only loader does (e.g. protocol 4's FRAME); only a full unpickle (`--unsafe`) reads it."""


class ContainerError(CheckpointError):
    """No state_dict, or more than one candidate, inside a checkpoint container."""

    kind = "container"


class SelectionError(CheckpointError):
    """A pattern is invalid or selected nothing."""

    kind = "selection"


class CollisionError(CheckpointError):
    """Two keys would be written under one name."""

    kind = "collision"


class ConflictError(CheckpointError):
    """Merge inputs disagree (a key in several inputs, or keys/shapes differ for --average)."""

    kind = "conflict"


class ModelSpecError(CheckpointError):
    """A --model SPEC or --model-kwargs cannot be turned into an nn.Module."""

    kind = "model_spec"


class OutputError(CheckpointError):
    """The output cannot be written (exists without --force, same file as an input, no space)."""

    kind = "output"


class EngineUnsupported(Exception):
    """The torch-free engine met something it does not model; the caller falls back to torch.

    Not a user-facing error: it never reaches the CLI.
    """
