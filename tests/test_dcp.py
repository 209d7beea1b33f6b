"""torch.distributed.checkpoint (DCP) directories: the engine's reader against what torch's own
`dcp_to_torch_save` / `dcp.load` give for directories written by `dcp.save` (one process, and two
gloo ranks with DTensors sharded on dim 0, on dim 1 and replicated; the default and the
SAFETENSORS serialization formats), hostile directories, and the writer read back by torch."""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from ckptsurgeon.containers import find_state_dict
from ckptsurgeon.engine.data import read_bytes
from ckptsurgeon.engine.dcp import AssembledSource, NotRead, read_dcp, read_dcp_metadata
from ckptsurgeon.engine.dcp_metadata import MAX_METADATA_BYTES
from ckptsurgeon.engine.dcp_write import write_dcp
from ckptsurgeon.engine.materialize import to_torch
from ckptsurgeon.engine.meta import TensorMeta
from ckptsurgeon.engine.read import read_checkpoint
from ckptsurgeon.errors import BadCheckpointError, UnsafeCheckpointError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


# -- inputs written by torch -------------------------------------------------------------------


def full_state() -> dict[str, Any]:
    """What the ranks save, unsharded: the values torch must load back."""
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            "rows": torch.randn(6, 4, generator=g),  # Shard(0)
            "cols": torch.randn(3, 8, generator=g).to(torch.bfloat16),  # Shard(1)
            "rep": torch.randn(5, generator=g),  # Replicate()
            "odd": torch.randn(5, 3, generator=g),  # Shard(0), uneven: 3 + 2 rows
        },
        "optim": {
            "state": {"rows": {"exp_avg": torch.randn(6, 4, generator=g), "step": torch.tensor(3.0)}},
            "param_groups": [{"lr": 0.1, "params": ["rows"]}],
        },
        "step": 7,
    }


def _rank_main(rank: int, init_file: str, out: str) -> None:
    """One of two gloo ranks: save `full_state()` as DTensors in both serialization formats."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    full = full_state()
    m = full["model"]
    state = {
        "model": {
            "rows": distribute_tensor(m["rows"], mesh, [Shard(0)]),
            "cols": distribute_tensor(m["cols"], mesh, [Shard(1)]),
            "rep": distribute_tensor(m["rep"], mesh, [Replicate()]),
            "odd": distribute_tensor(m["odd"], mesh, [Shard(0)]),
        },
        "optim": {
            "state": {
                "rows": {
                    "exp_avg": distribute_tensor(full["optim"]["state"]["rows"]["exp_avg"], mesh, [Shard(0)]),
                    "step": full["optim"]["state"]["rows"]["step"],
                }
            },
            "param_groups": full["optim"]["param_groups"],
        },
        "step": 7,
    }
    for name, fmt in (("pt", SerializationFormat.TORCH_SAVE), ("st", SerializationFormat.SAFETENSORS)):
        dcp.save(state, storage_writer=FileSystemWriter(os.path.join(out, name), serialization_format=fmt))
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<dir>/pt` and `<dir>/st`: one state saved by two gloo ranks in each format."""
    out = tmp_path_factory.mktemp("dcp_ranks")
    init = out / "init"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(init), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in (0, 1)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output.decode(errors="replace")
    return out


@pytest.fixture(scope="session")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`full_state()` saved by `dcp.save` in one process (no process group)."""
    out = tmp_path_factory.mktemp("dcp_single") / "ckpt"
    dcp.save(full_state(), checkpoint_id=str(out))
    return out


def torch_reference(directory: Path) -> Any:
    """What torch's own consolidation gives for a DCP directory."""
    target = directory.parent / (directory.name + ".reference.pt")
    if not target.exists():
        dcp_to_torch_save(str(directory), str(target))
    return torch.load(target, weights_only=False)


def engine_values(directory: Path) -> Any:
    raw = read_dcp(str(directory))
    try:
        return to_torch(raw.obj)
    finally:
        for src in raw.extras["sources"]:
            src.close()


def assert_same(got: Any, want: Any, path: str = "") -> None:
    """Same nesting, keys, types; tensors equal bit for bit with the same dtype and shape."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), path
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), (path, list(got), list(want))
        for k in want:
            assert_same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{path}[{i}]")
    else:
        assert type(got) is type(want) and got == want, (path, got, want)


def sorted_tree(obj: Any) -> Any:
    """Dicts with sorted keys (dcp_to_torch_save orders entries as ranks planned them; the engine
    as the saved state_dict was ordered)."""
    if isinstance(obj, dict):
        return {k: sorted_tree(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [sorted_tree(v) for v in obj]
    return obj


# -- reading -------------------------------------------------------------------------------------


def test_single_process_checkpoint_reads_as_torch_consolidates_it(single: Path) -> None:
    got = engine_values(single)
    assert_same(got, torch_reference(single))
    assert_same(got, full_state())  # in the order it was saved, nested containers and the int step


def test_a_training_checkpoint_of_model_and_optimizer(tmp_path: Path) -> None:
    """What a training loop saves: `get_state_dict` of a model and AdamW, plus plain values,
    written by two writer threads (two `.distcp` files for one rank)."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    d = tmp_path / "ckpt"
    state = {"model": model_sd, "optim": optim_sd, "step": 7, "extra": {"epoch": 3, "name": "run"}}
    dcp.save(state, storage_writer=FileSystemWriter(str(d), thread_count=2))
    assert sorted(p.name for p in d.glob("*.distcp")) == ["__0_0.distcp", "__0_1.distcp"]
    got = engine_values(d)
    assert_same(sorted_tree(got), sorted_tree(torch_reference(d)))
    assert list(got["model"]) == list(model_sd)


@pytest.mark.parametrize("fmt", ["pt", "st"])
def test_two_rank_chunks_are_assembled(two_ranks: Path, fmt: str) -> None:
    got = engine_values(two_ranks / fmt)
    # torch consolidates only the default format; both hold the same values
    assert_same(sorted_tree(got), sorted_tree(torch_reference(two_ranks / "pt")))
    assert_same(got, full_state())


def test_two_rank_layout_is_what_the_test_means(two_ranks: Path) -> None:
    """The inputs really are chunked across the two rank files (dim 0, dim 1) and replicated once."""
    meta = pickle.loads((two_ranks / "pt" / ".metadata").read_bytes())
    offsets = {
        fqn: sorted(tuple(c.offsets) for c in m.chunks)
        for fqn, m in meta.state_dict_metadata.items()
        if hasattr(m, "chunks")
    }
    assert offsets["model.rows"] == [(0, 0), (3, 0)]
    assert offsets["model.cols"] == [(0, 0), (0, 4)]
    assert offsets["model.rep"] == [(0,)]
    assert {info.relative_path for info in meta.storage_data.values()} == {"__0_0.distcp", "__1_0.distcp"}


def test_single_chunk_tensors_are_plain_records_of_the_distcp_file(single: Path) -> None:
    raw = read_dcp(str(single))
    w = raw.obj["model"]["rows"]
    assert type(w) is TensorMeta
    assert w.storage.source.name.endswith("__0_0.distcp") and w.storage.crc32 is not None
    keys = {t.storage.identity for t in (raw.obj["model"]["rows"], raw.obj["model"]["rep"])}
    assert len(keys) == 2  # every item numbers its storage "0": rebased to one key per item
    for src in raw.extras["sources"]:
        src.close()


def test_the_state_dict_is_found_inside_the_container(single: Path) -> None:
    raw = read_dcp(str(single))
    path, sd = find_state_dict(raw.obj)
    assert path == ("model",) and list(sd) == ["rows", "cols", "rep", "odd"]
    path, sd = find_state_dict(raw.obj, "optim.state.rows")
    assert list(sd) == ["exp_avg", "step"]
    for src in raw.extras["sources"]:
        src.close()


def test_metadata_only_read_touches_no_distcp_byte(two_ranks: Path) -> None:
    raw = read_dcp_metadata(str(two_ranks / "pt"))
    sources = raw.extras["sources"]
    meta_src = raw.source
    assert meta_src is not None and meta_src.bytes_read == meta_src.size
    rows = raw.obj["model"]["rows"]
    assert (rows.shape, rows.dtype) == ((6, 4), "float32")
    assert (raw.obj["model"]["cols"].shape, raw.obj["model"]["cols"].dtype) == ((3, 8), "bfloat16")
    assert isinstance(raw.obj["step"], NotRead)
    distcp = [s for s in sources if s.name.endswith(".distcp")]
    assert len(distcp) == 2 and all(s.bytes_read == 0 for s in distcp)
    assert raw.extras["files"]["model.rows"] == ("__0_0.distcp", "__1_0.distcp")
    assert len(raw.extras["files"]["model.rep"]) == 1  # replicated: written once
    # read anyway, the bytes are the assembled tensor
    data = read_bytes(rows.storage, 0, rows.storage.nbytes)
    assert bytes(data) == full_state()["model"]["rows"].numpy().tobytes()
    assert sum(s.bytes_read for s in distcp) > 0
    for src in sources:
        src.close()


def test_chunked_tensor_is_assembled_only_when_read(two_ranks: Path) -> None:
    raw = read_dcp(str(two_ranks / "pt"))
    cols = raw.obj["model"]["cols"]
    src = cols.storage.source
    assert isinstance(src, AssembledSource) and src.size == 3 * 8 * 2
    assert src._fd is None  # nothing assembled yet
    want = full_state()["model"]["cols"].view(torch.int16).numpy().tobytes()
    assert bytes(read_bytes(cols.storage, 0, cols.storage.nbytes)) == want
    for s in raw.extras["sources"]:
        s.close()


def test_a_corrupt_chunk_fails_its_crc_when_assembled(two_ranks: Path, tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(two_ranks / "pt", d)
    meta = pickle.loads((d / ".metadata").read_bytes())
    info = next(v for k, v in meta.storage_data.items() if k.fqn == "model.rows" and k.offset[0] == 3)
    data_pos = _data_offset_of(d / info.relative_path, info.offset, info.length)
    with open(d / info.relative_path, "r+b") as f:  # flip a byte of the chunk's data
        f.seek(data_pos)
        b = f.read(1)
        f.seek(data_pos)
        f.write(bytes([b[0] ^ 0xFF]))
    raw = read_dcp(str(d))
    t = raw.obj["model"]["rows"]
    with pytest.raises(BadCheckpointError, match="CRC-32"):
        read_bytes(t.storage, 0, t.storage.nbytes)
    for s in raw.extras["sources"]:
        s.close()


def _data_offset_of(path: Path, offset: int, length: int) -> int:
    """Where the tensor record of the torch.save item at `offset` begins in `path`."""
    import io
    import zipfile

    blob = path.read_bytes()[offset : offset + length]
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
        local = blob[info.header_offset : info.header_offset + 30]
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
    return offset + info.header_offset + 30 + name_len + extra_len


def test_reading_and_writing_never_import_torch(two_ranks: Path, tmp_path: Path) -> None:
    code = (
        "import os, sys\n"
        "from ckptsurgeon.engine.dcp import read_dcp\n"
        "from ckptsurgeon.engine.dcp_write import write_dcp\n"
        "from ckptsurgeon.engine.data import read_bytes\n"
        "raw = read_dcp(sys.argv[1])\n"
        "t = raw.obj['model']['cols']\n"
        "read_bytes(t.storage, 0, t.storage.nbytes)\n"
        "os.mkdir(sys.argv[2])\n"
        "write_dcp(raw.obj, sys.argv[2])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'safetensors')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(two_ranks / "st"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert sorted(os.listdir(tmp_path / "out")) == [".metadata", "__0_0.distcp"]


# -- hostile directories -------------------------------------------------------------------------


def copy_with_metadata(src: Path, dst: Path, edit: Any) -> Path:
    """A copy of DCP directory `src` whose `.metadata` was edited by `edit(meta)` (with torch)."""
    shutil.copytree(src, dst)
    meta = pickle.loads((dst / ".metadata").read_bytes())
    edit(meta)
    (dst / ".metadata").write_bytes(pickle.dumps(meta, protocol=4))
    return dst


def refused(directory: Path, match: str, error: type[Exception] = BadCheckpointError) -> str:
    before = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    with pytest.raises(error, match=match) as info:
        read_dcp(str(directory))
    message = str(info.value)
    assert "\n" not in message
    assert {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == before  # untouched
    return message


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def test_a_metadata_payload_never_runs(single: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    d = copy_with_metadata(single, tmp_path / "ckpt", lambda m: setattr(m, "version", Payload(marker)))
    message = refused(d, "posix.system", UnsafeCheckpointError)
    assert "refused to unpickle" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "value", [torch.zeros(2), bytearray(b"x"), collections.OrderedDict(a=1), datetime.date(2020, 1, 1)]
)
def test_any_other_global_in_metadata_is_refused_by_name(single: Path, tmp_path: Path, value: Any) -> None:
    d = copy_with_metadata(single, tmp_path / "ckpt", lambda m: setattr(m, "version", value))
    with pytest.raises(UnsafeCheckpointError) as info:
        read_dcp(str(d))
    assert info.value.globals and all(not g.startswith("torch.distributed") for g in info.value.globals)


def test_non_tensor_values_go_through_the_restricted_unpickler(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    d = tmp_path / "ckpt"
    dcp.save(
        {"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1), "hook": Payload(marker)},
        checkpoint_id=str(d),
    )
    message = refused(d, "argparse.Namespace", UnsafeCheckpointError)
    assert "posix.system" in message
    assert not marker.exists()
    raw = read_dcp_metadata(str(d))  # inspect's reading does not unpickle them at all
    assert isinstance(raw.obj["args"], NotRead) and raw.obj["model"]["w"].shape == (2,)
    for src in raw.extras["sources"]:
        src.close()


def test_metadata_from_before_the_metadata_classes_moved(single: Path, tmp_path: Path) -> None:
    """`TensorProperties` lived in `torch.distributed._shard.sharded_tensor.metadata` before
    pytorch PR #116248 (Jan 2024)."""
    from torch.distributed._shard.sharded_tensor import metadata as old

    def edit(meta: Any) -> None:
        for entry in meta.state_dict_metadata.values():
            if hasattr(entry, "properties"):
                entry.properties = old.TensorProperties(dtype=entry.properties.dtype)

    d = copy_with_metadata(single, tmp_path / "ckpt", edit)
    assert b"torch.distributed._shard.sharded_tensor.metadata" in (d / ".metadata").read_bytes()
    assert_same(engine_values(d), full_state())


def _storage(meta: Any, fqn: str, first: int = 0) -> Any:
    return next(v for k, v in meta.storage_data.items() if k.fqn == fqn and (k.offset is None or k.offset[0] == first))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: setattr(_storage(m, "model.rows"), "length", 10**9), "outside the file"),
        (lambda m: setattr(_storage(m, "model.rows"), "offset", 10**12), "outside the file"),
        (lambda m: setattr(_storage(m, "step"), "offset", 10**9), "outside the file"),
        (lambda m: setattr(_storage(m, "model.rows"), "relative_path", "../outside.distcp"), "not a file inside"),
        (lambda m: setattr(_storage(m, "model.rows"), "relative_path", "/etc/passwd"), "not a file inside"),
        (lambda m: setattr(_storage(m, "model.rows"), "offset", 0), "zip|item"),  # another item's bytes
    ],
)
def test_items_outside_their_file_or_directory_are_refused(single: Path, tmp_path: Path, edit: Any, match: str) -> None:
    refused(copy_with_metadata(single, tmp_path / "ckpt", edit), match)


@pytest.mark.parametrize(
    ("path", "match"),
    [
        (("model", "rows", "x"), "goes through a value"),
        (("model", "rows"), "places two values"),
        (("optim", "param_groups", 900_000, "x"), "mostly holes"),
        ((0, "x"), "the path"),
        ((), "the path"),
    ],
)
def test_planner_data_that_cannot_rebuild_the_state_dict_is_refused(
    single: Path, tmp_path: Path, path: tuple[Any, ...], match: str
) -> None:
    refused(copy_with_metadata(single, tmp_path / "ckpt", lambda m: m.planner_data.update(step=path)), match)


def _rekey(meta: Any, fqn: str, old: tuple[int, ...], new: tuple[int, ...]) -> None:
    from torch.distributed.checkpoint.metadata import MetadataIndex

    entry = meta.state_dict_metadata[fqn]
    chunk = next(c for c in entry.chunks if tuple(c.offsets) == old)
    chunk.offsets = torch.Size(new)
    key = next(k for k in meta.storage_data if k.fqn == fqn and tuple(k.offset) == old)
    meta.storage_data[MetadataIndex(fqn, torch.Size(new), key.index)] = meta.storage_data.pop(key)


def _drop_chunk(meta: Any, fqn: str, offsets: tuple[int, ...]) -> None:
    entry = meta.state_dict_metadata[fqn]
    entry.chunks = [c for c in entry.chunks if tuple(c.offsets) != offsets]
    key = next(k for k in meta.storage_data if k.fqn == fqn and tuple(k.offset) == offsets)
    del meta.storage_data[key]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: _rekey(m, "model.rows", (3, 0), (2, 0)), "overlap"),
        (lambda m: _rekey(m, "model.cols", (0, 4), (0, 3)), "overlap"),
        (lambda m: _drop_chunk(m, "model.rows", (3, 0)), "cover 12 of its 24 elements"),
        (lambda m: _rekey(m, "model.rows", (3, 0), (4, 0)), "reaches past"),
        (lambda m: setattr(m.state_dict_metadata["model.rows"], "size", torch.Size([7, 4])), "cover 24 of its 28"),
    ],
)
def test_chunks_that_overlap_or_leave_holes_are_refused(two_ranks: Path, tmp_path: Path, edit: Any, match: str) -> None:
    refused(copy_with_metadata(two_ranks / "pt", tmp_path / "ckpt", edit), match)


def test_thousands_of_irregular_chunks_are_refused_not_compared_pairwise(single: Path, tmp_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    def edit(meta: Any) -> None:
        entry = meta.state_dict_metadata["model.rep"]
        info = meta.storage_data.pop(next(k for k in meta.storage_data if k.fqn == "model.rep"))
        entry.size = torch.Size([1, 5000])
        entry.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([1, 2]))] + [
            ChunkStorageMetadata(torch.Size([0, j]), torch.Size([1, 1])) for j in range(1, 5000)
        ]
        for c in entry.chunks:
            meta.storage_data[MetadataIndex("model.rep", c.offsets, 0)] = info

    refused(copy_with_metadata(single, tmp_path / "ckpt", edit), "5000 chunks that form no grid")


def _set_dtype(meta: Any, fqn: str, dtype: torch.dtype) -> None:
    meta.state_dict_metadata[fqn].properties.dtype = dtype


def _set_shape(meta: Any, fqn: str, shape: list[int]) -> None:
    entry = meta.state_dict_metadata[fqn]
    entry.size = torch.Size(shape)
    entry.chunks[0].sizes = torch.Size(shape)


@pytest.mark.parametrize("fmt", ["pt", "st"])
@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda m: _set_dtype(m, "model.rep", torch.float64),
            "float32 tensor of shape \\[5\\]; .metadata says float64",
        ),
        (lambda m: _set_shape(m, "model.rep", [4]), "shape \\[5\\]; .metadata says float32 of shape \\[4\\]"),
    ],
)
def test_items_that_disagree_with_the_metadata_are_refused(
    two_ranks: Path, tmp_path: Path, fmt: str, edit: Any, match: str
) -> None:
    refused(copy_with_metadata(two_ranks / fmt, tmp_path / "ckpt", edit), match)


def test_truncated_files_are_refused(single: Path, tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(single, d)
    data = d / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-100])
    refused(d, "outside the file")
    shutil.rmtree(d)
    shutil.copytree(single, d)
    meta = d / ".metadata"
    meta.write_bytes(meta.read_bytes()[:-40])
    refused(d, "truncated")


def test_an_oversized_metadata_is_refused_before_it_is_read(single: Path, tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(single, d)
    with open(d / ".metadata", "r+b") as f:
        f.truncate(MAX_METADATA_BYTES + 1)  # sparse: nothing of it is read
    refused(d, "more than the 256 MiB")


def test_a_missing_distcp_file_is_refused(single: Path, tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(single, d)
    (d / "__0_0.distcp").unlink()
    refused(d, "no such file")


# -- writing -------------------------------------------------------------------------------------


def test_written_checkpoint_loads_with_dcp_load_and_dcp_to_torch_save(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "model": {
            "w": base,
            "w_t": base.t(),  # a strided view: written as its own values
            "tied": base,
            "half": torch.randn(3, 5).to(torch.bfloat16),
            "scalar": torch.tensor(2.5, dtype=torch.float64),
            "empty": torch.zeros(0, 3),
        },
        "optim": {"state": {"w": {"step": torch.tensor(4.0), "exp_avg": torch.ones(4, 6)}}, "groups": [{"lr": 0.5}]},
        "step": 7,
        "epochs": [1, 2],
    }
    torch.save(state, tmp_path / "in.pt")
    raw = read_checkpoint(tmp_path / "in.pt")
    out = tmp_path / "out"
    out.mkdir()
    write_dcp(raw.obj, str(out))
    assert sorted(os.listdir(out)) == [".metadata", "__0_0.distcp"]

    dcp_to_torch_save(str(out), str(tmp_path / "back.pt"))
    assert_same(torch.load(tmp_path / "back.pt", weights_only=False), state)

    target = {
        "model": {k: torch.full_like(v, -1) for k, v in state["model"].items()},
        "optim": {"state": {"w": {"step": torch.tensor(0.0), "exp_avg": torch.zeros(4, 6)}}, "groups": [{"lr": 0.0}]},
        "step": 0,
        "epochs": [],
    }
    dcp.load(target, checkpoint_id=str(out))
    assert_same(target, state)

    again = engine_values(out)  # and the engine reads its own output
    assert_same(again, state)


def test_writer_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("keep")
    with pytest.raises(ValueError, match="empty directory"):
        write_dcp({"a": 1}, str(tmp_path))
    assert (tmp_path / "x").read_text() == "keep"


def test_round_trip_of_a_two_rank_checkpoint_through_the_writer(two_ranks: Path, tmp_path: Path) -> None:
    raw = read_dcp(str(two_ranks / "pt"))
    out = tmp_path / "out"
    out.mkdir()
    write_dcp(raw.obj, str(out))  # the chunked tensors are assembled while they are copied
    dcp_to_torch_save(str(out), str(tmp_path / "back.pt"))
    assert_same(torch.load(tmp_path / "back.pt", weights_only=False), full_state())
    for s in raw.extras["sources"]:
        s.close()


if __name__ == "__main__":  # one rank of the `two_ranks` fixture
    _rank_main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
