"""Renaming state_dict keys: plan first (old -> new, pure, no tensors), then apply.

Rules apply in this order: `mapping` (exact old -> new), then each `strip_prefixes` entry (only
where the key starts with it), then each `subs` (re.sub, in order), then `add_prefix`.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import CollisionError, SelectionError, UsageError, sorted_list

Substitution = tuple["re.Pattern[str]", str]


@dataclass(frozen=True)
class RenameRules:
    """What `rename` does to each key; see the module docstring for the order."""

    mapping: Mapping[str, str] = field(default_factory=dict)
    strip_prefixes: tuple[str, ...] = ()
    subs: tuple[Substitution, ...] = ()
    add_prefix: str | None = None

    def apply(self, key: str) -> str:
        key = self.mapping.get(key, key)
        for prefix in self.strip_prefixes:
            if prefix and key.startswith(prefix):
                key = key[len(prefix) :]
        for pattern, repl in self.subs:
            key = pattern.sub(repl, key)
        if self.add_prefix:
            key = self.add_prefix + key
        return key

    @property
    def is_empty(self) -> bool:
        return not (self.mapping or self.strip_prefixes or self.subs or self.add_prefix)


def parse_sub(expr: str) -> Substitution:
    """Parse a sed-style `s/REGEX/REPL/[flags]` (any delimiter after `s`; flags `g` and `i`).

    The replacement uses Python `re.sub` syntax (`\\1`, `\\g<name>`); every match is replaced.
    """
    if len(expr) < 4 or expr[0] != "s" or expr[1].isalnum() or expr[1] in "\\ ":
        raise UsageError(f"--sub {expr!r}: expected s/REGEX/REPL/ (any delimiter after 's')")
    delim = expr[1]
    parts: list[str] = []
    current: list[str] = []
    i = 2
    while i < len(expr):
        ch = expr[i]
        if ch == "\\" and i + 1 < len(expr) and expr[i + 1] == delim:
            current.append(delim)
            i += 2
            continue
        if ch == delim:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    if len(parts) != 2:
        raise UsageError(f"--sub {expr!r}: expected s{delim}REGEX{delim}REPL{delim}[flags]")
    pattern, repl = parts
    flags_text = "".join(current)
    if set(flags_text) - set("gi"):
        raise UsageError(f"--sub {expr!r}: unknown flags {flags_text!r} (allowed: g, i)")
    try:
        compiled = re.compile(pattern, re.IGNORECASE if "i" in flags_text else 0)
        compiled.sub(repl, "")  # validates group references in REPL early
    except (re.error, IndexError) as exc:
        raise UsageError(f"--sub {expr!r}: {exc}") from None
    return compiled, repl


def plan_rename(keys: Iterable[str], rules: RenameRules) -> OrderedDict[str, str]:
    """Map every key to its new name, in the original order.

    Raises CollisionError when two keys would get the same name, and SelectionError when
    `rules.mapping` names keys that do not exist (a typo would otherwise pass silently).
    """
    keys = list(keys)
    missing = [k for k in rules.mapping if k not in set(keys)]
    if missing:
        raise SelectionError(f"--map names keys that are not in the checkpoint: {sorted_list(missing)}")
    plan: OrderedDict[str, str] = OrderedDict((k, rules.apply(k)) for k in keys)
    by_new: dict[str, list[str]] = {}
    for old, new in plan.items():
        by_new.setdefault(new, []).append(old)
    collisions = {new: olds for new, olds in by_new.items() if len(olds) > 1}
    if collisions:
        shown = "; ".join(f"{sorted_list(olds)} -> {new!r}" for new, olds in sorted(collisions.items())[:5])
        raise CollisionError(f"rename would give several keys one name: {shown}")
    empty = [old for old, new in plan.items() if not new]
    if empty:
        raise CollisionError(f"rename would give an empty name to {sorted_list(empty)}")
    return plan


def invert_plan(plan: Mapping[str, str]) -> OrderedDict[str, str]:
    return OrderedDict((new, old) for old, new in plan.items())


def module_path(key: str) -> str:
    """The module a state_dict key belongs to: `layer1.0.conv1.weight` -> `layer1.0.conv1`."""
    return key.rpartition(".")[0]


_LEAF = "\x00leaf"


def rename_metadata(metadata: Mapping[str, Any], plan: Mapping[str, str], rules: RenameRules) -> OrderedDict[str, Any]:
    """Rename a state_dict's `_metadata` (module path -> version info) along with its keys.

    A module whose tensors were all renamed into one new module takes that module's name; any
    other module path is renamed as a key inside it would be. When two paths land on one name,
    the one that was renamed wins (e.g. DataParallel's `module` over the wrapper's root).
    """
    moved: dict[str, set[str]] = {}
    for old, new in plan.items():
        moved.setdefault(module_path(old), set()).add(module_path(new))
    out: OrderedDict[str, Any] = OrderedDict()
    renamed: set[str] = set()
    for path, info in metadata.items():
        targets = moved.get(path)
        if targets and len(targets) == 1:
            new_path = next(iter(targets))
        else:
            probe = f"{path}.{_LEAF}" if path else _LEAF
            new_path = module_path(rules.apply(probe)) if _LEAF in rules.apply(probe) else path
        changed = new_path != path
        if new_path in out and (new_path in renamed or not changed):
            continue
        out[new_path] = info
        if changed:
            renamed.add(new_path)
    return out


def filter_metadata(metadata: Mapping[str, Any], kept_keys: Sequence[str]) -> OrderedDict[str, Any]:
    """Keep the `_metadata` entries of modules that still own a key (and their ancestors)."""
    needed: set[str] = set()
    for key in kept_keys:
        path = module_path(key)
        while True:
            needed.add(path)
            if not path:
                break
            path = module_path(path)
    return OrderedDict((p, v) for p, v in metadata.items() if p in needed)
