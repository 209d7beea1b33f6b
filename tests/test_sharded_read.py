"""Directory inputs: Hugging Face sharded checkpoints (safetensors and `.bin` shards, written by
huggingface_hub's own `save_torch_state_dict`), DeepSpeed ZeRO layouts, and how a directory is
resolved. Every command reads them, the values are those huggingface_hub and torch load, and a
hostile directory is exit 2 with one line on stderr, nothing written and nothing run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import load_torch_model, save_torch_state_dict
from safetensors.torch import load_file, save_file

from ckptsurgeon.errors import BadCheckpointError
from ckptsurgeon.io import TMP_MARK, load_checkpoint, save_checkpoint

SHARD_SIZE = "5KB"  # several shards; the 40 KB `model.big.weight` is larger: a shard of its own


class Inner(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(64, 16)
        self.layer0 = torch.nn.Linear(16, 32)
        self.big = torch.nn.Linear(100, 100, bias=False)
        self.norm = torch.nn.LayerNorm(32)
        self.register_buffer("scale", torch.zeros(32, dtype=torch.bfloat16))


class TiedNet(torch.nn.Module):
    """An HF-style model: `model.*` plus an `lm_head` tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Inner()
        self.lm_head = torch.nn.Linear(16, 64, bias=False)
        self.lm_head.weight = self.model.embed.weight


def make_net(seed: int = 0) -> TiedNet:
    torch.manual_seed(seed)
    net = TiedNet()
    with torch.no_grad():
        net.model.scale.copy_(torch.randn(32).to(torch.bfloat16))
    return net


def state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return make_net(seed).state_dict()


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same state_dict written by huggingface_hub as safetensors shards and as `.bin` shards,
    and by torch.save as one file."""
    root = tmp_path_factory.mktemp("hf")
    st, pt_bin = root / "st", root / "bin"
    st.mkdir()
    pt_bin.mkdir()
    save_torch_state_dict(state_dict(), st, max_shard_size=SHARD_SIZE)
    save_torch_state_dict(state_dict(), pt_bin, max_shard_size=SHARD_SIZE, safe_serialization=False)
    torch.save(state_dict(), root / "model.pt")
    return {"st": st, "bin": pt_bin, "pt": root / "model.pt", "root": root}


def index_of(directory: Path) -> tuple[Path, dict[str, Any]]:
    (index,) = directory.glob("*.index.json")
    return index, json.loads(index.read_text())


def hub_loaded(directory: Path, *, safe: bool) -> dict[str, torch.Tensor]:
    """What huggingface_hub's own loader puts into the model, as its state_dict."""
    net = make_net(seed=123)  # other values: every one must come from the files
    load_torch_model(net, directory, strict=False, safe=safe)
    return net.state_dict()


def shards_loaded(directory: Path) -> dict[str, torch.Tensor]:
    """The union of the shards as safetensors / torch load each one."""
    _, index = index_of(directory)
    out: dict[str, torch.Tensor] = {}
    for name in dict.fromkeys(index["weight_map"].values()):
        path = directory / name
        out.update(load_file(path) if name.endswith(".safetensors") else torch.load(path, weights_only=True))
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k].view(torch.uint8) if got[k].numel() else got[k], want[k].view(torch.uint8)), k


def run_json(cli: Any, *args: Any) -> dict[str, Any]:
    r = cli(*args, "--json")
    assert r.exit_code in (0, 1), r.stderr
    return json.loads(r.stdout)


def header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def tree_digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------- what is read


def test_the_inputs_are_what_the_tests_claim(hf: dict[str, Path]) -> None:
    """huggingface_hub wrote several shards, dropped the tie from the safetensors shards (recorded
    in the index metadata), kept it in one .bin shard, and gave the big tensor a shard."""
    _, st_index = index_of(hf["st"])
    _, bin_index = index_of(hf["bin"])
    assert len(set(st_index["weight_map"].values())) >= 3
    assert st_index["metadata"]["model.embed.weight"] == "lm_head.weight"
    assert "model.embed.weight" not in st_index["weight_map"]
    assert bin_index["weight_map"]["model.embed.weight"] == bin_index["weight_map"]["lm_head.weight"]
    big = st_index["weight_map"]["model.big.weight"]
    assert [k for k, v in st_index["weight_map"].items() if v == big] == ["model.big.weight"]


def test_inspect_json_of_safetensors_shards(cli: Any, hf: dict[str, Path]) -> None:
    index_path, index = index_of(hf["st"])
    data = run_json(cli, "inspect", f"{hf['st']}/")
    want = state_dict()
    assert data["format"] == "hf-sharded"
    rows = {r["key"]: r for r in data["tensors"]}
    assert sorted(rows) == sorted(want)
    for k, t in want.items():
        assert rows[k]["shape"] == list(t.shape) and rows[k]["dtype"] == str(t.dtype).removeprefix("torch.")
    assert rows["model.scale"]["dtype"] == "bfloat16"
    # each tensor's shard: the index's, and for the tie the shard of the tensor it is tied to
    for k, r in rows.items():
        assert r["file"] == index["weight_map"].get(k, index["weight_map"].get(index["metadata"].get(k, "")))
    assert ["lm_head.weight", "model.embed.weight"] in [sorted(g) for g in data["shared_storage"]]
    names = list(dict.fromkeys(index["weight_map"].values()))
    assert [s["file"] for s in data["shards"]] == names
    for s in data["shards"]:
        assert s["format"] == "safetensors"
        assert s["bytes"] == (hf["st"] / s["file"]).stat().st_size
        assert s["num_tensors"] == len(load_file(hf["st"] / s["file"]))
    # only the index and the shard headers were read
    limit = index_path.stat().st_size + sum(header_bytes(hf["st"] / n) for n in names)
    assert 0 < data["bytes_read"] <= limit


def test_inspect_text_names_the_format_and_the_shard_count(cli: Any, hf: dict[str, Path]) -> None:
    _, index = index_of(hf["st"])
    n = len(set(index["weight_map"].values()))
    r = cli("inspect", hf["st"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"state_dict (hf-sharded, {n} shards)"
    assert r.stderr == ""  # stdout carries the data, nothing else is said


def test_key_order_is_the_index_order_grouped_by_shard_then_the_ties(hf: dict[str, Path]) -> None:
    _, index = index_of(hf["st"])
    with load_checkpoint(hf["st"]) as ckpt:
        keys = list(ckpt.state_dict)
    shards = list(dict.fromkeys(index["weight_map"].values()))
    grouped = [k for s in shards for k, v in index["weight_map"].items() if v == s]
    assert keys == grouped + ["model.embed.weight"]


def test_inspect_of_bin_shards(cli: Any, hf: dict[str, Path]) -> None:
    data = run_json(cli, "inspect", hf["bin"])
    assert data["format"] == "hf-sharded"
    assert {s["format"] for s in data["shards"]} == {"torch-zip"}
    assert sorted(r["key"] for r in data["tensors"]) == sorted(shards_loaded(hf["bin"]))


def test_an_index_file_may_be_given_itself(cli: Any, hf: dict[str, Path]) -> None:
    index_path, _ = index_of(hf["st"])
    assert run_json(cli, "inspect", index_path)["tensors"] == run_json(cli, "inspect", hf["st"])["tensors"]


@pytest.mark.parametrize("kind", ["st", "bin"])
def test_extract_gives_what_huggingface_hub_loads(cli: Any, hf: dict[str, Path], tmp_path: Path, kind: str) -> None:
    out = tmp_path / "model.pt"
    r = cli("extract", hf[kind], "-o", out, "--verify")
    assert r.exit_code == 0, r.stderr
    got = torch.load(out, weights_only=True)
    if kind == "st":
        # the tie is back: the same tensor under both names, as huggingface_hub's loader gives it
        assert_same(got, hub_loaded(hf[kind], safe=True))
    else:
        # .bin shards hold what they hold (torch keeps the tie inside its shard)
        assert_same(got, shards_loaded(hf[kind]))
        assert_same(got, hub_loaded(hf[kind], safe=False))
    assert got["lm_head.weight"].data_ptr() == got["model.embed.weight"].data_ptr()


def test_extract_to_safetensors_keeps_the_tie_the_hub_way(cli: Any, hf: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    r = cli("extract", f"{hf['st']}/", "-o", out)
    assert r.exit_code == 0, r.stderr
    net = make_net(seed=7)
    load_torch_model(net, out, strict=False)  # the model re-ties; every value comes from the file
    assert_same(net.state_dict(), state_dict())
    with load_checkpoint(out) as ckpt:  # and ckptsurgeon's reader gives the tie back
        assert ckpt.state_dict["model.embed.weight"] is ckpt.state_dict["lm_head.weight"]


def test_diff_across_formats(cli: Any, hf: dict[str, Path]) -> None:
    r = cli("diff", f"{hf['st']}/", hf["pt"])
    assert r.exit_code == 0, r.stdout + r.stderr
    assert r.stdout == f"identical: {len(state_dict())} tensors equal\n"
    data = run_json(cli, "diff", hf["bin"], hf["st"])
    assert data["identical"] is True and data["num_equal"] == len(state_dict())
    # bytes_read counts both sides: every value of both was compared
    sizes = sum(p.stat().st_size for d in (hf["bin"], hf["st"]) for p in d.iterdir() if not p.name.endswith("json"))
    assert data["bytes_read"] >= 0.9 * sizes


def test_merge_a_directory_with_a_file(cli: Any, hf: dict[str, Path], tmp_path: Path) -> None:
    head = tmp_path / "head.safetensors"
    save_file({"classifier.weight": torch.randn(3, 16), "classifier.bias": torch.randn(3)}, head)
    out = tmp_path / "x.pt"
    data = run_json(cli, "merge", f"{hf['st']}/", head, "-o", out)
    got = torch.load(out, weights_only=True)
    assert_same(got, {**state_dict(), **load_file(head)})
    assert data["sources"]["classifier.bias"] == str(head)
    alone = run_json(cli, "extract", hf["st"], "-o", tmp_path / "alone.pt")
    assert data["bytes_read"] >= alone["bytes_read"] + head.stat().st_size - 200  # both inputs counted


def test_rename_a_directory_into_one_safetensors_file(cli: Any, hf: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    data = run_json(cli, "rename", f"{hf['st']}/", "-o", out, "--strip-prefix", "model.")
    assert data["num_changed"] == len(state_dict()) - 1  # all but lm_head.weight
    assert data["bytes_read"] > 0
    got = load_file(out)
    want = {k.removeprefix("model."): v for k, v in state_dict().items()}
    del want["lm_head.weight"]  # written once, under the first name; the tie recorded in the metadata
    assert_same(got, want)
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        assert f.metadata()["lm_head.weight"] == "embed.weight"


def test_every_json_document_has_bytes_read(cli: Any, hf: dict[str, Path], tmp_path: Path) -> None:
    docs = [
        run_json(cli, "inspect", hf["pt"]),
        run_json(cli, "extract", hf["bin"], "-o", tmp_path / "a.pt", "--dry-run"),
        run_json(cli, "extract", hf["bin"], "-o", tmp_path / "a.pt", "-i", "model.layer0"),
        run_json(cli, "rename", hf["pt"], "-o", tmp_path / "b.pt", "--add-prefix", "x."),
        run_json(cli, "merge", hf["st"], hf["bin"], "-o", tmp_path / "c.pt", "--on-conflict", "first"),
        run_json(cli, "diff", hf["pt"], hf["pt"]),
    ]
    for d in docs:
        assert isinstance(d["bytes_read"], int) and d["bytes_read"] > 0, d


@pytest.mark.parametrize("kind", ["st", "bin"])
def test_the_result_is_the_same_for_every_number_of_jobs(
    cli: Any, hf: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    docs, outputs = [], []
    for n in (1, 2, 5):
        docs.append(run_json(cli, "inspect", hf[kind], "--jobs", n))
        (tmp_path / str(n)).mkdir()
        out = tmp_path / str(n) / "out.pt"
        assert cli("extract", hf[kind], "-o", out, "-j", n).exit_code == 0
        with zipfile.ZipFile(out) as z:  # all but the random id torch.save writes too
            outputs.append({i.filename: z.read(i) for i in z.infolist() if "serialization_id" not in i.filename})
    assert docs[0] == docs[1] == docs[2]
    assert outputs[0] == outputs[1] == outputs[2]


def test_the_checkpoint_owns_and_closes_every_shard(hf: dict[str, Path]) -> None:
    ckpt = load_checkpoint(hf["st"], threads=3)
    _, index = index_of(hf["st"])
    assert len(ckpt.sources) == 1 + len(set(index["weight_map"].values()))  # the index and each shard, once
    shard_sources = {t.storage.source for t in ckpt.state_dict.values()}
    assert all(any(s is o for o in ckpt.sources) for s in shard_sources)
    ckpt.close()
    assert all(s.closed for s in ckpt.sources)
    from ckptsurgeon.engine.data import read_bytes

    with pytest.raises(BadCheckpointError, match="closed"):
        read_bytes(ckpt.state_dict["model.big.weight"].storage, 0, 4)


# ------------------------------------------------------------------ per-shard integrity checks


def test_a_corrupt_bin_shard_record_is_named(cli: Any, hf: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "bin"
    shutil.copytree(hf["bin"], d)
    _, index = index_of(d)
    shard = d / index["weight_map"]["model.big.weight"]
    with load_checkpoint(shard) as ckpt:
        offset = ckpt.state_dict["model.big.weight"].storage.data_offset
    data = bytearray(shard.read_bytes())
    data[offset + 100] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "out.pt"
    r = cli("extract", d, "-o", out)
    assert r.exit_code == 2
    assert "CRC-32 mismatch" in r.stderr and shard.name in r.stderr and len(r.stderr.splitlines()) == 1
    assert not out.exists()
    r = cli("inspect", d, "--verify")
    assert r.exit_code == 2 and "CRC-32 mismatch" in r.stderr


def test_a_shard_changed_while_reading_is_refused(hf: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "bin"
    shutil.copytree(hf["bin"], d)
    _, index = index_of(d)
    shard = d / index["weight_map"]["model.layer0.weight"]
    ckpt = load_checkpoint(d)
    with open(shard, "ab") as f:
        f.write(b"\0" * 64)
    out = tmp_path / "out.pt"
    with pytest.raises(BadCheckpointError, match="changed while it was being read") as e:
        save_checkpoint(ckpt.state_dict, out)
    assert shard.name in str(e.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(TMP_MARK)]


# ------------------------------------------------------------------------------ layout rules


def test_a_directory_with_one_checkpoint_file_is_that_file(cli: Any, tmp_path: Path) -> None:
    d = tmp_path / "snapshot"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "README.md").write_text("# model")
    save_file({"w": torch.ones(2, 2)}, d / "model.safetensors")
    data = run_json(cli, "inspect", d)
    assert data["format"] == "safetensors" and [r["key"] for r in data["tensors"]] == ["w"]
    assert "shards" not in data


def test_symlinked_shards_like_the_hub_cache(cli: Any, hf: dict[str, Path], tmp_path: Path) -> None:
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for p in hf["st"].iterdir():
        blob = blobs / hashlib.sha256(p.name.encode()).hexdigest()
        shutil.copy(p, blob)
        (snapshot / p.name).symlink_to(os.path.relpath(blob, snapshot))
    out = tmp_path / "out.pt"
    assert cli("extract", snapshot, "-o", out).exit_code == 0
    assert_same(torch.load(out, weights_only=True), state_dict())


def _error(cli: Any, *args: Any) -> str:
    r = cli(*args)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_directories_that_hold_no_single_checkpoint(cli: Any, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty" in _error(cli, "inspect", empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "sub").mkdir()
    line = _error(cli, "inspect", other)
    assert "config.json" in line and "sub/" in line
    two = tmp_path / "two"
    two.mkdir()
    torch.save({"w": torch.ones(1)}, two / "a.pt")
    save_file({"w": torch.ones(1)}, two / "b.safetensors")
    line = _error(cli, "inspect", two)
    assert "'a.pt'" in line and "'b.safetensors'" in line
    indexes = tmp_path / "indexes"
    indexes.mkdir()
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        (indexes / name).write_text('{"weight_map": {}}')
    line = _error(cli, "inspect", indexes)
    assert "several index files" in line and "model.safetensors.index.json" in line
    before = tree_digest(tmp_path)
    for d in (empty, other, two, indexes):
        assert _error(cli, "extract", d, "-o", tmp_path / "out.pt") == _error(cli, "inspect", d)
    assert tree_digest(tmp_path) == before  # nothing written


def test_a_dcp_directory_is_recognised(cli: Any, tmp_path: Path) -> None:
    """`.metadata` makes a directory DCP (read by engine.dcp: tests/test_dcp*.py), whatever else is there."""
    d = tmp_path / "dcp"
    d.mkdir()
    (d / ".metadata").write_bytes(b"\x80\x04")  # a truncated pickle: DCP's reader says so
    (d / "__0_0.distcp").write_bytes(b"")
    (d / "model.safetensors.index.json").write_text("{}")
    assert ".metadata" in _error(cli, "inspect", d)


# ------------------------------------------------------------------------- hostile directories


def _shard(directory: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, directory / name)


def _hostile(root: Path, weight_map: Any, *, shards: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """A directory with two honest safetensors shards and an index of our making."""
    d = root / "hostile"
    d.mkdir()
    for name, tensors in (
        shards or {"a.safetensors": {"x": torch.ones(2)}, "b.safetensors": {"y": torch.zeros(3)}}
    ).items():
        _shard(d, name, tensors)
    text = weight_map if isinstance(weight_map, (str, bytes)) else json.dumps({"weight_map": weight_map})
    (d / "model.safetensors.index.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return d


HOSTILE_INDEXES: dict[str, tuple[Any, str]] = {
    "parent": ({"x": "a.safetensors", "y": "../outside.safetensors"}, "(..)"),
    "nested parent": ({"x": "a.safetensors", "y": "sub/../../outside.safetensors"}, "(..)"),
    "absolute": ({"x": "a.safetensors", "y": "/OUTSIDE/outside.safetensors"}, "absolute"),
    "drive": ({"x": "C:\\outside.safetensors"}, "absolute"),
    "drive relative": ({"x": "C:outside.safetensors"}, "absolute"),
    "unc": ({"x": "\\\\server\\share\\outside.safetensors"}, "absolute"),
    "backslash parent": ({"x": "..\\outside.safetensors"}, "(..)"),
    "wrong extension": ({"x": "a.safetensors", "y": "b.bin"}, "does not end in .safetensors"),
    "key its shard lacks": ({"x": "a.safetensors", "y": "b.safetensors", "z": "a.safetensors"}, "'z'"),
    "key given to another shard": ({"x": "b.safetensors", "y": "a.safetensors"}, "gives to 'a.safetensors'"),
    "empty weight_map": ({}, "lists no tensor"),
    "shard not a string": ({"x": 1}, "not a name"),
    "weight_map not an object": ('{"weight_map": ["a.safetensors"]}', "'weight_map' object"),
    "not JSON": ('{"weight_map": {"x": "a.safetensors"', "not JSON"),
    "not UTF-8": (b'{"weight_map": {"x": "a\xff.safetensors"}}', "not JSON"),
    "a name twice": ('{"weight_map": {"x": "a.safetensors", "x": "b.safetensors"}}', "appears twice"),
    "missing shard": ({"x": "a.safetensors", "y": "c.safetensors"}, "no such file"),
    "nul": ({"x": "a\u0000.safetensors"}, "not a file name"),
}


@pytest.mark.parametrize("case", list(HOSTILE_INDEXES))
def test_hostile_indexes_are_refused(cli: Any, tmp_path: Path, case: str) -> None:
    weight_map, message = HOSTILE_INDEXES[case]
    (tmp_path / "outside.safetensors").write_bytes(b"not read")  # what `..` would reach
    d = _hostile(tmp_path, weight_map)
    before = tree_digest(tmp_path)
    out = tmp_path / "out.pt"
    for command in (("inspect", d), ("extract", d, "-o", out), ("diff", d, d)):
        line = _error(cli, *command)
        assert message in line, line
    assert not out.exists()
    assert tree_digest(tmp_path) == before  # nothing written, inputs untouched


def test_a_shard_holding_a_key_the_index_gives_to_another_is_named(cli: Any, tmp_path: Path) -> None:
    shards = {"a.safetensors": {"x": torch.ones(2), "y": torch.ones(1)}, "b.safetensors": {"y": torch.zeros(3)}}
    d = _hostile(tmp_path, {"x": "a.safetensors", "y": "b.safetensors"}, shards=shards)
    line = _error(cli, "extract", d, "-o", tmp_path / "o.pt")
    assert "a.safetensors: the shard holds 'y', which the index" in line and "gives to 'b.safetensors'" in line
    assert not (tmp_path / "o.pt").exists()


def test_a_tensor_in_two_shards_is_refused_even_unlisted(cli: Any, tmp_path: Path) -> None:
    shards = {"a.safetensors": {"x": torch.ones(2), "u": torch.ones(1)}, "b.safetensors": {"u": torch.zeros(3)}}
    d = _hostile(tmp_path, {"x": "a.safetensors", "u_": "b.safetensors"}, shards=shards)
    assert "in two shards" in _error(cli, "inspect", d)


def test_a_tensor_the_index_does_not_list_is_read_with_a_warning(cli: Any, tmp_path: Path) -> None:
    shards = {"a.safetensors": {"x": torch.ones(2), "extra": torch.ones(1)}, "b.safetensors": {"y": torch.zeros(3)}}
    d = _hostile(tmp_path, {"x": "a.safetensors", "y": "b.safetensors"}, shards=shards)
    r = cli("inspect", d, "--json")
    assert r.exit_code == 0, r.stderr
    assert [t["key"] for t in json.loads(r.stdout)["tensors"]] == ["x", "extra", "y"]
    assert "warning:" in r.stderr and "'extra'" in r.stderr


def test_an_oversized_index_is_refused_before_it_is_parsed(cli: Any, tmp_path: Path) -> None:
    text = json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}})
    d = _hostile(tmp_path, text + " " * (10 * 1024 * 1024 + 1 - len(text)))
    assert "exceeds the 10485760 byte limit" in _error(cli, "inspect", d)


def test_a_shard_whose_content_is_not_its_extension(cli: Any, tmp_path: Path) -> None:
    d = _hostile(tmp_path, {"x": "a.safetensors", "y": "b.safetensors"})
    torch.save({"y": torch.zeros(3)}, d / "b.safetensors")  # a pickle named .safetensors
    assert "a torch-zip file, not a safetensors shard" in _error(cli, "inspect", d)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    save_file({"y": torch.zeros(3)}, bin_dir / "pytorch_model-00001-of-00001.bin")
    (bin_dir / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"y": "pytorch_model-00001-of-00001.bin"}})
    )
    assert "a safetensors file, not a torch-zip or torch-legacy shard" in _error(cli, "inspect", bin_dir)


def test_a_git_lfs_pointer_shard_says_so(cli: Any, tmp_path: Path) -> None:
    d = _hostile(tmp_path, {"x": "a.safetensors", "y": "b.safetensors"})
    (d / "b.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n")
    assert "git lfs pull" in _error(cli, "inspect", d)


def test_a_pickle_payload_in_a_bin_shard_never_runs(cli: Any, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    d = tmp_path / "bin"
    d.mkdir()
    torch.save({"w": torch.ones(2)}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({"v": torch.ones(2), "evil": Payload()}, d / "pytorch_model-00002-of-00002.bin")
    weight_map = {"w": "pytorch_model-00001-of-00002.bin", "v": "pytorch_model-00002-of-00002.bin"}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = tmp_path / "out.pt"
    line = _error(cli, "extract", d, "-o", out)
    assert "refused to unpickle" in line and "system" in line and "pytorch_model-00002-of-00002.bin" in line
    assert not marker.exists() and not out.exists()


# ---------------------------------------------------------------------------------- DeepSpeed


def _deepspeed_run(root: Path, *, zero3: bool = False) -> tuple[Path, dict[str, torch.Tensor]]:
    """A DeepSpeed checkpoint directory as `engine.save_checkpoint` lays it out (plain values where
    DeepSpeed pickles its own classes): `latest`, `zero_to_fp32.py`, and the tag directory."""
    sd = state_dict()
    run = root / "run"
    tag = run / "global_step10"
    tag.mkdir(parents=True)
    (run / "latest").write_text("global_step10")
    (run / "zero_to_fp32.py").write_text("# DeepSpeed's consolidation script\n")
    states = {
        "module": sd,
        "buffer_names": ["model.scale"],
        "optimizer": None,
        "lr_scheduler": None,
        "sparse_tensor_module_names": [],
        "skipped_steps": 0,
        "global_steps": 10,
        "global_samples": 80,
        "dp_world_size": 2,
        "mp_world_size": 1,
        "ds_config": {"zero_optimization": {"stage": 3 if zero3 else 2}, "train_batch_size": 8},
        "ds_version": "0.16.4",
    }
    for rank in (0, 1):
        optim = {
            "optimizer_state_dict": {"zero_stage": 3 if zero3 else 2, "partition_count": 2},
            "ds_version": "0.16.4",
        }
        torch.save(optim, tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        if zero3:
            empty = {k: torch.empty(0, dtype=v.dtype) for k, v in sd.items()}
            torch.save({**states, "module": empty}, tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    if not zero3:
        torch.save(states, tag / "mp_rank_00_model_states.pt")
    return run, sd


def test_deepspeed_zero2_is_read_through_latest_or_the_tag(cli: Any, tmp_path: Path) -> None:
    run, sd = _deepspeed_run(tmp_path)
    for where in (run, run / "global_step10"):
        data = run_json(cli, "inspect", where)
        assert data["format"] == "deepspeed" and data["state_dict_key"] == "module"
        assert data["other_entries"]["global_steps"] == "10"
        out = tmp_path / f"{where.name}.pt"
        r = cli("extract", where, "-o", out)
        assert r.exit_code == 0, r.stderr
        assert "using the state_dict at key 'module'" in r.stderr
        assert_same(torch.load(out, weights_only=True), sd)


def test_deepspeed_zero3_is_refused_with_the_way_out(cli: Any, tmp_path: Path) -> None:
    run, _ = _deepspeed_run(tmp_path, zero3=True)
    for where in (run, run / "global_step10"):
        line = _error(cli, "extract", where, "-o", tmp_path / "o.pt")
        assert "ZeRO-3" in line and "partitioned across 2 ranks" in line and "zero_to_fp32.py" in line
    assert not (tmp_path / "o.pt").exists()


def test_deepspeed_module_of_empty_placeholders_is_refused(cli: Any, tmp_path: Path) -> None:
    run, sd = _deepspeed_run(tmp_path)
    states = torch.load(run / "global_step10" / "mp_rank_00_model_states.pt", weights_only=True)
    states["module"] = OrderedDict((k, torch.empty(0, dtype=v.dtype)) for k, v in sd.items())
    torch.save(states, run / "global_step10" / "mp_rank_00_model_states.pt")
    assert "zero_to_fp32.py" in _error(cli, "inspect", run)


@pytest.mark.parametrize(
    ("latest", "message"),
    [("../elsewhere", "not a DeepSpeed tag name"), ("global_step99", "is not a directory"), ("", "tag name")],
)
def test_a_bad_latest_tag_is_refused(cli: Any, tmp_path: Path, latest: str, message: str) -> None:
    run, _ = _deepspeed_run(tmp_path)
    (run / "latest").write_text(latest)
    assert message in _error(cli, "inspect", run)


def test_model_parallel_deepspeed_is_refused(cli: Any, tmp_path: Path) -> None:
    run, _ = _deepspeed_run(tmp_path)
    shutil.copy(
        run / "global_step10" / "mp_rank_00_model_states.pt", run / "global_step10" / "mp_rank_01_model_states.pt"
    )
    assert "model-parallel" in _error(cli, "inspect", run)


def test_the_first_bad_shard_is_named_whatever_the_number_of_jobs(cli: Any, tmp_path: Path) -> None:
    d = _hostile(tmp_path, {"x": "a.safetensors", "y": "b.safetensors"})
    (d / "a.safetensors").write_text("not a checkpoint: the first shard")
    (d / "b.safetensors").write_bytes(b"\x00" * 64)
    lines = {_error(cli, "inspect", d, "--jobs", n) for n in (1, 2, 4)}
    assert len(lines) == 1 and "a.safetensors: not a checkpoint: plain text" in lines.pop()


def test_jobs_must_be_a_positive_number(cli: Any, hf: dict[str, Path]) -> None:
    assert "--jobs 0" in _error(cli, "inspect", hf["st"], "--jobs", 0)


def test_long_names_are_quoted_whole_in_errors(cli: Any, tmp_path: Path) -> None:
    key = "model.layers.31.self_attention.query_key_value.lora_adapter.weight"
    d = _hostile(tmp_path, {"x": "a.safetensors", "y": "b.safetensors", key: "a.safetensors"})
    assert repr(key) in _error(cli, "inspect", d)


def test_bin_shards_in_torch_legacy_format(cli: Any, tmp_path: Path) -> None:
    """Old Hub repositories hold `.bin` shards saved before torch 1.6 (not zip files)."""
    d = tmp_path / "old"
    d.mkdir()
    sd = state_dict()
    names = {k: f"pytorch_model-0000{1 + i % 2}-of-00002.bin" for i, k in enumerate(sd)}
    for shard in sorted(set(names.values())):
        part = {k: v for k, v in sd.items() if names[k] == shard}
        torch.save(part, d / shard, _use_new_zipfile_serialization=False)
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    data = run_json(cli, "inspect", d)
    assert {s["format"] for s in data["shards"]} == {"torch-legacy"}
    out = tmp_path / "out.safetensors"
    assert cli("extract", d, "-o", out).exit_code == 0
    got = load_file(out)
    got.setdefault("model.embed.weight", got["lm_head.weight"])  # a tie is written once
    assert_same(got, sd)
