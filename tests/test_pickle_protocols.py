"""Every pickle that `torch.load(weights_only=True)` loads, the engine reads with the same keys and
values; every one it refuses, every command refuses with exit 2 (never 3).

Files come from torch itself (`torch.save(..., pickle_protocol=N)`, zip and legacy), or are
assembled opcode by opcode for the forms modern torch no longer writes: storages saved from CUDA
or MPS, `torch._utils._rebuild_tensor` (torch 0.4 and older), `torch.nn.Parameter(...)` as a
call, an OrderedDict rebuilt from a list of `[key, value]` lists, and Python 2's byte strings
(SHORT_BINSTRING) as keys, as a Python-2-era legacy file has them. Each is compared with
`torch.load(weights_only=True, map_location="cpu")`: the same keys, dtypes, shapes and bytes, as
read by `inspect --json` and by torch from the outputs of `extract` and `rename`.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import struct
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from hostile.corpus import MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO, Blob, Call, G, Storage, dumps, pack, torch_zip

from ckptsurgeon import load_checkpoint
from ckptsurgeon.containers import find_state_dict

# ---------------------------------------------------------------- comparing with torch


def torch_reads(path: Path) -> Any:
    """What torch's safe loader reads from `path` (None when it refuses the file)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception:
        return None


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_same_tensors(got: Any, want: Any, what: str) -> None:
    assert list(got) == list(want), f"{what}: keys {list(got)} != {list(want)}"
    for k, w in want.items():
        g = got[k]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), f"{what}: {k}: {g.dtype}{list(g.shape)}"
        assert torch.equal(bits(g), bits(w)), f"{what}: {k}: values differ"
        assert type(g) is type(w), f"{what}: {k}: {type(g).__name__} != {type(w).__name__}"


def check_every_command_reads_what_torch_reads(cli: Any, path: Path, tmp_path: Path) -> None:
    want_container = torch_reads(path)
    assert want_container is not None, "torch itself refuses the file"
    _, want = find_state_dict(want_container)

    with load_checkpoint(path) as ckpt:
        assert ckpt.engine == "raw"  # the engine read it: torch was not needed
        assert list(ckpt.state_dict) == list(want)

    r = cli("inspect", path, "--json")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)["tensors"]
    assert [(t["key"], t["dtype"], t["shape"]) for t in rows] == [
        (k, str(v.dtype).removeprefix("torch."), list(v.shape)) for k, v in want.items()
    ]

    out = tmp_path / "extracted.pt"
    r = cli("extract", path, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert_same_tensors(torch.load(out, weights_only=True), want, "extract")

    out = tmp_path / "renamed.pt"
    r = cli("rename", path, "-o", out, "--add-prefix", "x.")
    assert r.exit_code == 0, r.stderr
    _, got = find_state_dict(torch.load(out, weights_only=True))
    assert_same_tensors(got, OrderedDict(("x." + k, v) for k, v in want.items()), "rename")

    r = cli("diff", path, path)
    assert r.exit_code == 0, r.stderr


# ---------------------------------------------------------------- what torch.save writes


def tricky_container(*, legacy: bool = False) -> dict[str, Any]:
    torch.manual_seed(0)
    emb = torch.randn(5, 3)
    sd = OrderedDict(
        [
            ("emb.weight", emb),
            ("head.weight", emb),  # tied
            ("row", emb[2]),  # a view with an offset
            ("bias", torch.nn.Parameter(torch.randn(3))),
            ("half", torch.randn(4, dtype=torch.float16)),
            ("bf16", torch.randn(2, 2, dtype=torch.bfloat16)),
            ("steps", torch.tensor([1, 2, 3])),
            ("flags", torch.tensor([True, False])),
            ("f8", torch.randn(3).to(torch.float8_e4m3fn)),  # _rebuild_tensor_v3
            ("u16", torch.tensor([1, 65535], dtype=torch.uint16)),
        ]
    )
    if legacy:  # torch 2.13 cannot load its own legacy files with these (UntypedStorage has no dtype)
        del sd["f8"], sd["u16"]
    sd._metadata = OrderedDict([("", {"version": 1})])  # type: ignore[attr-defined]
    return {"epoch": 7, "state_dict": sd, "note": "ok", "big": 2**70, "pi": 3.25}


PROTOCOLS = [(p, legacy) for legacy in (False, True) for p in range(6)]


@pytest.mark.parametrize(
    ("protocol", "legacy"), PROTOCOLS, ids=[f"p{p}-{'legacy' if lg else 'zip'}" for p, lg in PROTOCOLS]
)
def test_every_protocol_is_read_exactly_when_torch_reads_it(
    cli: Any, tmp_path: Path, protocol: int, legacy: bool
) -> None:
    path = tmp_path / "in.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(
            tricky_container(legacy=legacy), path, pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy
        )
    if torch_reads(path) is not None:
        assert protocol in (2, 3)  # what torch 2.13's weights_only unpickler runs
        check_every_command_reads_what_torch_reads(cli, path, tmp_path)
        return
    # torch's safe loader refuses the opcodes of protocols 0, 1, 4 and 5 (FRAME, STACK_GLOBAL,
    # MEMOIZE, BINBYTES, ...): so does every command, with one line and exit 2
    for argv in (["inspect", path], ["extract", path, "-o", tmp_path / "o.pt"], ["diff", path, path]):
        r = cli(*argv)
        assert r.exit_code == 2, (argv, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "unsupported pickle opcode" in lines[0] and "--unsafe" in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt"]


# ---------------------------------------------------------------- forms assembled by hand


def py2_strings(pkl: bytes) -> bytes:
    """The pickle with every short str as Python 2 pickles its byte strings (SHORT_BINSTRING)."""
    out = bytearray()
    ops = list(pickletools.genops(pkl))
    for i, (info, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(pkl)
        if info.name == "BINUNICODE" and len(arg.encode("utf-8")) < 256:
            raw = arg.encode("utf-8")
            out += pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw
        else:
            out += pkl[pos:end]
    return bytes(out)


class Reduce:
    """`func(*args)` then BUILD with `state` (a REDUCE with a state, as `__reduce__` may return)."""

    def __init__(self, func: Any, args: tuple[Any, ...], state: Any = None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> Any:
        return (self.func, self.args, self.state)


FLOATS = [0.5, -1.25, 3.0, 2.0**-20, -0.0, 7.5]


def blobs_and_storages(legacy: bool, location: str) -> tuple[list[Blob], Storage, Storage]:
    key_w, key_b = ("94811211", "94811300") if legacy else ("0", "1")
    blobs = [
        Blob(key_w, "FloatStorage", 6, pack("FloatStorage", FLOATS)),
        Blob(key_b, "LongStorage", 2, pack("LongStorage", [4, -9])),
    ]
    w = Storage("FloatStorage", key_w, 6, location=location, legacy=legacy)
    b = Storage("LongStorage", key_b, 2, location=location, legacy=legacy)
    return blobs, w, b


def v1(storage: Storage, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> Call:
    return G("torch._utils", "_rebuild_tensor")(storage, offset, size, stride)


def v2(storage: Storage, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> Call:
    return G("torch._utils", "_rebuild_tensor_v2")(storage, offset, size, stride, False, OrderedDict())


def ordered_dict_of_lists(items: list[tuple[str, Any]], metadata: Any = None) -> Reduce:
    """Python 2's `OrderedDict.__reduce__`: the class, `([[key, value], ...],)`, the instance dict."""
    return Reduce(G("collections", "OrderedDict"), ([[k, v] for k, v in items],), metadata)


def write(path: Path, obj: Any, blobs: list[Blob], *, legacy: bool, py2: bool = False) -> Path:
    """`obj` as torch.save writes it (zip or legacy); `py2`: its strings as Python 2 pickled them."""
    convert = py2_strings if py2 else (lambda pkl: pkl)
    pkl = convert(dumps(obj))
    if not legacy:
        path.write_bytes(torch_zip(pkl, blobs))
        return path
    keys = sorted(b.key for b in blobs)
    data = dumps(MAGIC_NUMBER) + dumps(PROTOCOL_VERSION) + convert(dumps(SYS_INFO)) + pkl + convert(dumps(keys))
    by_key = {b.key: b for b in blobs}
    for key in keys:
        data += struct.pack("<q", by_key[key].numel) + by_key[key].data
    path.write_bytes(data)
    return path


FORMATS = pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])


@FORMATS
@pytest.mark.parametrize("location", ["cuda:0", "cuda:1", "mps", "cuda"])
def test_storages_saved_on_a_gpu_load_on_the_cpu(cli: Any, tmp_path: Path, legacy: bool, location: str) -> None:
    blobs, w, b = blobs_and_storages(legacy, location)
    sd = OrderedDict([("w", v2(w, (2, 3), (3, 1))), ("b", v2(b, (2,), (1,)))])
    path = write(tmp_path / "gpu.pt", sd, blobs, legacy=legacy)
    check_every_command_reads_what_torch_reads(cli, path, tmp_path)


@FORMATS
def test_rebuild_tensor_v1_and_parameter_calls(cli: Any, tmp_path: Path, legacy: bool) -> None:
    blobs, w, b = blobs_and_storages(legacy, "cpu")
    param = G("torch.nn.parameter", "Parameter")
    sd = OrderedDict(
        [
            ("w", v1(w, (2, 3), (3, 1))),
            ("wt", v1(w, (3, 2), (1, 3))),  # a transposed view of the same storage
            ("tail", v1(w, (2,), (1,), offset=4)),
            ("p", param(v2(w, (6,), (1,)), False)),
            ("p_grad", param(v1(w, (1, 6), (6, 1)))),  # requires_grad defaults to True
            ("b", v1(b, (2,), (1,))),
        ]
    )
    path = write(tmp_path / "v1.pt", sd, blobs, legacy=legacy)
    want = torch_reads(path)
    assert isinstance(want["p_grad"], torch.nn.Parameter) and want["p_grad"].requires_grad
    check_every_command_reads_what_torch_reads(cli, path, tmp_path)
    with load_checkpoint(path) as ckpt:
        assert [ckpt.state_dict[k].requires_grad for k in ("p", "p_grad")] == [False, True]


@FORMATS
def test_python2_era_checkpoint(cli: Any, tmp_path: Path, legacy: bool) -> None:
    """The issue's file: saved from CUDA by an old torch under Python 2: byte-string keys, an
    OrderedDict rebuilt from `[key, value]` lists with its `_metadata`, `_rebuild_tensor`."""
    blobs, w, b = blobs_and_storages(legacy, "cuda:0")
    metadata = {"_metadata": ordered_dict_of_lists([("", {"version": 1}), ("net", {"version": 1})])}
    sd = ordered_dict_of_lists([("net.weight", v1(w, (2, 3), (3, 1))), ("net.steps", v1(b, (2,), (1,)))], metadata)
    container = {"state_dict": sd, "epoch": 12, "arch": "alex"}
    path = write(tmp_path / "py2.pth", container, blobs, legacy=legacy, py2=True)
    assert b"U\x0anet.weight" in path.read_bytes()  # SHORT_BINSTRING keys, as Python 2 wrote them
    check_every_command_reads_what_torch_reads(cli, path, tmp_path)
    with load_checkpoint(path) as ckpt:
        assert ckpt.container["epoch"] == 12 and ckpt.container["arch"] == "alex"
        assert ckpt.state_dict._metadata == torch_reads(path)["state_dict"]._metadata  # type: ignore[attr-defined]


@FORMATS
def test_ordered_dict_from_tuples_lists_and_a_dict(cli: Any, tmp_path: Path, legacy: bool) -> None:
    blobs, w, b = blobs_and_storages(legacy, "cpu")
    od = G("collections", "OrderedDict")
    sd = od([("w", v2(w, (2, 3), (3, 1))), ["b", v2(b, (2,), (1,))]])  # a tuple pair and a list pair
    container = {"state_dict": sd, "opt": od({"lr": 0.5}), "sched": od(), "hist": od([])}
    path = write(tmp_path / "od.pt", container, blobs, legacy=legacy)
    check_every_command_reads_what_torch_reads(cli, path, tmp_path)
    with load_checkpoint(path) as ckpt:
        assert ckpt.container["opt"] == OrderedDict(lr=0.5) and ckpt.container["sched"] == OrderedDict()


def test_short_binstring_that_is_not_utf8_is_refused_as_torch_refuses_it(cli: Any, tmp_path: Path) -> None:
    blobs, w, _ = blobs_and_storages(False, "cpu")
    pkl = py2_strings(dumps(OrderedDict([("wX", v2(w, (6,), (1,)))])))
    pkl = pkl.replace(b"U\x02wX", b"U\x02w\xff")  # a Python 2 byte string torch decodes as UTF-8
    path = tmp_path / "latin.pt"
    path.write_bytes(torch_zip(pkl, blobs[:1]))
    assert torch_reads(path) is None
    r = cli("inspect", path)
    assert r.exit_code == 2 and "not valid UTF-8" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bininput_memo_and_long_ints_round_trip(tmp_path: Path) -> None:
    """LONG1 of every width, negative BININT, LONG_BINPUT / LONG_BINGET past 256 memo slots."""
    values = [2**k for k in range(0, 130, 7)] + [-(2**k) for k in range(0, 130, 9)] + [-1, -(2**31)]
    strings = [f"s{i}" for i in range(300)]
    obj = {"state_dict": {"w": torch.ones(2)}, "ints": values, "strings": strings, "again": strings[::-1]}
    path = tmp_path / "memo.pt"
    torch.save(obj, path)
    with load_checkpoint(path) as ckpt:
        assert ckpt.container["ints"] == values and ckpt.container["again"] == strings[::-1]
        assert ckpt.container["again"][0] is ckpt.container["strings"][-1]  # memo: one object


ODD_VALUES = {
    "long4": 2**3000,  # LONG4: torch's safe loader refuses the opcode
    "bytes": b"\x00\xffraw",  # _codecs.encode(latin-1 text)
    "bytearray": bytearray(b"ab"),  # builtins.bytearray: allowed, left to torch
    "complex": 1 + 2j,
    "set": {1, 2, 3},
    "frozenset": frozenset({1}),  # builtins.frozenset: outside torch's allowlist
    "counter": __import__("collections").Counter("aab"),
    "torch-values": (torch.float16, torch.device("cpu"), torch.Size([2, 3])),
    "nested": {"a": [[], {}, ()], "b": (1.5, None, True, "é" * 300)},
}


@pytest.mark.parametrize("name", list(ODD_VALUES))
def test_odd_container_values_read_as_torch_reads_them(cli: Any, tmp_path: Path, name: str) -> None:
    """Values beside the state_dict: the same as torch's, or refused by both (never exit 3)."""
    path = tmp_path / "odd.pt"
    torch.save({"state_dict": OrderedDict(w=torch.arange(4.0)), "value": ODD_VALUES[name]}, path)
    want = torch_reads(path)
    if want is None:
        r = cli("inspect", path)
        if name == "frozenset":  # a call of a global outside torch's allowlist: an opaque entry
            assert r.exit_code == 0 and "value: builtins.frozenset (not loaded)" in r.stdout, r.stderr
            return
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        return
    out = tmp_path / "renamed.pt"
    r = cli("rename", path, "-o", out, "--add-prefix", "x.")
    assert r.exit_code == 0, r.stderr
    got = torch.load(out, weights_only=True)
    assert got["value"] == want["value"] and type(got["value"]) is type(want["value"])
    assert torch.equal(got["state_dict"]["x.w"], want["state_dict"]["w"])
