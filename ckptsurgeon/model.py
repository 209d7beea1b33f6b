"""Check a checkpoint against a model: `--model SPEC` import, meta-device build, key comparison.

`load_model` turns ``package.module:Name`` or ``path/to/file.py:Name`` into an ``nn.Module`` built
on the meta device (no weight memory). `check_model` judges a checkpoint's keys and shapes exactly
as ``model.load_state_dict(sd, strict=False)`` would, by letting torch itself load meta tensors of
the checkpoint's shapes. `suggest_renames` proposes the ``ckptsurgeon rename`` prefix surgery that
would make the keys line up.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import itertools
import json
import os
import re
import shlex
import signal
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ckptsurgeon.errors import ModelSpecError

__all__ = [
    "ModelReport",
    "RenameSuggestion",
    "ShapeMismatch",
    "check_model",
    "check_model_spec",
    "load_model",
    "parse_model_kwargs",
    "suggest_renames",
]

_SPEC_FORMS = "expected 'package.module:Name' or 'path/to/file.py:Name'"
_MAX_DETAIL = 300
_file_counter = itertools.count()


# --------------------------------------------------------------------------------------------
# load_model


def _one_line(exc: BaseException) -> str:
    """`TypeError: message` squeezed onto one line and cut to a readable length."""
    text = " ".join(str(exc).split())
    if len(text) > _MAX_DETAIL:
        text = text[: _MAX_DETAIL - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def parse_model_kwargs(kwargs: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """Turn `--model-kwargs` (a JSON object string, a mapping, or None) into constructor kwargs."""
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        try:
            decoded = json.loads(kwargs)
        except json.JSONDecodeError as exc:
            raise ModelSpecError(f"--model-kwargs is not valid JSON: {exc}") from None
        if not isinstance(decoded, dict):
            raise ModelSpecError(
                f"--model-kwargs must be a JSON object like '{{\"num_classes\": 10}}', "
                f"got a JSON {type(decoded).__name__}"
            )
        return decoded
    if not isinstance(kwargs, Mapping):
        raise ModelSpecError(f"model kwargs must be a mapping or a JSON string, got {type(kwargs).__name__}")
    bad = [k for k in kwargs if not isinstance(k, str)]
    if bad:
        raise ModelSpecError(f"model kwargs keys must be strings, got {bad[0]!r}")
    return dict(kwargs)


@contextlib.contextmanager
def _on_sys_path(directory: str) -> Iterator[None]:
    """Put `directory` first on sys.path for the duration (unless it is already there)."""
    if directory in sys.path:
        yield
        return
    sys.path.insert(0, directory)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(directory)


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_module(spec: str, target: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        # the module itself (or a parent package) is absent, as opposed to a failing inner import
        if exc.name is not None and (target == exc.name or target.startswith(exc.name + ".")):
            raise ModelSpecError(f"model spec {spec!r}: module {target!r} not found") from None
        raise ModelSpecError(f"model spec {spec!r}: importing {target!r} raised {_one_line(exc)}") from None
    except (Exception, SystemExit) as exc:
        raise ModelSpecError(f"model spec {spec!r}: importing {target!r} raised {_one_line(exc)}") from None


def _import_file(spec: str, target: str) -> ModuleType:
    path = Path(target).expanduser()
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ModelSpecError(f"model spec {spec!r}: {target} {what}")
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_ckptsurgeon_model_{stem}_{next(_file_counter)}"
    module_spec = importlib.util.spec_from_file_location(name, path.resolve())
    if module_spec is None or module_spec.loader is None:
        raise ModelSpecError(f"model spec {spec!r}: {target} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses, pickling and typing look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        raise ModelSpecError(f"model spec {spec!r}: importing {target} raised {_one_line(exc)}") from None
    return module


def _resolve_attr(spec: str, module: ModuleType, target: str, dotted: str) -> Any:
    obj: Any = module
    walked = target
    for i, part in enumerate(dotted.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise ModelSpecError(f"model spec {spec!r}: {walked} has no attribute {part!r}{hint}") from None
        except Exception as exc:  # a property or module __getattr__ that raises
            raise ModelSpecError(
                f"model spec {spec!r}: getting {part!r} from {walked} raised {_one_line(exc)}"
            ) from None
        walked = f"{walked}{':' if i == 0 else '.'}{part}"
    return obj


def load_model(spec: str, kwargs: Mapping[str, Any] | str | None = None) -> nn.Module:
    """Import and build the model named by `spec` on the meta device.

    `spec` is ``package.module:Name`` (imported with the current directory first on sys.path, like
    ``python -m`` would) or ``path/to/file.py:Name`` (loaded under a unique module name with its
    directory first on sys.path, so sibling imports work). `Name` may be dotted
    (``mod:Outer.Inner``) and must be an ``nn.Module`` subclass or a callable returning an
    ``nn.Module``. `kwargs` is a mapping or a JSON object string passed to it as keyword
    arguments. The model is built under ``torch.device("meta")``: no weight memory is allocated.

    Raises ModelSpecError (one-line message) for every way the spec can fail.
    """
    return _load_model(spec, kwargs)


def _load_model(
    spec: str, kwargs: Mapping[str, Any] | str | None, phase: Callable[[str], None] | None = None
) -> nn.Module:
    """`load_model`, telling `phase` what it is about to do (for a crash report)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ModelSpecError(f"model spec {spec!r} has no ':'; {_SPEC_FORMS}")
    target, _, attr = spec.rpartition(":")
    target, attr = target.strip(), attr.strip()
    if not target or not attr or any(not part for part in attr.split(".")):
        empty = "module or file" if not target else "name"
        raise ModelSpecError(f"model spec {spec!r} has an empty {empty} part; {_SPEC_FORMS}")
    call_kwargs = parse_model_kwargs(kwargs)

    is_file = _is_file_spec(target)
    directory = str(Path(target).expanduser().resolve().parent) if is_file else os.getcwd()
    with _on_sys_path(directory):
        if phase is not None:
            phase(f"importing {target}")
        module = _import_file(spec, target) if is_file else _import_module(spec, target)
        obj = _resolve_attr(spec, module, target, attr)
        if phase is not None:
            phase("building the model")
        return _build(spec, obj, call_kwargs)


# in-place initialisers: on a meta tensor each one is a no-op that only costs time
_INIT_FILLS = frozenset(
    [
        getattr(torch.Tensor, name)
        for name in (
            "normal_",
            "uniform_",
            "bernoulli_",
            "cauchy_",
            "exponential_",
            "geometric_",
            "log_normal_",
            "random_",
        )
    ]
    + [f for name, f in vars(nn.init).items() if name.endswith("_") and not name.startswith("_") and callable(f)]
)


class _SkipInitOnMeta(TorchFunctionMode):
    """Skip weight initialisers on meta tensors.

    They compute nothing there, but the first `normal_` (nn.Embedding's init) makes torch import
    torch._dynamo, which costs about 2 s, and each call costs time on a many-layer model.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _INIT_FILLS:
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes tensor=...
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def _build(spec: str, obj: Any, kwargs: dict[str, Any]) -> nn.Module:
    if isinstance(obj, nn.Module):
        raise ModelSpecError(
            f"model spec {spec!r} names an nn.Module instance; name its class or a function that builds it"
        )
    if isinstance(obj, type) and not issubclass(obj, nn.Module):
        raise ModelSpecError(f"model spec {spec!r} names class {obj.__name__}, which is not an nn.Module subclass")
    if not callable(obj):
        raise ModelSpecError(
            f"model spec {spec!r} names a {type(obj).__name__}, not an nn.Module subclass or a callable"
        )
    try:
        with torch.device("meta"), _SkipInitOnMeta():
            model = obj(**kwargs)
    except (Exception, SystemExit) as exc:
        raise ModelSpecError(
            f"model spec {spec!r}: building the model (on the meta device) raised {_one_line(exc)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model spec {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


# --------------------------------------------------------------------------------------------
# suggest_renames


@dataclass(frozen=True)
class RenameSuggestion:
    """A prefix surgery: strip `strip_prefix` where present, then prepend `add_prefix` to every key.

    `matched` is how many checkpoint keys would then name a model key.
    """

    strip_prefix: str | None
    add_prefix: str | None
    matched: int

    def apply(self, key: str) -> str:
        """The new name of `key` under this surgery."""
        if self.strip_prefix and key.startswith(self.strip_prefix):
            key = key[len(self.strip_prefix) :]
        return (self.add_prefix or "") + key

    def command(self, ckpt: str = "CKPT", out: str = "OUT") -> str:
        """The `ckptsurgeon rename` command line that performs this surgery, shell-quoted."""
        parts = ["ckptsurgeon", "rename", ckpt, "-o", out]
        if self.strip_prefix:
            parts += ["--strip-prefix", self.strip_prefix]
        if self.add_prefix:
            parts += ["--add-prefix", self.add_prefix]
        return " ".join(shlex.quote(p) for p in parts)

    def to_dict(self) -> dict[str, Any]:
        return {"strip_prefix": self.strip_prefix, "add_prefix": self.add_prefix, "matched": self.matched}


def _splits(key: str) -> Iterator[tuple[str, str]]:
    """(prefix, rest) at every '.' boundary, longest rest first; the prefix keeps its dot."""
    yield "", key
    for i, ch in enumerate(key):
        if ch == "." and i + 1 < len(key):
            yield key[: i + 1], key[i + 1 :]


def suggest_renames(ckpt_keys: Iterable[str], model_keys: Iterable[str], *, limit: int = 3) -> list[RenameSuggestion]:
    """Prefix surgeries (strip and/or add a dotted prefix) that make more checkpoint keys match.

    Typical finds: strip ``module.`` (DataParallel), strip ``model.`` (Lightning), add or strip
    ``backbone.``. Returns the best ones (most keys matched, then simplest), best first, and only
    those that match strictly more keys than the checkpoint does as it is and rename no two keys
    to one name; an empty list when nothing helps.
    """
    ckpt = list(dict.fromkeys(ckpt_keys))
    model_order = list(dict.fromkeys(model_keys))  # ordered, so ties break the same on every run
    model = set(model_order)
    baseline = sum(k in model for k in ckpt)
    unexpected = [k for k in ckpt if k not in model]
    ckpt_set = set(ckpt)
    missing = [k for k in model_order if k not in ckpt_set]
    if not unexpected or not missing:
        return []

    # rest-of-key -> prefixes under which a missing key ends with it
    by_rest: dict[str, list[str]] = {}
    for key in missing:
        for prefix, rest in _splits(key):
            by_rest.setdefault(rest, []).append(prefix)
    votes: Counter[tuple[str, str]] = Counter()
    for key in unexpected:
        for prefix, rest in _splits(key):  # the longest shared tail is the most telling
            targets = by_rest.get(rest)
            if targets:
                for target in targets[:8]:
                    if prefix != target:
                        votes[(prefix, target)] += 1
                break

    scored: list[RenameSuggestion] = []
    for (strip, add), _ in votes.most_common(20):
        candidate = RenameSuggestion(strip or None, add or None, 0)
        renamed = [candidate.apply(k) for k in ckpt]
        if len(set(renamed)) != len(renamed):
            continue  # the rename would refuse: two keys onto one name
        matched = sum(k in model for k in renamed)
        if matched > baseline:
            scored.append(RenameSuggestion(strip or None, add or None, matched))
    scored.sort(
        key=lambda s: (
            -s.matched,
            (s.strip_prefix is not None) + (s.add_prefix is not None),
            len(s.strip_prefix or "") + len(s.add_prefix or ""),
        )
    )
    if not scored:
        return []
    best = scored[0].matched
    return [s for s in scored if s.matched == best][:limit]


# --------------------------------------------------------------------------------------------
# check_model


@dataclass(frozen=True)
class ShapeMismatch:
    """A key present in both, whose checkpoint shape load_state_dict would refuse."""

    key: str
    checkpoint: tuple[int, ...]
    model: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "checkpoint": list(self.checkpoint), "model": list(self.model)}


@dataclass(frozen=True)
class ModelReport:
    """How a checkpoint's keys meet a model, as ``load_state_dict(strict=False)`` judges them.

    `kinds` maps every checkpoint key to "parameter", "buffer", "extra_state", "other" (accepted by
    a module's own loading logic), "unexpected" or "shape_mismatch", and every key torch reports
    missing to "missing". `suggestions` are ``ckptsurgeon rename`` command lines with ``CKPT`` and
    ``OUT`` placeholders (`renames` holds the same suggestions as objects). `errors` holds any
    other error torch's loader reported (a custom module's checks, a hook that raised).
    """

    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    shape_mismatches: tuple[ShapeMismatch, ...]
    kinds: dict[str, str]
    suggestions: tuple[str, ...] = ()
    renames: tuple[RenameSuggestion, ...] = ()
    errors: tuple[str, ...] = field(default=())

    def compatible(self, *, allow_missing: bool = False, allow_unexpected: bool = False) -> bool:
        """True when load_state_dict would succeed (strict unless missing/unexpected are allowed)."""
        if self.shape_mismatches or self.errors:
            return False
        if self.missing_keys and not allow_missing:
            return False
        return not (self.unexpected_keys and not allow_unexpected)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data; `compatible` is the strict verdict."""
        return {
            "compatible": self.compatible(),
            "missing_keys": list(self.missing_keys),
            "unexpected_keys": list(self.unexpected_keys),
            "shape_mismatches": [m.to_dict() for m in self.shape_mismatches],
            "errors": list(self.errors),
            "suggestions": list(self.suggestions),
        }


def _model_shapes(model: nn.Module) -> dict[str, tuple[int, ...] | None]:
    """Key -> shape for every state_dict entry; None for lazy parameters and non-tensor state."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, torch.Tensor) and not nn.parameter.is_lazy(value):
            shapes[key] = tuple(value.shape)
        else:
            shapes[key] = None
    return shapes


def _shape_refused(checkpoint: tuple[int, ...], model: tuple[int, ...]) -> bool:
    # torch's 0.3 -> 0.4 compatibility: a 1-element 1-d tensor loads into a 0-d parameter
    if len(model) == 0 and checkpoint == (1,):
        return False
    return checkpoint != model


@contextlib.contextmanager
def _restoring_state(model: nn.Module) -> Iterator[None]:
    """Undo ``assign=True``: put every module's original parameter and buffer objects back."""
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(False)  # swapping would mutate in place
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
        for module, params, buffers in saved:
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)


@contextlib.contextmanager
def _no_set_extra_state(model: nn.Module) -> Iterator[None]:
    """Make every module's `set_extra_state` a no-op for the duration (an instance attribute over
    the class's method): the trial load hands it a placeholder, not the checkpoint's value."""
    patched = [m for m in model.modules() if type(m).set_extra_state is not nn.Module.set_extra_state]
    for m in patched:
        m.set_extra_state = lambda state: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in patched:
            with contextlib.suppress(AttributeError):
                del m.set_extra_state


def check_model(
    shapes: Mapping[str, tuple[int, ...] | None],
    model: nn.Module,
    *,
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
) -> ModelReport:
    """Judge a checkpoint (key -> shape, None for a non-tensor value such as extra state, plus its
    `_metadata`) against `model`.

    Shape mismatches come from comparing with ``model.state_dict()`` shapes (with torch's 0-d
    compatibility rule); missing and unexpected keys come from torch itself: float32 meta tensors
    of the checkpoint's shapes (model-shaped for the mismatched keys) are loaded with
    ``model.load_state_dict(..., strict=False, assign=True)``, so module-specific loading logic
    (BatchNorm's `num_batches_tracked` versioning, non-persistent buffers, hooks) applies.
    The model is left as it was: its original parameter and buffer objects are put back
    afterwards (tying intact), so a real model works too, not only a meta one. Modules'
    `set_extra_state` are not called: torch's loader only checks that their `_extra_state` keys
    are there.
    """
    model_shapes = _model_shapes(model)
    mismatches: list[ShapeMismatch] = []
    trial: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape in shapes.items():
        if shape is None:  # a non-tensor value (extra state): only its key matters to the check
            trial[key] = None  # type: ignore[assignment]
            continue
        shape = tuple(int(s) for s in shape)
        expected = model_shapes.get(key)
        if expected is not None and _shape_refused(shape, expected):
            mismatches.append(ShapeMismatch(key, shape, expected))
            shape = expected  # torch reports it as an error, never as missing or unexpected
        trial[key] = torch.empty(shape, dtype=torch.float32, device="meta")
    if metadata is not None:
        # copies: torch writes "assign_to_params_buffers" into the per-module dicts
        trial._metadata = {k: dict(v) for k, v in metadata.items()}  # type: ignore[attr-defined]

    captured: dict[str, list[str]] = {}

    def capture(module: nn.Module, incompatible: Any) -> None:
        captured["missing"] = incompatible.missing_keys
        captured["unexpected"] = incompatible.unexpected_keys

    errors: list[str] = []
    handle = model.register_load_state_dict_post_hook(capture)  # type: ignore[no-untyped-call]
    try:
        with _restoring_state(model), _no_set_extra_state(model):
            result = model.load_state_dict(trial, strict=False, assign=True)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    except Exception as exc:
        missing, unexpected = list(captured.get("missing", [])), list(captured.get("unexpected", []))
        if isinstance(exc, RuntimeError) and str(exc).startswith("Error(s) in loading state_dict"):
            errors = [" ".join(line.split()) for line in str(exc).split("\n\t")[1:]]
        else:
            errors = [f"load_state_dict raised {_one_line(exc)}"]
    finally:
        handle.remove()

    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffer_names = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    mismatched = {m.key for m in mismatches}
    unexpected_set = set(unexpected)
    kinds: dict[str, str] = {}
    for key in shapes:
        if key in mismatched:
            kinds[key] = "shape_mismatch"
        elif key in unexpected_set:
            kinds[key] = "unexpected"
        elif key in param_names:
            kinds[key] = "parameter"
        elif key in buffer_names:
            kinds[key] = "buffer"
        elif key.endswith("_extra_state"):
            kinds[key] = "extra_state"
        else:
            kinds[key] = "other"
    for key in missing:
        kinds[key] = "missing"

    renames: tuple[RenameSuggestion, ...] = ()
    if missing or unexpected:
        renames = tuple(suggest_renames(shapes.keys(), model_shapes.keys()))
    return ModelReport(
        missing_keys=tuple(missing),
        unexpected_keys=tuple(unexpected),
        shape_mismatches=tuple(mismatches),
        kinds=kinds,
        suggestions=tuple(r.command() for r in renames),
        renames=renames,
        errors=tuple(errors),
    )


# --------------------------------------------------------------------------------------------
# check_model_spec: the model's code in a child process


def check_model_spec(
    spec: str,
    shapes: Mapping[str, tuple[int, ...] | None],
    kwargs: Mapping[str, Any] | str | None = None,
    *,
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
    isolated: bool = True,
) -> ModelReport:
    """`check_model(shapes, load_model(spec, kwargs), metadata=metadata)`, by default in a child.

    With `isolated` (where ``os.fork`` exists), the model's module is imported, the model built and
    the checkpoint checked in a forked child process that reports back through a pipe: whatever
    the model's code prints goes to stderr (never this process's stdout), nothing it changes
    (``sys.modules``, globals, signal handlers) leaks back, and an exit (``sys.exit``,
    ``os._exit``), a crash or a signal in it is a ModelSpecError naming the spec, never this
    process's exit. The child costs a fork (tens of milliseconds), no new torch import.
    """
    call_kwargs = parse_model_kwargs(kwargs)  # a bad --model-kwargs is said without a child

    def job(phase: Callable[[str], None]) -> ModelReport:
        model = _load_model(spec, call_kwargs, phase)
        phase("checking the checkpoint against the model")
        return check_model(shapes, model, metadata=metadata)

    if not isolated or not hasattr(os, "fork"):
        return job(lambda _: None)
    return _report_from_plain(_run_in_child(spec, job))


def _report_to_plain(report: ModelReport) -> dict[str, Any]:
    return {
        "missing_keys": list(report.missing_keys),
        "unexpected_keys": list(report.unexpected_keys),
        "shape_mismatches": [[m.key, list(m.checkpoint), list(m.model)] for m in report.shape_mismatches],
        "kinds": report.kinds,
        "suggestions": list(report.suggestions),
        "renames": [[r.strip_prefix, r.add_prefix, r.matched] for r in report.renames],
        "errors": list(report.errors),
    }


def _report_from_plain(data: Mapping[str, Any]) -> ModelReport:
    return ModelReport(
        missing_keys=tuple(data["missing_keys"]),
        unexpected_keys=tuple(data["unexpected_keys"]),
        shape_mismatches=tuple(ShapeMismatch(k, tuple(c), tuple(m)) for k, c, m in data["shape_mismatches"]),
        kinds=dict(data["kinds"]),
        suggestions=tuple(data["suggestions"]),
        renames=tuple(RenameSuggestion(s, a, n) for s, a, n in data["renames"]),
        errors=tuple(data["errors"]),
    )


_CHILD_FAILED = 70  # the child's exit status when even its report could not be sent


def _run_in_child(spec: str, job: Callable[[Callable[[str], None]], ModelReport]) -> dict[str, Any]:
    """Run `job` in a forked child; return its report as plain data, or raise what it means.

    The child writes one line per phase (`phase: ...`) and then one result line (`result: JSON`)
    to a pipe. No result line means the model's code ended the child (an exit or a signal).
    """
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()  # nothing buffered may be written twice, by parent and child
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns, never runs the parent's cleanup
        status = _CHILD_FAILED
        try:
            os.close(read_fd)
            status = _child(spec, write_fd, job)
        finally:
            os._exit(status)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            lines = pipe.read().decode("utf-8", "replace").splitlines()
        _, wait_status = os.waitpid(pid, 0)
    except BaseException:  # interrupted: leave no child behind
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raise
    phase = "starting"
    for line in lines:
        if line.startswith("phase: "):
            phase = line[len("phase: ") :]
        elif line.startswith("result: "):
            result = json.loads(line[len("result: ") :])
            if "report" in result:
                report: dict[str, Any] = result["report"]
                return report
            if "error" in result:
                raise ModelSpecError(result["error"])
            raise RuntimeError(f"checking the model {spec!r} failed in its child process:\n{result['bug']}")
    if os.WIFSIGNALED(wait_status):
        number = os.WTERMSIG(wait_status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        how = f"crashed (killed by {name})"
    else:
        how = f"exited (status {os.waitstatus_to_exitcode(wait_status)})"
    raise ModelSpecError(f"model spec {spec!r}: the model's code {how} while {phase}; nothing was checked")


def _child(spec: str, write_fd: int, job: Callable[[Callable[[str], None]], ModelReport]) -> int:
    """The child's side of `_run_in_child`; returns the exit status."""
    os.dup2(2, 1)  # the model's prints, Python's or C's, go to stderr: stdout carries data only
    sys.stdout = sys.stderr
    with contextlib.suppress(Exception):
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash in the model's code leaves no core file

    def send(line: str) -> None:
        data = (line + "\n").encode("utf-8")
        while data:
            data = data[os.write(write_fd, data) :]

    try:
        result: dict[str, Any] = {"report": _report_to_plain(job(lambda p: send(f"phase: {' '.join(p.split())}")))}
    except ModelSpecError as exc:
        result = {"error": str(exc)}
    except (SystemExit, KeyboardInterrupt) as exc:  # from a hook of the model, while it is checked
        result = {"error": f"model spec {spec!r}: the model's code raised {_one_line(exc)} while it was checked"}
    except BaseException:  # noqa: BLE001 (a bug: the parent shows it as one, with this traceback)
        import traceback

        result = {"bug": traceback.format_exc()}
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    send("result: " + json.dumps(result))
    return 0
