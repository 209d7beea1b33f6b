"""ZIP reading that can never disagree with torch.

An outside review found files that `torch.load(weights_only=True)` reads with other weights than
ckptsurgeon does (so `diff` said `identical`): a second end-of-central-directory record hidden in
the archive comment, and a member `archive/DATA/0` next to `archive/data/0`. torch's reader
(miniz through PyTorchStreamReader) takes the last end-of-central-directory signature with 22
bytes after it, looks members up with ASCII case folded, takes the archive folder from the first
member and refuses members outside it. ckptsurgeon must read exactly what torch reads or refuse
the file (exit 2, one line naming the ambiguity).

The regression tests rebuild each finding; the property tests build random ambiguous archives (and
legacy files) from a real `torch.save` file and use torch as the oracle: whatever ckptsurgeon
accepts, torch loads with identical tensors.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from ckptsurgeon.cli import main
from ckptsurgeon.errors import CheckpointError
from ckptsurgeon.io import as_torch, load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile.corpus import ZipEntry, write_zip

EOCD = struct.Struct("<4sHHHHIIH")
ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")
LOCATOR = struct.Struct("<4sIQI")


def _state_dict() -> OrderedDict[str, torch.Tensor]:
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    sd["w"] = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    sd["b"] = torch.tensor([1, 2, 3], dtype=torch.int64)
    sd["h"] = torch.tensor([0.5, -1.0, 2.0, 4.0], dtype=torch.bfloat16)
    return sd


def _evil(data: bytes) -> bytes:
    """Other bytes of the same length: a valid record for the same storage, other values."""
    return bytes((b + 0x41) & 0xFF for b in data)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("zipamb") / "orig.pt"
    torch.save(_state_dict(), path)
    return path


def _entries(path: Path) -> list[ZipEntry]:
    z = zipfile.ZipFile(path)
    return [ZipEntry(i.filename, z.read(i)) for i in z.infolist()]


def _index(entries: list[ZipEntry], suffix: str) -> int:
    return next(i for i, e in enumerate(entries) if e.name.endswith(suffix))


def _two_central_directories(entries: list[ZipEntry], target: int, junk: bytes = b"\0\0") -> bytes:
    """The review's file: the real end record points at central directory A (the original
    members); a second one in the archive comment, followed by `junk`, points at central
    directory B, in which member `target` is an evil record stored among the others."""
    evil = ZipEntry(entries[target].name, _evil(entries[target].data))
    lay = write_zip(entries + [evil])
    data = bytes(lay.data)
    ends = lay.central[1:] + [lay.zip64_eocd]
    central = [data[a:b] for a, b in zip(lay.central, ends)]
    cd_a = b"".join(central[: len(entries)])
    cd_b = b"".join(central[-1] if i == target else c for i, c in enumerate(central[: len(entries)]))
    n = len(entries)
    out = bytearray(data[: lay.cd_start])
    b_at = len(out)
    out += cd_b
    a_at = len(out)
    out += cd_a
    fake = EOCD.pack(b"PK\x05\x06", 0, 0, n, n, len(cd_b), b_at, 0)
    z64 = len(out)
    out += ZIP64_EOCD.pack(b"PK\x06\x06", 44, 0x031E, 0x2D, 0, 0, n, n, len(cd_a), a_at)
    out += LOCATOR.pack(b"PK\x06\x07", 0, z64, 1)
    comment = fake + junk
    out += EOCD.pack(b"PK\x05\x06", 0, 0, n, n, len(cd_a), a_at, len(comment)) + comment
    return bytes(out)


def _torch(path: Path) -> dict[str, torch.Tensor]:
    return dict(torch.load(path, weights_only=True, map_location="cpu"))


def _ours(path: Path) -> dict[str, torch.Tensor]:
    return dict(as_torch(load_checkpoint(path).container))


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert list(got) == list(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, k
        assert torch.equal(g, w), k


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2, (argv, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------ the two findings


def test_a_second_end_record_in_the_comment_is_refused_by_every_command(
    original: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = _entries(original)
    crafted = tmp_path / "crafted.pt"
    crafted.write_bytes(_two_central_directories(entries, _index(entries, "/data/0")))
    # the file is real: torch reads directory B, i.e. other weights than the original's
    theirs, want = _torch(crafted), _state_dict()
    assert not torch.equal(theirs["w"], want["w"]) and torch.equal(theirs["b"], want["b"])
    for argv in (
        ["diff", str(original), str(crafted)],
        ["inspect", str(crafted), "--verify"],
        ["inspect", str(crafted)],
        ["extract", str(crafted), "-o", str(tmp_path / "out.pt")],
    ):
        _refused(argv, capsys, "crafted.pt", "ambiguous ZIP archive", "end-of-central-directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.pt"]


def test_a_second_end_record_reaching_the_end_of_the_file_is_refused(
    original: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the junk bytes both records are self-consistent: ckptsurgeon took the last one, as
    torch does, but a reader that checks comment lengths could take either."""
    entries = _entries(original)
    crafted = tmp_path / "crafted.pt"
    crafted.write_bytes(_two_central_directories(entries, _index(entries, "/data/0"), junk=b""))
    _refused(
        ["inspect", str(crafted), "--json"], capsys, "ambiguous ZIP archive", "two end-of-central-directory records"
    )


@pytest.mark.parametrize("variant", ["DATA/0", "Data/0", "daTa/0"])
@pytest.mark.parametrize("before", [True, False], ids=["listed-before", "listed-after"])
def test_members_whose_names_differ_only_in_case_are_refused(
    variant: str, before: bool, original: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = _entries(original)
    i = _index(entries, "/data/0")
    other = ZipEntry(f"orig/{variant}", _evil(entries[i].data))
    entries.insert(i if before else i + 1, other)
    crafted = tmp_path / "crafted.pt"
    crafted.write_bytes(bytes(write_zip(entries).data))
    _refused(
        ["diff", str(original), str(crafted)],
        capsys,
        "crafted.pt",
        "ambiguous ZIP archive",
        "differ only in case",
        f"'orig/{variant}'",
    )


def test_torch_reads_the_case_variant_in_one_of_the_orders(original: Path, tmp_path: Path) -> None:
    """Why the case variants must be refused: torch's binary search over case-folded names finds
    the other member (here when it is listed after the real one)."""
    entries = _entries(original)
    i = _index(entries, "/data/0")
    read_evil = []
    for at in (i, i + 1):
        es = list(entries)
        es.insert(at, ZipEntry("orig/DATA/0", _evil(entries[i].data)))
        path = tmp_path / f"v{at}.pt"
        path.write_bytes(bytes(write_zip(es).data))
        read_evil.append(not torch.equal(_torch(path)["w"], _state_dict()["w"]))
    assert any(read_evil)


# ------------------------------------------------------------ the rest of what torch's reader does


def test_records_are_looked_up_with_case_folded_as_torch_does(original: Path, tmp_path: Path) -> None:
    """torch finds `orig/BYTEORDER` when it asks for `byteorder` (and byte-swaps a big-endian
    file): ckptsurgeon must not read such a file as little-endian."""
    entries = _entries(original)
    swapped = []
    for e in entries:
        if e.name == "orig/byteorder":
            swapped.append(ZipEntry("orig/BYTEORDER", b"big"))
        elif e.name == "orig/data/0":  # float32 w, stored big-endian
            swapped.append(ZipEntry(e.name, struct.pack(">6f", *range(6))))
        elif e.name == "orig/data/1":  # int64 b
            swapped.append(ZipEntry(e.name, struct.pack(">3q", 1, 2, 3)))
        elif e.name == "orig/data/2":  # bfloat16 h
            h = _state_dict()["h"].view(torch.int16).tolist()
            swapped.append(ZipEntry(e.name, struct.pack(">4h", *h)))
        else:
            swapped.append(e)
    path = tmp_path / "big.pt"
    path.write_bytes(bytes(write_zip(swapped).data))
    theirs = _torch(path)
    _assert_same(theirs, _state_dict())
    _assert_same(_ours(path), theirs)


def test_records_in_other_case_are_read_as_torch_reads_them(original: Path, tmp_path: Path) -> None:
    entries = [
        ZipEntry(e.name.replace("data.pkl", "DATA.PKL").replace("data/1", "Data/1"), e.data) for e in _entries(original)
    ]
    path = tmp_path / "upper.pt"
    path.write_bytes(bytes(write_zip(entries).data))
    _assert_same(_ours(path), _torch(path))


@pytest.mark.parametrize("name", ["other/x", "ORIG/version2", "orig"])
def test_a_member_outside_the_archive_folder_is_refused_as_torch_refuses_it(
    name: str, original: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "outside.pt"
    path.write_bytes(bytes(write_zip(_entries(original) + [ZipEntry(name, b"hello")]).data))
    with pytest.raises(RuntimeError, match="not in a subdirectory"):
        _torch(path)
    _refused(["inspect", str(path)], capsys, "outside.pt", f"{name!r}", "outside the archive folder 'orig/'")


def _with_tail(original: Path, change: str) -> bytes:
    lay = write_zip(_entries(original))
    data = lay.data
    if change == "trailing":
        return bytes(data) + b"\0\0"
    if change == "gap":  # junk between the central directory and the ZIP64 end record
        junk = b"PK\x01\x02" + b"\0" * 12
        struct.pack_into("<Q", data, lay.locator + 8, lay.zip64_eocd + len(junk))
        return bytes(data[: lay.zip64_eocd] + junk + data[lay.zip64_eocd :])
    if change == "zip64-gap":  # junk between the ZIP64 end record and its locator
        return bytes(data[: lay.locator] + b"\0" * 8 + data[lay.locator :])
    if change == "zip64-extensible":  # a ZIP64 end record claiming an extensible data sector
        struct.pack_into("<Q", data, lay.zip64_eocd + 4, 44 + 8)
        return bytes(data[: lay.locator] + b"\0" * 8 + data[lay.locator :])
    if change == "eocd32-offset":  # the 32-bit end record points elsewhere than the ZIP64 one
        struct.pack_into("<I", data, lay.eocd + 16, lay.central[1])
        return bytes(data)
    if change == "eocd32-entries":
        n = len(lay.central) - 1
        struct.pack_into("<HH", data, lay.eocd + 8, n, n)
        return bytes(data)
    if change == "comment-signature":  # a signature in the comment's last 21 bytes (miniz skips it)
        comment = b"note PK\x05\x06 end"
        struct.pack_into("<H", data, lay.eocd + 20, len(comment))
        return bytes(data) + comment
    raise AssertionError(change)


@pytest.mark.parametrize("change", ["gap", "zip64-gap", "zip64-extensible", "eocd32-offset", "eocd32-entries"])
def test_anything_between_the_central_directory_and_the_end_is_refused(
    change: str, original: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"{change}.pt"
    path.write_bytes(_with_tail(original, change))
    _assert_same(_torch(path), _state_dict())  # torch does not look there
    _refused(["diff", str(original), str(path)], capsys, f"{change}.pt", "ambiguous ZIP archive")


@pytest.mark.parametrize("change", ["trailing", "comment-signature"])
def test_trailing_bytes_and_signatures_in_the_comment_are_named(
    change: str, original: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"{change}.pt"
    path.write_bytes(_with_tail(original, change))
    _assert_same(_torch(path), _state_dict())
    _refused(["inspect", str(path)], capsys, f"{change}.pt", "ambiguous ZIP archive")


def test_a_plain_archive_comment_is_still_read(original: Path, tmp_path: Path) -> None:
    lay = write_zip(_entries(original))
    comment = b"written by a tool that signs its archives"
    struct.pack_into("<H", lay.data, lay.eocd + 20, len(comment))
    path = tmp_path / "comment.pt"
    path.write_bytes(bytes(lay.data) + comment)
    _assert_same(_ours(path), _torch(path))


# ------------------------------------------------------------------------ the oracle, zip format

_NAME_VARIANTS = ["same", "upper", "upper-folder", "swap-one", "other-folder", "folder-case", "nul"]


def _variant(name: str, kind: str, pick: int) -> str:
    folder, _, rest = name.partition("/")
    if kind == "same":
        return name
    if kind == "upper":
        return name.upper()
    if kind == "upper-folder":
        return folder + "/" + rest.upper()
    if kind == "swap-one":
        letters = [i for i, c in enumerate(name) if c.isalpha()]
        i = letters[pick % len(letters)]
        return name[:i] + name[i].swapcase() + name[i + 1 :]
    if kind == "other-folder":
        return "other/" + rest
    if kind == "folder-case":
        return folder.upper() + "/" + rest
    if kind == "nul":
        return name + "\0"
    raise AssertionError(kind)


@st.composite
def _zip_plan(draw: Any) -> dict[str, Any]:
    op = st.tuples(
        st.sampled_from(["add", "rename", "front"]),
        st.integers(0, 50),
        st.sampled_from(_NAME_VARIANTS),
        st.integers(0, 50),
        st.integers(0, 50),
    )
    member_ops = draw(st.one_of(st.just([]), st.lists(op, min_size=1, max_size=3)))
    tail = draw(
        st.sampled_from(
            [
                "none",
                "none",
                "trailing",
                "comment",
                "comment",
                "fake-end",
                "two-directories",
                "gap",
                "eocd32",
                "signature-in-data",
            ]
        )
    )
    return {
        "members": member_ops,
        "tail": tail,
        "junk": draw(st.binary(max_size=24)),
        "sig_at": draw(st.integers(0, 24)),
        "count_comment": draw(st.booleans()),
        "target": draw(st.integers(0, 50)),
    }


def _build(entries: list[ZipEntry], plan: dict[str, Any]) -> bytes:
    entries = list(entries)
    for op, target, kind, pick, at in plan["members"]:
        e = entries[target % len(entries)]
        name = _variant(e.name, kind, pick)
        if op == "add":
            entries.insert(at % (len(entries) + 1), ZipEntry(name, _evil(e.data)))
        elif op == "rename":
            entries[target % len(entries)] = ZipEntry(name, e.data)
        else:
            entries.insert(0, entries.pop(target % len(entries)))
    tail, junk = plan["tail"], plan["junk"]
    sig_junk = junk[: plan["sig_at"]] + b"PK\x05\x06" + junk[plan["sig_at"] :]
    if tail == "two-directories":
        data_records = [i for i, e in enumerate(entries) if "/data/" in e.name]
        if data_records:
            return _two_central_directories(entries, data_records[plan["target"] % len(data_records)], junk)
    if tail == "signature-in-data":  # a fake end record inside a member's data, near the end
        i = plan["target"] % len(entries)
        fake = EOCD.pack(b"PK\x05\x06", 0, 0, 1, 1, 46, 0, len(junk))
        entries[i] = ZipEntry(entries[i].name, entries[i].data + fake + junk)
    lay = write_zip(entries)
    data = lay.data
    if tail == "trailing":
        return bytes(data) + (sig_junk if plan["count_comment"] else junk)
    if tail in ("comment", "fake-end"):
        comment = junk if tail == "comment" else bytes(data[lay.eocd : lay.eocd + 22]) + junk
        counted = len(comment) if plan["count_comment"] else max(0, len(comment) - len(junk))
        struct.pack_into("<H", data, lay.eocd + 20, counted)
        return bytes(data) + comment
    if tail == "gap":
        struct.pack_into("<Q", data, lay.locator + 8, lay.zip64_eocd + len(junk))
        return bytes(data[: lay.zip64_eocd] + junk + data[lay.zip64_eocd :])
    if tail == "eocd32":
        struct.pack_into("<I", data, lay.eocd + 16, lay.central[plan["target"] % len(lay.central)])
    return bytes(data)


def _oracle(path: Path) -> str:
    """'refused' or 'same': ckptsurgeon refuses the file (exit 2), or reads what torch reads."""
    try:
        ours = as_torch(load_checkpoint(path).container)
    except CheckpointError as exc:
        assert exc.exit_code == 2 and str(exc).startswith(str(path)), exc
        return "refused"
    theirs = torch.load(path, weights_only=True, map_location="cpu")  # accepted: torch must load it
    _assert_same(dict(ours), dict(theirs))
    return "same"


_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_SETTINGS
@given(plan=_zip_plan())
def test_whatever_ckptsurgeon_accepts_torch_loads_with_identical_tensors_zip(
    plan: dict[str, Any], original: Path, tmp_path: Path
) -> None:
    path = tmp_path / "case.pt"
    path.write_bytes(_build(_entries(original), plan))
    event(f"{plan['tail']}: {_oracle(path)}")


def test_the_zip_oracle_sees_both_outcomes(original: Path, tmp_path: Path) -> None:
    """The generator makes files ckptsurgeon reads and files it refuses (it is not vacuous)."""
    path = tmp_path / "case.pt"
    plain = {"members": [], "tail": "none", "junk": b"", "sig_at": 0, "count_comment": True, "target": 0}
    outcomes = {}
    for name, plan in {
        "plain": plain,
        "comment": {**plain, "tail": "comment", "junk": b"hello"},
        "renamed": {**plain, "members": [("rename", 4, "upper-folder", 0, 0)]},
        "renamed-folder": {**plain, "members": [("rename", 4, "folder-case", 0, 0)]},
        "case-dup": {**plain, "members": [("add", 4, "swap-one", 3, 5)]},
        "two-directories": {**plain, "tail": "two-directories", "junk": b"\0\0"},
        "signature-in-data": {**plain, "tail": "signature-in-data", "junk": b"xy", "target": 8},
    }.items():
        path.write_bytes(_build(_entries(original), plan))
        outcomes[name] = _oracle(path)
    assert outcomes == {
        "plain": "same",
        "comment": "same",
        "renamed": "same",
        "renamed-folder": "refused",
        "case-dup": "refused",
        "two-directories": "refused",
        "signature-in-data": "same",
    }


# --------------------------------------------------------------------- the oracle, legacy format


@pytest.fixture(scope="module")
def legacy_parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[str], dict[str, bytes]]:
    """A real legacy torch.save file cut into its head (the pickles up to the object), the
    storage keys, and each key's block (int64 count + bytes)."""
    path = tmp_path_factory.mktemp("legacy") / "legacy.pt"
    torch.save(_state_dict(), path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    f = io.BytesIO(raw)
    for _ in range(4):  # magic number, protocol version, sys_info, the object: skipped unread
        for _op in pickletools.genops(f):
            pass
    head_end = f.tell()
    keys = pickle.load(f)
    pos = f.tell()
    blocks = {}
    itemsize = {t.numel(): t.element_size() for t in _state_dict().values()}  # numels differ
    for key in keys:
        (count,) = struct.unpack_from("<q", raw, pos)
        blocks[key] = raw[pos : pos + 8 + count * itemsize[count]]
        pos += len(blocks[key])
    assert pos == len(raw)
    return raw[:head_end], keys, blocks


@st.composite
def _legacy_plan(draw: Any) -> dict[str, Any]:
    key_order = draw(st.permutations(range(3)))
    return {
        "key_order": key_order,
        "block_order": draw(st.one_of(st.just(key_order), st.permutations(range(3)))),
        "duplicate": draw(st.sampled_from([None, None, None, 0, 1, 2])),
        "trailing": draw(st.one_of(st.just(b""), st.binary(min_size=1, max_size=12))),
        "cut": draw(st.sampled_from([0, 0, 0, 0, 1, 7, 9])),
    }


@_SETTINGS
@given(plan=_legacy_plan())
def test_whatever_ckptsurgeon_accepts_torch_loads_with_identical_tensors_legacy(
    plan: dict[str, Any], legacy_parts: tuple[bytes, list[str], dict[str, bytes]], tmp_path: Path
) -> None:
    head, keys, blocks = legacy_parts
    listed = [keys[i] for i in plan["key_order"]]
    if plan["duplicate"] is not None:
        listed.append(keys[plan["duplicate"]])
    # blocks in their own order, whatever the list says: the list decides which storage gets
    # which block, and torch and ckptsurgeon must agree on that (or refuse)
    body = b"".join(blocks[keys[i]] for i in plan["block_order"])
    if plan["duplicate"] is not None:
        body += blocks[keys[plan["duplicate"]]]
    data = head + pickle.dumps(listed, protocol=2) + body
    data = (data[: len(data) - plan["cut"]] if plan["cut"] else data) + plan["trailing"]
    path = tmp_path / "case.pt"
    path.write_bytes(data)
    event(_oracle(path))


def _tar_polyglot(head: bytes, rest: bytes) -> bytes:
    """A legacy file whose first 512 bytes are also a valid tar header: sys_info carries a string
    that covers the header's numeric fields (empty) and its checksum."""
    magic_and_protocol = head[: head.index(b"}")]  # sys_info is the first dict pickled
    sys_info = {
        "pad": "A" * 420,
        "protocol_version": 1001,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 4},
    }
    data = bytearray(magic_and_protocol + pickle.dumps(sys_info, protocol=2) + rest)
    start = data.index(b"A" * 420)
    assert start < 100 and start + 420 > 345
    data[100:148] = bytes(48)  # mode, uid, gid, size, mtime: empty numbers
    data[156:157] = b"0"  # a regular file
    data[157:345] = bytes(188)  # no link name, user or group names, device numbers
    chksum = 256 + sum(data[:148]) + sum(data[156:512])
    data[148:156] = b"%06o\0 " % chksum
    return bytes(data)


def test_a_legacy_file_torch_takes_for_a_tar_archive_is_refused(
    legacy_parts: tuple[bytes, list[str], dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    head, keys, blocks = legacy_parts
    f = io.BytesIO(head)
    for _ in range(3):  # magic number, protocol version, sys_info
        for _op in pickletools.genops(f):
            pass
    rest = head[f.tell() :] + pickle.dumps(keys, protocol=2) + b"".join(blocks[k] for k in keys)
    path = tmp_path / "polyglot.pt"
    path.write_bytes(_tar_polyglot(head[: f.tell()], rest))
    with pytest.raises(RuntimeError, match="legacy .tar format"):
        torch.load(path, weights_only=True)
    _refused(["inspect", str(path)], capsys, "polyglot.pt", "ambiguous legacy checkpoint", "tar")
    # without the checksum it is an ordinary legacy file to both
    data = bytearray(path.read_bytes())
    data[148:156] = b"%06o\0 " % 1
    path.write_bytes(bytes(data))
    _assert_same(_ours(path), _torch(path))
