"""Writers choose the output layout: `--format pt|safetensors|hf|hf-bin|dcp`, `--max-shard-size`,
safetensors written by copying records, directory outputs written atomically (issue 11).

The Hub's layout is checked against huggingface_hub itself (`split_torch_state_dict_into_shards`,
`save_torch_state_dict`, `load_torch_model`), safetensors files against `safetensors.torch`, and
`.bin` shards against `torch.load`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from huggingface_hub import (
    load_state_dict_from_file,
    load_torch_model,
    save_torch_state_dict,
    split_torch_state_dict_into_shards,
)
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ckptsurgeon.errors import UsageError
from ckptsurgeon.io import TMP_MARK, OutputFormat, output_format, parse_size, write_checkpoint

SHARD = "20KB"  # small shards: the test models hold ~93 KB


class HubLM(nn.Module):
    """A toy LM: a tied embedding, a bfloat16 block, a table bigger than one shard, an empty buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)  # 8 KB
        self.block = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32)).to(torch.bfloat16)
        self.table = nn.Parameter(torch.zeros(150, 100))  # 60 KB: bigger than a 20KB shard
        self.norm = nn.LayerNorm(32)
        self.register_buffer("empty", torch.zeros(0))
        self.mid = nn.Linear(32, 128)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight


def hub_model(seed: int = 0) -> HubLM:
    torch.manual_seed(seed)
    model = HubLM()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def run(*args: object) -> subprocess.CompletedProcess[str]:
    """The console script, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "ckptsurgeon", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "ckptsurgeon-" in p.name)


def load_hf_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every shard with safetensors' own loader, ties restored from the index metadata."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        out.update(load_file(directory / name))
    for dropped, kept in index["metadata"].items():
        if dropped != "total_size":
            out[dropped] = out[kept]
    return out


# ------------------------------------------------------------------------------- the Hub's layout


def test_hf_layout_is_huggingface_hubs_exactly(tmp_path: Path) -> None:
    """Same file names, weight_map, total_size and dropped-tie metadata as save_torch_state_dict
    for the same state_dict and shard size, and the same grouping as split_torch_state_dict_into_shards
    (a tensor bigger than the limit alone, before the shard being filled)."""
    sd = hub_model().state_dict()
    torch.save(sd, tmp_path / "m.pt")
    (tmp_path / "hub").mkdir()
    save_torch_state_dict(sd, tmp_path / "hub", max_shard_size=SHARD)
    r = run("extract", tmp_path / "m.pt", "-o", f"{tmp_path / 'mine'}/", "--max-shard-size", SHARD, "--json")
    assert r.returncode == 0, r.stderr
    hub, mine = tmp_path / "hub", tmp_path / "mine"
    assert sorted(os.listdir(mine)) == sorted(os.listdir(hub))
    assert len(os.listdir(mine)) > 3  # several shards and the index
    hub_index = json.loads((hub / "model.safetensors.index.json").read_text())
    my_index = json.loads((mine / "model.safetensors.index.json").read_text())
    assert my_index == hub_index
    assert my_index["metadata"]["head.weight"] == "embed.weight"
    untied = OrderedDict((k, v) for k, v in sd.items() if k != "head.weight")
    split = split_torch_state_dict_into_shards(untied, max_shard_size=SHARD)
    assert my_index["weight_map"] == split.tensor_to_filename
    assert my_index["metadata"]["total_size"] == split.metadata["total_size"]
    assert split.tensor_to_filename["table"] == "model-00001-of-00003.safetensors"  # the big one comes first
    for name in os.listdir(mine):  # each shard's own metadata is the Hub's
        if name.endswith(".safetensors"):
            with safe_open(mine / name, framework="pt") as f:
                assert f.metadata() == {"format": "pt"}
    files = json.loads(r.stdout)["files"]
    assert [f["file"] for f in files][-1] == "model.safetensors.index.json"  # written last
    assert {f["file"]: f["bytes"] for f in files} == {n: (mine / n).stat().st_size for n in os.listdir(mine)}
    assert json.loads(r.stdout)["format"] == "hf"


def test_hf_output_loads_with_huggingface_hub_and_safetensors(tmp_path: Path) -> None:
    model = hub_model()
    sd = model.state_dict()
    torch.save(sd, tmp_path / "m.pt")
    r = run("extract", tmp_path / "m.pt", "-o", f"{tmp_path / 'out'}/", "--max-shard-size", SHARD)
    assert r.returncode == 0, r.stderr
    assert "to " in r.stderr and "as hf: 3 shards and an index" in r.stderr
    fresh = HubLM()
    result = load_torch_model(fresh, tmp_path / "out")
    # the tie is not in the shards: the Hub's loader leaves it to the model, as for its own output
    assert list(result.missing_keys) == ["head.weight"] and not result.unexpected_keys
    assert fresh.head.weight is fresh.embed.weight
    for k, v in sd.items():
        got = fresh.state_dict()[k]
        assert got.dtype == v.dtype and torch.equal(got, v), k
    loaded = load_hf_dir(tmp_path / "out")
    assert set(loaded) == set(sd)
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in sd.items())
    assert loaded["head.weight"] is loaded["embed.weight"]  # the tie comes back


def test_a_result_that_fits_one_shard_is_one_model_safetensors(tmp_path: Path) -> None:
    sd = hub_model().state_dict()
    torch.save(sd, tmp_path / "m.pt")
    r = run("extract", tmp_path / "m.pt", "-o", f"{tmp_path / 'out'}/")  # default 5GB
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path / "out") == ["model.safetensors"]
    (tmp_path / "hub").mkdir()
    save_torch_state_dict(sd, tmp_path / "hub")
    assert os.listdir(tmp_path / "hub") == ["model.safetensors"]
    got = load_state_dict_from_file(tmp_path / "out" / "model.safetensors")
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "head.weight": "embed.weight"}  # as the Hub's single file
    assert all(torch.equal(got[k], v) for k, v in sd.items() if k != "head.weight")


def test_hf_bin_shards_load_with_torch_and_keep_ties(tmp_path: Path) -> None:
    sd = hub_model().state_dict()
    torch.save(sd, tmp_path / "m.pt")
    out = tmp_path / "bin"
    r = run("extract", tmp_path / "m.pt", "-o", out, "--format", "hf-bin", "--max-shard-size", SHARD, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["format"] == "hf-bin"
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)  # every key, the tie too
    split = split_torch_state_dict_into_shards(sd, max_shard_size=SHARD, filename_pattern="pytorch_model{suffix}.bin")
    assert index["weight_map"] == split.tensor_to_filename
    assert index["metadata"] == split.metadata
    loaded: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        shard = torch.load(out / name, weights_only=True)
        assert all(index["weight_map"][k] == name for k in shard)
        loaded.update(shard)
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in sd.items())
    assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()  # a tie inside one shard
    fresh = HubLM()
    result = load_torch_model(fresh, out, strict=True, safe=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh.table, sd["table"])


def test_shards_are_byte_identical_for_every_number_of_jobs(tmp_path: Path) -> None:
    sd = hub_model().state_dict()
    torch.save(sd, tmp_path / "m.pt")
    outs = []
    for jobs in (1, 3):
        out = tmp_path / f"j{jobs}"
        r = run("extract", tmp_path / "m.pt", "-o", f"{out}/", "--max-shard-size", SHARD, "--jobs", jobs, "--verify")
        assert r.returncode == 0, r.stderr
        outs.append(snapshot(out))
    assert outs[0] == outs[1] and len(outs[0]) == 4


def test_torch_tensors_get_the_same_layout_through_the_api(tmp_path: Path) -> None:
    """Tensors the engine did not read (torch tensors) take the same writer: same files and bytes."""
    sd = hub_model().state_dict()
    torch.save(sd, tmp_path / "m.pt")
    write_checkpoint(sd, tmp_path / "api", max_shard_size=SHARD, threads=2)
    assert run("extract", tmp_path / "m.pt", "-o", f"{tmp_path / 'cli'}/", "--max-shard-size", SHARD).returncode == 0
    assert snapshot(tmp_path / "api") == snapshot(tmp_path / "cli")


# ------------------------------------------------------------------ .pt -> .safetensors, copied


def tricky_state_dict() -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(1)
    base = torch.randn(40, 30)
    emb = torch.randn(16, 8)
    return OrderedDict(
        [
            ("base", base),
            ("rows", base[5:9]),  # a contiguous part of a storage
            ("cols", base[::3, 2:7]),  # a strided view
            ("transposed", torch.randn(20, 12).t()),  # rows interleave
            ("bf16", torch.randn(7, 5).to(torch.bfloat16)),
            ("embed", emb),
            ("tied", emb),
            ("empty", torch.zeros(0, 4)),
            ("scalar", torch.tensor(3.5, dtype=torch.float64)),
            ("int8", torch.arange(-5, 5, dtype=torch.int8)),
            ("flag", torch.tensor([True, False, True])),
        ]
    )


def test_pt_to_safetensors_copies_records_bit_for_bit(tmp_path: Path) -> None:
    """Views, bfloat16, a tie, an empty and a 0-d tensor: what safetensors loads is what was saved,
    bit for bit; the file is written without importing torch (records copied)."""
    sd = tricky_state_dict()
    torch.save(sd, tmp_path / "m.pt")
    out = tmp_path / "m.safetensors"
    code = (
        "import sys\n"
        "from ckptsurgeon import jobs\n"
        f"r = jobs.extract({str(tmp_path / 'm.pt')!r}, jobs.Writing({str(out)!r}))\n"
        "print('torch' in sys.modules, r.format)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "safetensors"]
    got = load_file(out)
    with safe_open(out, framework="pt") as f:
        assert list(f.keys()) == sorted(k for k in sd if k != "tied")
        assert f.metadata() == {"format": "pt", "tied": "embed"}
    for k, v in sd.items():
        want = v.contiguous()
        g = got["embed" if k == "tied" else k]
        assert g.dtype == want.dtype and g.shape == want.shape, k
        assert g.view(-1).view(torch.uint8).tolist() == want.view(-1).view(torch.uint8).tolist(), k
    header = out.read_bytes()
    length = int.from_bytes(header[:8], "little")
    assert length % 8 == 0
    keys = [k for k in json.loads(header[8 : 8 + length]) if k != "__metadata__"]
    assert keys == [k for k in sd if k != "tied"]  # the state_dict's order in the header
    read = run("extract", out, "-o", tmp_path / "back.pt")  # and ckptsurgeon reads the tie back
    assert read.returncode == 0, read.stderr
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back["tied"].data_ptr() == back["embed"].data_ptr()


def test_a_corrupt_record_is_caught_while_copying_to_safetensors(tmp_path: Path) -> None:
    torch.save(OrderedDict(w=torch.ones(4096)), tmp_path / "m.pt")
    data = bytearray((tmp_path / "m.pt").read_bytes())
    at = data.index(torch.ones(1).numpy().tobytes() * 64) + 1000
    data[at] ^= 0xFF
    (tmp_path / "m.pt").write_bytes(bytes(data))
    line = one_line_error(run("extract", tmp_path / "m.pt", "-o", tmp_path / "m.safetensors"))
    assert "CRC-32 mismatch" in line
    assert not (tmp_path / "m.safetensors").exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------- --format, sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500MB", 500 * 10**6),
        ("5GB", 5 * 10**9),
        ("5gb", 5 * 10**9),
        ("2GiB", 2 * 2**30),
        ("64KiB", 64 * 1024),
        ("1.5GB", 1_500_000_000),
        ("123456", 123456),
        (" 40KB ", 40_000),
    ],
)
def test_max_shard_size_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["5XB", "GB", "-1MB", "0", "1e9", "5 G B", ""])
def test_bad_max_shard_size_is_exit_2_and_writes_nothing(tmp_path: Path, text: str) -> None:
    torch.save(OrderedDict(w=torch.ones(3)), tmp_path / "m.pt")
    line = one_line_error(run("extract", tmp_path / "m.pt", "-o", f"{tmp_path / 'out'}/", "--max-shard-size", text))
    assert "--max-shard-size" in line
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


def test_format_from_out(tmp_path: Path) -> None:
    (tmp_path / "existing").mkdir()
    assert output_format("a.safetensors") is OutputFormat.safetensors
    assert output_format("a.pt") is OutputFormat.pt
    assert output_format("shards/") is OutputFormat.hf
    assert output_format(str(tmp_path / "existing")) is OutputFormat.hf
    assert output_format("shards", max_shard_size="2GB") is OutputFormat.hf
    assert output_format("shards", "hf-bin", "2GB") is OutputFormat.hf_bin
    with pytest.raises(UsageError, match="--max-shard-size applies to sharded outputs"):
        output_format("a.safetensors", max_shard_size="2GB")
    with pytest.raises(UsageError, match="--format 'zip'"):
        output_format("a.pt", "zip")
    with pytest.raises(UsageError, match="a path ending in / is a directory"):
        output_format("shards/", "safetensors")


def test_max_shard_size_with_a_single_file_format_is_exit_2(tmp_path: Path) -> None:
    torch.save(OrderedDict(w=torch.ones(3)), tmp_path / "m.pt")
    r = run("extract", tmp_path / "m.pt", "-o", tmp_path / "m.safetensors", "--max-shard-size", "1GB")
    line = one_line_error(r)
    assert "--max-shard-size" in line and "safetensors" in line
    assert not (tmp_path / "m.safetensors").exists()


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    torch.save(hub_model().state_dict(), tmp_path / "m.pt")
    r = run("extract", tmp_path / "m.pt", "-o", f"{tmp_path / 'out'}/", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["format"] == "hf" and doc["written"] is False and doc["files"] == []
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


def test_rename_and_merge_write_hf_directories(tmp_path: Path) -> None:
    """Every writer takes the layouts: rename keeps the state_dict only, merge --average's result
    (computed tensors) is sharded the same way."""
    a, b = hub_model(0).state_dict(), hub_model(1).state_dict()
    torch.save({"model": a, "step": 3}, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    r = run("rename", tmp_path / "a.pt", "-o", f"{tmp_path / 'ren'}/", "--add-prefix", "m.", "--max-shard-size", SHARD)
    assert r.returncode == 0, r.stderr
    assert "holds the state_dict only" in r.stderr
    got = load_hf_dir(tmp_path / "ren")
    assert set(got) == {f"m.{k}" for k in a} and torch.equal(got["m.table"], a["table"])
    torch.save(a, tmp_path / "a_bare.pt")
    r = run("merge", tmp_path / "a_bare.pt", tmp_path / "b.pt", "--average", "-o", tmp_path / "avg", "--format", "hf")
    assert r.returncode == 0, r.stderr
    avg = load_file(tmp_path / "avg" / "model.safetensors")
    assert torch.allclose(avg["table"], (a["table"] + b["table"]) / 2, atol=1e-6)


# ------------------------------------------------------------------- atomic directory outputs


def test_existing_directory_needs_force_and_force_replaces_only_a_layout(tmp_path: Path) -> None:
    sd = hub_model().state_dict()
    torch.save(sd, tmp_path / "m.pt")
    out = tmp_path / "out"
    assert run("extract", tmp_path / "m.pt", "-o", f"{out}/", "--max-shard-size", SHARD).returncode == 0
    before = snapshot(out)
    line = one_line_error(run("extract", tmp_path / "m.pt", "-o", f"{out}/"))
    assert "pass --force" in line
    # --force: the old layout of 3 shards is replaced whole by one file
    r = run("extract", tmp_path / "m.pt", "-o", f"{out}/", "--force")
    assert r.returncode == 0, r.stderr
    assert os.listdir(out) == ["model.safetensors"]
    # a directory holding anything else is never replaced
    (out / "config.json").write_text("{}")
    before = snapshot(out)
    line = one_line_error(run("extract", tmp_path / "m.pt", "-o", f"{out}/", "--force", "--max-shard-size", SHARD))
    assert "config.json" in line and "nothing but a checkpoint layout" in line
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_a_sharded_output_never_replaces_a_file(tmp_path: Path) -> None:
    torch.save(OrderedDict(w=torch.ones(3)), tmp_path / "m.pt")
    (tmp_path / "out").write_bytes(b"precious")
    line = one_line_error(run("extract", tmp_path / "m.pt", "-o", tmp_path / "out", "--format", "hf", "--force"))
    assert "is a file" in line
    assert (tmp_path / "out").read_bytes() == b"precious"


def test_sigkill_during_a_directory_write_leaves_out_as_it_was(tmp_path: Path) -> None:
    """A run killed while writing shards leaves the old layout exactly as it was, and the next run
    removes the temporary directory the dead one left."""
    small = hub_model(0).state_dict()
    torch.save(small, tmp_path / "small.pt")
    out = tmp_path / "out"
    assert run("extract", tmp_path / "small.pt", "-o", f"{out}/", "--max-shard-size", SHARD).returncode == 0
    before = snapshot(out)
    torch.save(OrderedDict((f"t{i}", torch.randn(1 << 18)) for i in range(24)), tmp_path / "big.pt")  # 24 MB
    code = (
        "import time\n"
        "from ckptsurgeon.io import load_checkpoint, write_checkpoint\n"
        "first = []\n"
        "def progress(n):\n"  # the API's progress hook: hold the writer once a shard is done
        "    if not first:\n"
        "        first.append(n); print('writing', flush=True); time.sleep(60)\n"
        f"ckpt = load_checkpoint({str(tmp_path / 'big.pt')!r})\n"
        f"write_checkpoint(ckpt.state_dict, {str(out)!r}, max_shard_size='3MB', force=True, progress=progress)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        temps = [p for p in tmp_path.iterdir() if p.name.endswith(TMP_MARK)]
        assert len(temps) == 1 and temps[0].is_dir() and any(temps[0].iterdir())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert snapshot(out) == before
    assert run("extract", tmp_path / "big.pt", "-o", f"{out}/", "--max-shard-size", "3MB", "--force").returncode == 0
    assert leftovers(tmp_path) == []
    assert len(os.listdir(out)) == 13  # 12 shards of two 1 MiB tensors + the index
    assert torch.equal(load_hf_dir(out)["t23"], torch.load(tmp_path / "big.pt", weights_only=True)["t23"])


def test_a_layout_set_aside_by_a_killed_run_is_put_back(tmp_path: Path) -> None:
    """Where directories cannot be swapped in one step, the old layout is renamed aside before
    the new one is renamed in; a run killed between the two leaves OUT missing and the old layout
    aside: the next run puts it back before it looks at OUT."""
    sd = hub_model().state_dict()
    torch.save(sd, tmp_path / "m.pt")
    out = tmp_path / "out"
    assert run("extract", tmp_path / "m.pt", "-o", f"{out}/", "--max-shard-size", SHARD).returncode == 0
    before = snapshot(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out.rename(tmp_path / f".out.{int(dead.stdout)}.x1y2.ckptsurgeon-old")
    line = one_line_error(run("extract", tmp_path / "m.pt", "-o", f"{out}/"))  # OUT is back: it exists
    assert "pass --force" in line
    assert snapshot(out) == before and leftovers(tmp_path) == []


WRITERS = {
    "extract": lambda a, b, out: ["extract", a, "-o", out],
    "rename": lambda a, b, out: ["rename", a, "-o", out, "--add-prefix", "m."],
    "merge": lambda a, b, out: ["merge", a, b, "-o", out, "--on-conflict", "first"],
    "average": lambda a, b, out: ["merge", a, b, "-o", out, "--average"],
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_an_existing_directory_is_a_sharded_output_with_force(tmp_path: Path, writer: str) -> None:
    """An existing directory as OUT (even named like a file) means the hf layout: refused without
    --force, filled with --force; the scratch file of --average does not stay behind."""
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(OrderedDict(w=torch.ones(3)), a)
    torch.save(OrderedDict(w=torch.zeros(3)), b)
    out = tmp_path / "out.pt"
    out.mkdir()
    line = one_line_error(run(*WRITERS[writer](a, b, out)))
    assert "pass --force" in line and os.listdir(out) == []
    r = run(*WRITERS[writer](a, b, out), "--force", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["format"] == "hf"
    assert os.listdir(out) == ["model.safetensors"]
    assert leftovers(tmp_path) == []


def test_strided_views_are_laid_out_block_by_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A strided view is copied in blocks of rows (here 4 KB each), or, when its rows interleave
    (a transpose), from its span at once: the values are the view's either way."""
    from ckptsurgeon.engine import safetensors_write
    from ckptsurgeon.io import load_checkpoint

    monkeypatch.setattr(safetensors_write, "_BLOCK", 4096)
    torch.manual_seed(2)
    base = torch.randn(300, 50)
    sd = OrderedDict(
        every_other=base[::2, 3:40],  # 150 rows of 148 bytes, in blocks of 27 rows
        transposed=torch.randn(64, 40).t(),
        step=torch.arange(1000, dtype=torch.int16)[::3].view(1, -1).expand(3, -1),  # stride 0, then 3
        bf16=torch.randn(30, 20).to(torch.bfloat16)[:, ::4],
    )
    torch.save(sd, tmp_path / "m.pt")
    with load_checkpoint(tmp_path / "m.pt") as ckpt:
        write_checkpoint(ckpt.state_dict, tmp_path / "m.safetensors")
    got = load_file(tmp_path / "m.safetensors")
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v.contiguous()), k


def test_where_directories_cannot_be_swapped_the_old_layout_is_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without renameat2 (another OS) the old layout is renamed aside, the new one renamed in, the
    old one removed: the same result, nothing left over."""
    from ckptsurgeon.io import atomic

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # the system cannot swap
    out = tmp_path / "out"
    write_checkpoint(hub_model(0).state_dict(), out, max_shard_size=SHARD)
    assert len(os.listdir(out)) == 4
    new = hub_model(1).state_dict()
    write_checkpoint(new, out, force=True)
    assert os.listdir(out) == ["model.safetensors"] and leftovers(tmp_path) == []
    assert torch.equal(load_file(out / "model.safetensors")["table"], new["table"])
