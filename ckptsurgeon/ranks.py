"""The torchrun world: which rank this process is, how many there are, and the few collectives a
sharded writer uses to split its shards across them.

`torchrun` (torch.distributed.run) starts one process per rank with `RANK` and `WORLD_SIZE` (and
`MASTER_ADDR`/`MASTER_PORT`, or its agent's store) in the environment. A writer whose output is a
directory of shards runs on every rank: each rank writes the shards `assign_shards` gives it into
the directory rank 0 opened and named (`team_directory`: a temporary directory beside OUT, or
OUT's prefix in an object store); every rank then
reports its outcome, and rank 0 writes the index last and swaps the directory into place only when
every rank succeeded. Every other command runs on rank 0 alone (the CLI decides).

torch.distributed is imported here only, and only when a sharded write starts under torchrun: the
gloo process group is made then, with a bounded timeout (`CKPTSURGEON_DIST_TIMEOUT` seconds,
default 1800), which bounds every wait for another rank.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Generic, NamedTuple, TypeVar

from .errors import EXIT_INTERNAL, CheckpointError, OutputError, UsageError

__all__ = ["RankFailed", "World", "all_gather", "assign_shards", "team_directory", "world"]

TIMEOUT_ENV = "CKPTSURGEON_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0  # seconds: the longest a rank waits for the others (a slower rank's shards)


class World(NamedTuple):
    """This process's rank and the number of ranks (1: not under torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0


SOLO = World()


def world() -> World:
    """The world torchrun describes in the environment (`RANK`, `WORLD_SIZE`); one rank without it.
    Values that do not make sense are a UsageError."""
    size_text, rank_text = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    try:
        size, rank = int(size_text), int(rank_text)
    except ValueError:
        raise UsageError(f"WORLD_SIZE={size_text!r}, RANK={rank_text!r}: expected whole numbers") from None
    if size < 1 or not 0 <= rank < size:
        raise UsageError(f"WORLD_SIZE={size}, RANK={rank}: expected 0 <= RANK < WORLD_SIZE")
    return World(rank, size)


class RankFailed(CheckpointError):
    """Another rank failed (its exit code and one-line message are carried over): this rank stops too."""

    kind = "rank_failed"

    def __init__(self, rank: int, exit_code: int, message: str) -> None:
        super().__init__(f"rank {rank} failed: {message}")
        self.rank = rank
        self.exit_code = exit_code


class RankError(OutputError):
    """The ranks lost touch (a rank died, or the timeout passed): nothing is written."""


# An outcome as the ranks exchange it: None (done), or [rank, exit code, one-line message]
Outcome = Sequence[Any] | None


def assign_shards(sizes: Sequence[int], ranks: int) -> list[int]:
    """The rank that writes each shard (by position in `sizes`, the shards' bytes): the biggest
    first, each to the least-loaded rank (the lowest rank among equals). Deterministic: every rank
    computes the same assignment from the same plan."""
    loads = [0] * ranks
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (loads[r], r))
        owner[i] = r
        loads[r] += sizes[i]
    return owner


def _timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 10**9:  # also NaN and inf: a wait must end
        raise UsageError(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds > 0")
    return seconds


def _dist() -> Any:
    """torch.distributed with this process's gloo group, made on first use (every rank must get
    here: making it waits for all of them, up to the timeout)."""
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=_timeout())
        try:
            dist.init_process_group("gloo", timeout=timeout)
        except Exception as exc:  # noqa: BLE001 (torch raises RuntimeError, DistError, ValueError, ...)
            raise RankError(f"cannot join the other ranks (torch.distributed, gloo): {_one_line(exc)}") from None
        import atexit

        atexit.register(_close)
    return dist


def _close() -> None:
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


def _one_line(exc: BaseException) -> str:
    """The cause in `exc`'s first sentence, without gloo's `[source.cc:123]` prefix."""
    import re

    lines = str(exc).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else ""
    return text.split(". ", 1)[0].rstrip(".") or type(exc).__name__


# The values the ranks exchange are JSON (strings, numbers, lists: tuples come back as lists), sent
# as byte tensors: no rank unpickles what arrives from the network (torch's *_object collectives do).


def broadcast(w: World, value: Any) -> Any:
    """Rank 0's `value` (JSON), on every rank."""
    if not w.distributed:
        return value
    dist = _dist()
    import torch

    try:
        data = _encoded(value if w.leader else None)
        length = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(length, src=0)
        buffer = data if w.leader else torch.empty(int(length.item()), dtype=torch.uint8)
        dist.broadcast(buffer, src=0)
    except Exception as exc:  # noqa: BLE001 (gloo raises RuntimeError, DistError, ...)
        raise RankError(f"rank {w.rank}: lost touch with the other ranks: {_one_line(exc)}") from None
    return _decoded(buffer)


def all_gather(w: World, value: Any) -> list[Any]:
    """Every rank's `value` (JSON), in rank order, on every rank."""
    if not w.distributed:
        return [value]
    dist = _dist()
    import torch

    try:
        data = _encoded(value)
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(w.size)]
        dist.all_gather(lengths, torch.tensor([len(data)], dtype=torch.int64))
        longest = max(int(n.item()) for n in lengths)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: len(data)] = data
        buffers = [torch.empty(longest, dtype=torch.uint8) for _ in range(w.size)]
        dist.all_gather(buffers, padded)
    except Exception as exc:  # noqa: BLE001
        raise RankError(f"rank {w.rank}: lost touch with the other ranks: {_one_line(exc)}") from None
    return [_decoded(b[: int(n.item())]) for b, n in zip(buffers, lengths)]


def _encoded(value: Any) -> Any:
    """`value` as JSON in a uint8 tensor."""
    import json

    import torch

    return torch.frombuffer(bytearray(json.dumps(value).encode("utf-8")), dtype=torch.uint8)


def _decoded(buffer: Any) -> Any:
    import json

    return json.loads(buffer.numpy().tobytes().decode("utf-8"))


def _outcome(w: World, exc: BaseException) -> Outcome:
    if isinstance(exc, RankFailed):
        return None  # not this rank's failure: the one that failed says so
    if isinstance(exc, CheckpointError):
        return (w.rank, exc.exit_code, str(exc))
    return (w.rank, EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {_one_line(exc)}")


def _raise_failed(outcomes: Sequence[Outcome]) -> None:
    """RankFailed for the first rank that failed (its code and message); nothing if none did."""
    for outcome in outcomes:
        if outcome is not None:
            raise RankFailed(*outcome)


D = TypeVar("D")  # what the ranks write into: a directory (Path), or a target object over one


class Team(Generic[D]):
    """The ranks writing one directory: `directory` (the same directory, or a target writing into
    it, on every rank), which of the shards are this rank's (`mine`), and `gather`, where every
    rank reports its outcome and learns everyone's files. `writes_index`: this rank writes the
    index (rank 0)."""

    def __init__(self, w: World, directory: D) -> None:
        self.world = w
        self.directory = directory
        self.gathered = False

    @property
    def writes_index(self) -> bool:
        return self.world.leader

    def mine(self, sizes: Sequence[int]) -> list[int]:
        """The positions of this rank's shards among all the shards (`sizes`: their bytes)."""
        owner = assign_shards(sizes, self.world.size)
        return [i for i, r in enumerate(owner) if r == self.world.rank]

    def gather(self, done: Any) -> list[Any]:
        """Every rank's `done` (what it wrote), in rank order, once every rank has finished its
        shards; RankFailed (the failing rank's code and message) on every rank if one failed."""
        results = all_gather(self.world, (None, done))
        self.gathered = True
        _raise_failed([outcome for outcome, _ in results])
        return [value for _, value in results]

    def _fail(self, exc: BaseException) -> None:
        """Report this rank's failure to the others, if they still wait for this rank's outcome."""
        if not self.gathered:
            self.gathered = True
            with contextlib.suppress(RankError):
                all_gather(self.world, (_outcome(self.world, exc), None))


@contextlib.contextmanager
def team_directory(
    w: World,
    open_directory: Callable[[], AbstractContextManager[D]],
    *,
    share: Callable[[D], str],
    join: Callable[[str], AbstractContextManager[D]],
) -> Iterator[Team[D]]:
    """A Team writing into the directory `open_directory()` gives rank 0 (an atomic directory:
    filled, then swapped into place when its context ends without error). One process: just that.

    Under torchrun rank 0 opens it and broadcasts `share(directory)` (its path, or its URL); every
    other rank writes through `join(that)` (the same directory); every rank writes its shards and calls
    `Team.gather`; rank 0 then writes the index and leaves the context, which swaps the directory
    into place, and tells the others whether that worked, so every rank ends only once OUT is
    complete, or fails (non-zero) when any rank failed: no index then, and the temporary
    directory removed (the others leave `join`'s context with the error: theirs to undo what they
    added, where that is needed). The failing rank raises its own error; the others RankFailed,
    carrying its exit code. A signal (SIGTERM from torchrun's agent when a rank died) is not
    waited on."""
    if not w.distributed:
        with open_directory() as directory:
            yield Team(w, directory)
        return
    if w.leader:
        with _leading(w, open_directory, share) as team:
            yield team
    else:
        with _following(w, join) as team:
            yield team


@contextlib.contextmanager
def _leading(
    w: World, open_directory: Callable[[], AbstractContextManager[D]], share: Callable[[D], str]
) -> Iterator[Team[D]]:
    team: Team[D] | None = None
    try:
        with open_directory() as directory:
            broadcast(w, share(directory))
            team = Team(w, directory)
            try:
                yield team
            except Exception as exc:
                team._fail(exc)  # the others stop writing before the directory goes
                raise
            if not team.gathered:
                raise RuntimeError("team_directory: the shards were not gathered before the index")
    except Exception as exc:
        if team is None:  # the others wait for the directory's name: tell them why there is none
            with contextlib.suppress(RankError):
                broadcast(w, _outcome(w, exc))
            raise
        team._fail(exc)
        with contextlib.suppress(RankError):
            broadcast(w, _outcome(w, exc))  # the directory is gone: the final word
        raise
    broadcast(w, None)  # OUT is in place


@contextlib.contextmanager
def _following(w: World, join: Callable[[str], AbstractContextManager[D]]) -> Iterator[Team[D]]:
    start = broadcast(w, None)
    if not isinstance(start, str):
        raise RankFailed(*(start or (0, EXIT_INTERNAL, "no temporary directory was made")))
    with join(start) as directory:
        team = Team(w, directory)
        try:
            yield team
        except Exception as exc:
            team._fail(exc)
            with contextlib.suppress(RankError):
                broadcast(w, None)  # rank 0's final word (it removed the directory)
            raise
        _raise_failed([broadcast(w, None)])  # rank 0's final word: OUT is in place, or why not
