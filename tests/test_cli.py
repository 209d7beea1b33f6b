"""The five commands through the CLI: exit codes, --json, written files loaded back with torch."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import SmallCNN, parse_json, trained_smallcnn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODEL = "sample_models.models:SmallCNN"


def load(path: Path) -> OrderedDict:
    return torch.load(path, weights_only=True)


def one_line_error(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ------------------------------------------------------------------------------------- inspect


def test_inspect_table_lists_every_key(cli, cnn_file):
    r = cli("inspect", cnn_file)
    assert r.exit_code == 0, r.stderr
    for key in SmallCNN().state_dict():
        assert key in r.stdout
    assert "22 tensors" in r.stdout
    assert r.stderr == ""


def test_inspect_json_fields(cli, cnn_file):
    data = parse_json(cli("inspect", cnn_file, "--json"))
    expected = SmallCNN().state_dict()
    assert data["schema_version"] == 1 and data["format"] == "torch-zip" and data["state_dict_key"] is None
    assert [t["key"] for t in data["tensors"]] == list(expected)
    row = data["tensors"][0]
    assert row == {"key": "conv1.weight", "shape": [16, 3, 3, 3], "dtype": "float32", "numel": 432, "nbytes": 1728}
    assert data["num_tensors"] == len(expected)
    assert data["num_elements"] == sum(t.numel() for t in expected.values())
    assert data["total_bytes"] == sum(t.numel() * t.element_size() for t in expected.values())
    by_dtype = {d["dtype"]: d for d in data["dtypes"]}
    assert by_dtype["int64"]["num_tensors"] == 3  # num_batches_tracked x3
    assert sum(d["total_bytes"] for d in data["dtypes"]) == data["total_bytes"]


def test_inspect_container_reports_key_and_other_entries(cli, train_ckpt):
    data = parse_json(cli("inspect", train_ckpt, "--json"))
    assert data["state_dict_key"] == "model_state_dict"
    assert data["other_entries"]["epoch"] == "5"
    assert data["other_entries"]["optimizer_state_dict"].startswith("dict")
    r = cli("inspect", train_ckpt)
    assert "epoch: 5" in r.stdout and "model_state_dict" in r.stdout


def test_inspect_shared_storage(cli, tied_file):
    data = parse_json(cli("inspect", tied_file, "--json"))
    assert data["shared_storage"] == [["embed.weight", "head.weight"]]


def test_inspect_patterns(cli, cnn_file):
    data = parse_json(cli("inspect", cnn_file, "--json", "-i", "conv1", "-i", "fc", "-x", "*.bias"))
    assert [t["key"] for t in data["tensors"]] == ["conv1.weight", "fc.weight"]
    data = parse_json(cli("inspect", cnn_file, "--json", "-i", r"^bn\d\.running", "--regex"))
    assert len(data["tensors"]) == 6


def test_inspect_with_model_compatible_and_not(cli, cnn_file, tmp_path):
    data = parse_json(cli("inspect", cnn_file, "--json", "--model", MODEL))
    assert data["compatible"] is True and data["missing_keys"] == [] and data["unexpected_keys"] == []
    assert data["kinds"]["conv1.weight"] == "parameter" and data["kinds"]["bn1.running_mean"] == "buffer"
    r = cli("inspect", cnn_file, "--json", "--model", "sample_models.models:TransferCNN")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["compatible"] is False
    assert set(data["unexpected_keys"]) == {"fc.weight", "fc.bias"}
    assert "head.0.weight" in data["missing_keys"]


def test_inspect_model_shape_mismatch_and_kwargs(cli, cnn_file):
    r = cli("inspect", cnn_file, "--json", "--model", MODEL, "--model-kwargs", '{"num_classes": 3}')
    assert r.exit_code == 1
    mism = {m["key"]: m for m in json.loads(r.stdout)["shape_mismatches"]}
    assert mism["fc.weight"] == {"key": "fc.weight", "checkpoint": [10, 32], "model": [3, 32]}


def test_inspect_model_suggests_prefix_strip(cli, tmp_path):
    sd = trained_smallcnn().state_dict()
    path = tmp_path / "dp.pt"
    torch.save(OrderedDict((f"module.{k}", v) for k, v in sd.items()), path)
    r = cli("inspect", path, "--json", "--model", MODEL)
    assert r.exit_code == 1
    suggestions = json.loads(r.stdout)["suggestions"]
    assert any("ckptsurgeon rename" in s and "--strip-prefix module." in s and str(path) in s for s in suggestions)


def test_inspect_allow_missing_relaxes_exit_code(cli, tmp_path):
    sd = trained_smallcnn().state_dict()
    path = tmp_path / "backbone.pt"
    torch.save(OrderedDict((k, v) for k, v in sd.items() if not k.startswith("fc.")), path)
    assert cli("inspect", path, "--model", MODEL).exit_code == 1
    assert cli("inspect", path, "--model", MODEL, "--allow-missing").exit_code == 0


@pytest.mark.parametrize(
    "spec, kwargs, fragment",
    [
        ("nocolon", None, "nocolon"),
        ("no_such_module_xyz:Net", None, "no_such_module_xyz"),
        ("sample_models.models:Nope", None, "Nope"),
        ("sample_models.models:__all__", None, "__all__"),
        (MODEL, "{bad json", "JSON"),
        (MODEL, '{"bogus_arg": 1}', "bogus_arg"),
    ],
)
def test_bad_model_spec_is_exit_2(cli, cnn_file, spec, kwargs, fragment):
    args = ["inspect", cnn_file, "--model", spec] + (["--model-kwargs", kwargs] if kwargs else [])
    r = cli(*args)
    assert r.exit_code == 2
    assert fragment in one_line_error(r)


# ------------------------------------------------------------------------------------- extract


def test_extract_seed_workflow(cli, tmp_path):
    """Trained model -> extract conv1 -> fresh model strict=False: missing = the other layers."""
    trained = trained_smallcnn()
    src = tmp_path / "trained.pt"
    torch.save(trained.state_dict(), src)
    out = tmp_path / "conv1.pt"
    r = cli("extract", src, "-o", out, "-i", "conv1")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    fresh = SmallCNN()
    result = fresh.load_state_dict(load(out), strict=False)
    assert result.unexpected_keys == []
    # _metadata is filtered to the kept modules, so torch fills BatchNorm's num_batches_tracked
    # itself (no version info) instead of reporting it missing.
    others = {k for k in fresh.state_dict() if not k.startswith("conv1.") and not k.endswith("num_batches_tracked")}
    assert set(result.missing_keys) == others
    assert torch.equal(fresh.conv1.weight, trained.conv1.weight) and torch.equal(fresh.conv1.bias, trained.conv1.bias)
    assert not torch.equal(fresh.conv1x1.weight, trained.conv1x1.weight)


def test_extract_unwraps_container_and_keeps_metadata_filtered(cli, train_ckpt, tmp_path):
    out = tmp_path / "bn.pt"
    r = cli("extract", train_ckpt, "-o", out, "-i", "bn1")
    assert r.exit_code == 0, r.stderr
    assert "model_state_dict" in r.stderr
    sd = load(out)
    assert isinstance(sd, OrderedDict) and list(sd) == [k for k in SmallCNN().state_dict() if k.startswith("bn1.")]
    assert sd._metadata == OrderedDict([("", {"version": 1}), ("bn1", {"version": 2})])
    src = torch.load(train_ckpt, weights_only=True)["model_state_dict"]
    for k in sd:
        assert torch.equal(sd[k], src[k]) and sd[k].dtype == src[k].dtype


def test_extract_whole_state_dict_without_patterns(cli, train_ckpt, tmp_path):
    out = tmp_path / "all.pt"
    assert cli("extract", train_ckpt, "-o", out).exit_code == 0
    src = torch.load(train_ckpt, weights_only=True)["model_state_dict"]
    sd = load(out)
    assert list(sd) == list(src) and all(torch.equal(sd[k], src[k]) for k in src)
    assert sd._metadata == src._metadata
    model = SmallCNN()
    model.load_state_dict(sd, strict=True)


def test_extract_keeps_ties_and_compacts_views(cli, tmp_path):
    big = torch.randn(1000, 1000)
    w = torch.randn(64, 16)
    path = tmp_path / "mixed.pt"
    torch.save(OrderedDict(row=big[3], emb=w, head=w, other=torch.ones(2)), path)
    out = tmp_path / "small.pt"
    assert cli("extract", path, "-o", out, "-x", "other").exit_code == 0
    sd = load(out)
    assert torch.equal(sd["row"], big[3])
    assert same_storage(sd["emb"], sd["head"])
    assert out.stat().st_size < 20_000  # not the 4 MB base storage
    mm = torch.load(out, weights_only=True, mmap=True)
    assert torch.equal(mm["row"], big[3]) and same_storage(mm["emb"], mm["head"])


def test_extract_nothing_selected_is_exit_2_and_writes_nothing(cli, cnn_file, tmp_path):
    out = tmp_path / "none.pt"
    r = cli("extract", cnn_file, "-o", out, "-i", "conv3")
    assert r.exit_code == 2
    assert "nothing selected" in r.stderr
    assert not out.exists()


def test_extract_existing_output_needs_force(cli, cnn_file, tmp_path):
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    r = cli("extract", cnn_file, "-o", out, "-i", "fc")
    assert r.exit_code == 2 and "--force" in one_line_error(r)
    assert out.read_bytes() == b"precious"
    assert cli("extract", cnn_file, "-o", out, "-i", "fc", "--force").exit_code == 0
    assert list(load(out)) == ["fc.weight", "fc.bias"]


def test_extract_onto_its_own_input_with_force(cli, cnn_file):
    before = load(cnn_file)
    r = cli("extract", cnn_file, "-o", cnn_file, "-i", "fc")
    assert r.exit_code == 2 and "same file" in r.stderr
    assert cli("extract", cnn_file, "-o", cnn_file, "-i", "fc", "--force").exit_code == 0
    after = load(cnn_file)
    assert list(after) == ["fc.weight", "fc.bias"] and torch.equal(after["fc.weight"], before["fc.weight"])
    assert not [p for p in cnn_file.parent.iterdir() if "ckptsurgeon-tmp" in p.name]


def test_extract_dry_run_and_json(cli, cnn_file, tmp_path):
    out = tmp_path / "dry.pt"
    r = cli("extract", cnn_file, "-o", out, "-i", "fc", "--dry-run")
    assert r.exit_code == 0 and "fc.weight" in r.stdout and not out.exists()
    data = parse_json(cli("extract", cnn_file, "-o", out, "-i", "fc", "--json"))
    assert data["keys"] == ["fc.weight", "fc.bias"] and data["written"] is True and data["schema_version"] == 1
    assert data["total_bytes"] == (10 * 32 + 10) * 4


def test_extract_to_safetensors(cli, tied_file, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "tied.safetensors"
    r = cli("extract", tied_file, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "share storage" not in r.stderr  # the tie is recorded, not written twice
    st = load_file(out)
    src = load(tied_file)
    assert set(st) == set(src) - {"head.weight"}
    assert all(torch.equal(st[k], src[k]) for k in st)


def test_extract_with_model_refuses_incompatible_result(cli, cnn_file, tmp_path):
    out = tmp_path / "bb.pt"
    r = cli("extract", cnn_file, "-o", out, "-x", "fc", "--model", MODEL)
    assert r.exit_code == 1 and not out.exists()
    r = cli("extract", cnn_file, "-o", out, "-x", "fc", "--model", MODEL, "--allow-missing")
    assert r.exit_code == 0 and out.exists()


# -------------------------------------------------------------------------------------- rename


def test_rename_strip_prefix_keeps_container_and_metadata(cli, tmp_path):
    model = torch.nn.DataParallel(trained_smallcnn())
    sd = model.state_dict()
    path = tmp_path / "dp.ckpt"
    torch.save({"epoch": 7, "state_dict": sd, "note": "hello"}, path)
    out = tmp_path / "plain.ckpt"
    r = cli("rename", path, "-o", out, "--strip-prefix", "module.")
    assert r.exit_code == 0, r.stderr
    obj = torch.load(out, weights_only=True)
    assert obj["epoch"] == 7 and obj["note"] == "hello" and list(obj) == ["epoch", "state_dict", "note"]
    new = obj["state_dict"]
    assert list(new) == [k.removeprefix("module.") for k in sd]
    assert all(torch.equal(new[k.removeprefix("module.")], v) for k, v in sd.items())
    assert "bn1" in new._metadata and new._metadata["bn1"] == {"version": 2}
    fresh = SmallCNN()
    fresh.load_state_dict(new, strict=True)


def test_rename_sub_map_add_prefix_order(cli, cnn_file, tmp_path):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"fc.weight": "classifier.weight", "fc.bias": "classifier.bias"}))
    out = tmp_path / "r.pt"
    r = cli("rename", cnn_file, "-o", out, "--map", mapping, "--sub", r"s/^bn(\d)/norm\1/", "--add-prefix", "backbone.")
    assert r.exit_code == 0, r.stderr
    keys = list(load(out))
    assert (
        keys[0] == "backbone.conv1.weight"
        and "backbone.norm1.running_var" in keys
        and keys[-1] == "backbone.classifier.bias"
    )


def test_rename_collision_is_exit_2_and_writes_nothing(cli, cnn_file, tmp_path):
    out = tmp_path / "c.pt"
    r = cli("rename", cnn_file, "-o", out, "--sub", r"s/^bn\d/bn/")
    assert r.exit_code == 2
    line = one_line_error(r)
    assert "'bn1.weight'" in line and "'bn2.weight'" in line
    assert not out.exists()


def test_rename_dry_run_prints_plan(cli, cnn_file, tmp_path):
    out = tmp_path / "d.pt"
    r = cli("rename", cnn_file, "-o", out, "--add-prefix", "m.", "--dry-run")
    assert r.exit_code == 0 and "m.conv1.weight" in r.stdout and not out.exists()
    data = parse_json(cli("rename", cnn_file, "-o", out, "--add-prefix", "m.", "--dry-run", "--json"))
    assert data["renamed"]["conv1.weight"] == "m.conv1.weight" and data["written"] is False


def test_rename_needs_a_rule(cli, cnn_file, tmp_path):
    r = cli("rename", cnn_file, "-o", tmp_path / "x.pt")
    assert r.exit_code == 2 and "nothing to do" in one_line_error(r)


def test_rename_then_inverse_is_identity(cli, cnn_file, tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert cli("rename", cnn_file, "-o", a, "--add-prefix", "module.").exit_code == 0
    assert cli("rename", a, "-o", b, "--strip-prefix", "module.").exit_code == 0
    r = cli("diff", cnn_file, b, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["identical"] is True
    assert load(b)._metadata == load(cnn_file)._metadata


# --------------------------------------------------------------------------------------- merge


def test_merge_backbone_and_head(cli, cnn_file, tmp_path):
    bb, head, out = tmp_path / "bb.pt", tmp_path / "head.pt", tmp_path / "m.pt"
    assert cli("extract", cnn_file, "-o", bb, "-x", "fc").exit_code == 0
    assert cli("extract", cnn_file, "-o", head, "-i", "fc").exit_code == 0
    r = cli("merge", bb, head, "-o", out, "--model", MODEL)
    assert r.exit_code == 0, r.stderr
    assert cli("diff", cnn_file, out).exit_code == 0
    assert list(load(out)) == list(load(cnn_file))


def test_merge_conflicts(cli, tmp_path):
    a, b, out = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "o.pt"
    torch.save(OrderedDict(x=torch.zeros(2), y=torch.zeros(1)), a)
    torch.save(OrderedDict(y=torch.ones(1), z=torch.ones(3)), b)
    r = cli("merge", a, b, "-o", out)
    assert r.exit_code == 2 and "'y'" in one_line_error(r) and not out.exists()
    assert cli("merge", a, b, "-o", out, "--on-conflict", "last").exit_code == 0
    sd = load(out)
    assert list(sd) == ["x", "y", "z"] and sd["y"].item() == 1.0
    assert cli("merge", a, b, "-o", out, "--on-conflict", "first", "-f").exit_code == 0
    assert load(out)["y"].item() == 0.0
    assert cli("merge", a, b, "-o", out, "--on-conflict", "bogus", "-f").exit_code == 2


def test_merge_average(cli, tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"s{i}.pt"
        torch.save(
            OrderedDict(
                w=torch.full((4,), float(i)), h=torch.full((2,), float(i), dtype=torch.float16), n=torch.tensor(i)
            ),
            p,
        )
        paths.append(p)
    out = tmp_path / "avg.pt"
    r = cli("merge", *paths, "-o", out, "--average", "--json")
    assert r.exit_code == 0, r.stderr
    assert "1 integer tensor differs between inputs and was taken from the first: n" in r.stderr
    sd = load(out)
    assert torch.equal(sd["w"], torch.full((4,), 1.0)) and sd["h"].dtype == torch.float16 and sd["n"].item() == 0
    r = cli("merge", *paths, "-o", out, "--average", "--weights", "0,0,1", "-f")
    assert r.exit_code == 0 and torch.equal(load(out)["w"], torch.full((4,), 2.0))
    torch.save(OrderedDict(w=torch.zeros(5)), paths[2])
    r = cli("merge", *paths, "-o", out, "--average", "-f")
    assert r.exit_code == 2 and "shape" in r.stderr


def test_merge_needs_two_inputs(cli, cnn_file, tmp_path):
    assert cli("merge", cnn_file, "-o", tmp_path / "o.pt").exit_code == 2


# ---------------------------------------------------------------------------------------- diff


def test_diff_proves_frozen_layers_did_not_move(cli, tmp_path):
    model = trained_smallcnn()
    before = tmp_path / "before.pt"
    torch.save(model.state_dict(), before)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.fc.parameters():
        p.requires_grad_(True)
    model.eval()  # keeps BatchNorm statistics
    opt = torch.optim.SGD(model.fc.parameters(), lr=0.5)
    for _ in range(3):
        loss = model(torch.randn(4, 3, 8, 8)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = tmp_path / "after.pt"
    torch.save(model.state_dict(), after)
    assert cli("diff", before, after, "-x", "fc").exit_code == 0
    r = cli("diff", before, after, "--json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert {v["key"] for v in data["value_mismatches"]} == {"fc.weight", "fc.bias"}
    assert data["num_equal"] == len(model.state_dict()) - 2 and data["identical"] is False


def test_diff_json_fields_and_tolerance(cli, tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(OrderedDict(w=torch.tensor([1.0, 2.0]), s=torch.zeros(2), d=torch.zeros(1), only_a=torch.zeros(1)), a)
    torch.save(
        OrderedDict(
            w=torch.tensor([1.0, 2.001]), s=torch.zeros(3), d=torch.zeros(1, dtype=torch.float64), only_b=torch.zeros(1)
        ),
        b,
    )
    r = cli("diff", a, b, "--json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["only_in_a"] == ["only_a"] and data["only_in_b"] == ["only_b"]
    assert data["shape_mismatches"] == [{"key": "s", "a": [2], "b": [3]}]
    assert data["dtype_mismatches"] == [{"key": "d", "a": "float32", "b": "float64"}]
    (vm,) = data["value_mismatches"]
    assert vm["key"] == "w" and vm["num_different"] == 1 and vm["max_abs_diff"] == pytest.approx(0.001, rel=1e-2)
    assert set(data) >= {"schema_version", "identical", "num_equal"}
    assert cli("diff", a, b, "-i", "w", "--atol", "0.01").exit_code == 0
    assert cli("diff", a, b, "-i", "w", "--rtol", "1e-6").exit_code == 1


def test_diff_identical_prints_summary(cli, cnn_file):
    r = cli("diff", cnn_file, cnn_file)
    assert r.exit_code == 0 and "identical" in r.stdout


# --------------------------------------------------------------------------- formats and safety


def test_legacy_format_and_safetensors_inputs(cli, tmp_path):
    sd = trained_smallcnn().state_dict()
    legacy = tmp_path / "legacy.pth"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    data = parse_json(cli("inspect", legacy, "--json"))
    assert data["format"] == "torch-legacy" and data["num_tensors"] == len(sd)
    from safetensors.torch import save_file

    st = tmp_path / "w.safetensors"
    save_file(dict(sd), st)
    data = parse_json(cli("inspect", st, "--json"))
    assert data["format"] == "safetensors" and {t["key"] for t in data["tensors"]} == set(sd)
    out = tmp_path / "from_legacy.pt"
    assert cli("extract", legacy, "-o", out, "-i", "conv1").exit_code == 0
    assert torch.equal(load(out)["conv1.weight"], sd["conv1.weight"])
    assert cli("diff", legacy, st).exit_code == 0


def test_unsafe_pickle_refused_with_globals_named(cli, tmp_path):
    path = tmp_path / "args.ckpt"
    # a Namespace holding a tensor (one without is an opaque entry: see tests/test_opaque.py)
    args = argparse.Namespace(lr=0.1, mask=torch.ones(2))
    torch.save({"args": args, "state_dict": trained_smallcnn().state_dict()}, path)
    r = cli("inspect", path)
    assert r.exit_code == 2
    line = one_line_error(r)
    assert "argparse.Namespace" in line and "--unsafe" in line
    r = cli("inspect", path, "--unsafe", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["state_dict_key"] == "state_dict"
    r = cli("inspect", path, "--allow-global", "argparse.Namespace", "--json")
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize(
    "name",
    [
        "os.system",
        "posix.system",
        "subprocess.Popen",
        "builtins.eval",
        "builtins.getattr",
        "torch.storage._load_from_bytes",
        "timeit.timeit",  # not in any module list: refused because it is a function, not a class
        "timeit.Timer",
        "torch.load",
        "torch.utils.cpp_extension.load_inline",
        "collections.namedtuple",
    ],
)
def test_allow_global_refuses_dangerous_names(cli, cnn_file, name):
    r = cli("inspect", cnn_file, "--allow-global", name)
    assert r.exit_code == 2 and "refused" in one_line_error(r)


def test_unsafe_whole_module_counts_as_its_state_dict(cli, tmp_path):
    path = tmp_path / "whole.pt"
    model = trained_smallcnn()
    torch.save(model, path)
    assert cli("inspect", path).exit_code == 2
    data = parse_json(cli("inspect", path, "--unsafe", "--json"))
    assert [t["key"] for t in data["tensors"]] == list(model.state_dict())


@pytest.mark.parametrize("content, hint", [(b"", "empty"), (b"hello world\n", ""), (b"<!DOCTYPE html><html>", "")])
def test_not_a_checkpoint_is_exit_2_one_line(cli, tmp_path, content, hint):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    r = cli("inspect", path)
    assert r.exit_code == 2
    line = one_line_error(r)
    assert str(path) in line and hint in line
    assert path.read_bytes() == content


def test_control_characters_in_keys_are_escaped(cli, tmp_path):
    path = tmp_path / "esc.pt"
    torch.save(OrderedDict([("evil\x1b[31m.[bold]x[/bold]", torch.zeros(1))]), path)
    r = cli("inspect", path)
    assert r.exit_code == 0
    assert "\x1b" not in r.stdout and "\\x1b[31m.[bold]x[/bold]" in r.stdout
    data = parse_json(cli("inspect", path, "--json"))
    assert data["tensors"][0]["key"] == "evil\x1b[31m.[bold]x[/bold]"


def test_tables_on_a_terminal_are_rich_and_escape_keys(tmp_path, monkeypatch):
    """On a terminal the same data is drawn by rich: keys are still never read as markup."""
    import io as std_io

    from ckptsurgeon.cli import main

    path = tmp_path / "esc.pt"
    torch.save(OrderedDict([("evil\x1b[31m.[bold]x[/bold]", torch.zeros(1)), ("w", torch.zeros(2))]), path)

    class Terminal(std_io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["inspect", str(path)]) == 0
    shown = out.getvalue()
    assert "┃" in shown and "[bold]x[/bold]" in shown and "\x1b[31m" not in shown


# ------------------------------------------------------------------------------------- process


def test_console_script_subprocess(tmp_path, cnn_file):
    exe = Path(sys.executable).with_name("ckptsurgeon")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ckptsurgeon"]
    r = subprocess.run(cmd + ["inspect", str(cnn_file), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["num_tensors"] == 22
    r = subprocess.run(cmd + ["inspect", str(tmp_path / "missing.pt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and "no such file" in r.stderr


def test_version_and_help_do_not_import_torch():
    code = (
        "import sys\n"
        "from ckptsurgeon.cli import main\n"
        "rc = main(['--version']); rc2 = main(['--help']); rc3 = main(['inspect', '--help'])\n"
        "print(rc, rc2, rc3, 'torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "0 0 0 False", r.stdout + r.stderr
    assert "ckptsurgeon 1." in r.stdout


def test_core_does_not_import_typer_or_rich():
    code = (
        "import sys, ckptsurgeon, ckptsurgeon.io, ckptsurgeon.diff, ckptsurgeon.merge; "
        "print(sorted(m for m in ('typer','rich','torch') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_python_dash_m_and_no_args(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "ckptsurgeon"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ},
    )
    assert r.returncode == 2 and "inspect" in r.stdout


def test_progress_bar_only_for_big_jobs_on_a_terminal(monkeypatch):
    import io as std_io

    from ckptsurgeon.cli.console import progress as make_progress

    with make_progress("comparing", 10**12) as progress:
        assert progress is None  # stderr is not a terminal here

    class Terminal(std_io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    with make_progress("comparing", 1 << 20) as progress:
        assert progress is None  # too small to bother
    with make_progress("comparing", 1 << 30) as progress:
        assert callable(progress)
        progress(1 << 29)


def test_piped_tables_are_plain_aligned_text(cli, cnn_file):
    r = cli("inspect", cnn_file)  # CliRunner's stdout is not a terminal
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0] == "state_dict (torch-zip)" and lines[1].split() == ["key", "shape", "dtype", "numel", "bytes"]
    assert lines[2].split()[0] == "conv1.weight" and lines[2].endswith("1.7 KiB")
    assert lines[24].startswith("22 tensors")
    assert lines[25:28] == ["by dtype", "dtype    tensors  elements     bytes", "float32       19     6,762  26.4 KiB"]
    assert "┃" not in r.stdout


def test_merge_average_streams_through_disk_and_keeps_ties(cli, tmp_path):
    """--average parks each mean on disk as it is made; ties and Parameters survive; no scratch left."""
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        w = torch.randn(8, 4)
        p = tmp_path / f"t{i}.pt"
        torch.save(OrderedDict(emb=w, head=w, b=torch.nn.Parameter(torch.full((3,), float(i)))), p)
        paths.append(p)
    out = tmp_path / "avg.pt"
    r = cli("merge", *paths, "-o", out, "--average", "--verify")
    assert r.exit_code == 0, r.stderr
    sd = load(out)
    a, b = load(paths[0]), load(paths[1])
    assert torch.allclose(sd["emb"], (a["emb"] + b["emb"]) / 2)
    assert same_storage(sd["emb"], sd["head"])
    assert isinstance(sd["b"], torch.nn.Parameter) and torch.equal(sd["b"].data, torch.full((3,), 0.5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg.pt", "t0.pt", "t1.pt"]


def test_verify_reads_back_with_the_same_allowances(cli, tmp_path):
    path = tmp_path / "ns.ckpt"
    torch.save({"model": trained_smallcnn().state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    out = tmp_path / "ns2.ckpt"
    r = cli("rename", path, "-o", out, "--add-prefix", "m.", "--allow-global", "argparse.Namespace", "--verify")
    assert r.exit_code == 0, r.stderr
    with torch.serialization.safe_globals([argparse.Namespace]):
        back = torch.load(out, weights_only=True)
    assert back["args"].lr == 0.1 and "m.conv1.weight" in back["model"]


def test_json_carries_keys_no_utf8_stream_can(cli, tmp_path):
    path = tmp_path / "sur.pt"
    key = "\ud800x"  # a lone surrogate: pickle (and torch) accept it
    torch.save(OrderedDict([(key, torch.ones(1))]), path)
    data = parse_json(cli("inspect", path, "--json"))
    assert data["tensors"][0]["key"] == key
    assert cli("inspect", path).exit_code == 0


@pytest.mark.parametrize("weights", ["nan,1", "inf,1", "1e308,1e308", "-1,2", "0,0"])
def test_average_weights_must_be_finite(cli, tmp_path, weights):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(OrderedDict(w=torch.zeros(2)), a)
    torch.save(OrderedDict(w=torch.ones(2)), b)
    r = cli("merge", a, b, "-o", tmp_path / "o.pt", "--average", "--weights", weights)
    assert r.exit_code == 2 and "--weights" in one_line_error(r)
    assert not (tmp_path / "o.pt").exists()


# ------------------------------------------------------------------------------- fast inspect

FAST_ARGVS = [
    ["{f}"],
    ["{f}", "--json"],
    ["--json", "{f}"],
    ["{f}", "-i", "conv1"],
    ["{f}", "-iconv1", "--exclude=bn1"],
    ["{f}", "--include", "conv1", "--include", "fc", "--json"],
    ["{f}", "--regex", "-i", "^conv", "--include=bias$"],
    ["{f}", "--key", "model_state_dict", "--json"],
    ["{f}", "--key=optimizer_state_dict"],
    ["{f}", "--key", "nope"],
    ["{f}", "--verify", "--json"],
    ["{f}", "-x", "-i"],  # -x takes "-i" as its value, as click does
    ["{f}", "-i", "--json"],
    ["{f}", "-i", "nomatch"],
    ["{f}", "--regex", "-i", "["],
    ["{missing}"],
    ["{tied}", "--json"],
    ["{tied}"],
]
TYPER_ONLY_ARGVS = [
    [],
    ["--help"],
    ["{f}", "--help"],
    ["{f}", "-h"],
    ["{f}", "{f}"],
    ["{f}", "--json=1"],
    ["{f}", "-i"],
    ["{f}", "--key"],
    ["--", "{f}"],
    ["{f}", "--unknown"],
    ["-"],
    ["{f}", "--model", "sample_models.models:SmallCNN"],
    ["{f}", "--unsafe"],
    ["{f}", "--allow-global", "argparse.Namespace"],
]


def _run_captured(fn, args):
    import contextlib
    import io as std_io

    out, err = std_io.StringIO(), std_io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = fn(args)
    return rc, out.getvalue(), err.getvalue()


def _argv(template, **paths):
    return ["inspect"] + [t.format(**paths) for t in template]


@pytest.mark.parametrize("template", FAST_ARGVS, ids=lambda t: " ".join(t))
def test_fast_inspect_matches_typer(template, train_ckpt, tied_file, tmp_path, monkeypatch):
    """The Typer-free parser answers the everyday `inspect` command lines exactly as Typer does:
    same exit code, same stdout, same stderr."""
    from ckptsurgeon.cli.commands import run
    from ckptsurgeon.cli.fast import parse, run_fast

    monkeypatch.delenv("CKPTSURGEON_DEBUG", raising=False)
    args = _argv(template, f=str(train_ckpt), tied=str(tied_file), missing=str(tmp_path / "missing.pt"))
    assert parse(args) is not None
    fast = _run_captured(run_fast, args)
    assert fast == _run_captured(run, args)
    if fast[0] == 0 and "--json" in args:
        assert json.loads(fast[1])["num_tensors"] > 0


@pytest.mark.parametrize("template", TYPER_ONLY_ARGVS, ids=lambda t: " ".join(t) or "(none)")
def test_fast_inspect_declines_the_rest(template, train_ckpt):
    from ckptsurgeon.cli.fast import parse, run_fast

    args = _argv(template, f=str(train_ckpt))
    assert parse(args) is None
    assert run_fast(args) is None


def test_inspect_process_imports_neither_typer_nor_rich_nor_torch(train_ckpt):
    code = (
        "import sys\n"
        "from ckptsurgeon.cli import main\n"
        f"rc = main(['inspect', {str(train_ckpt)!r}, '--json'])\n"
        "rc2 = main(['inspect', {0!r}])\n".format(str(train_ckpt))
        + "heavy = sorted(m for m in ('typer', 'rich', 'torch', 'click') if m in sys.modules)\n"
        + "print(rc, rc2, heavy, file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stderr.strip().splitlines()[-1] == "0 0 []", r.stderr
    assert json.loads(r.stdout.splitlines()[0])["num_tensors"] > 0


_TOKENS = [
    "--json",
    "--regex",
    "--verify",
    "-i",
    "-x",
    "--include",
    "--exclude",
    "--key",
    "--key=model_state_dict",
    "--include=conv",
    "-iconv1",
    "-xbn",
    "conv1",
    "fc",
    "bn1",
    "model_state_dict",
    "^conv",
    "--",
    "-",
    "--help",
    "--unknown",
    "--json=1",
    "{f}",
    "{f}",
]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=6))
def test_fast_inspect_agrees_with_typer_on_any_command_line(tokens, train_ckpt, monkeypatch):
    """Random command lines: whenever the fast parser takes one, Typer gives the same result."""
    from ckptsurgeon.cli.commands import run
    from ckptsurgeon.cli.fast import parse, run_fast

    monkeypatch.delenv("CKPTSURGEON_DEBUG", raising=False)
    args = _argv(tokens, f=str(train_ckpt))
    if parse(args) is None:
        return
    assert _run_captured(run_fast, args) == _run_captured(run, args)


# ------------------------------------------------------------------------------- fast extract

EXTRACT_FAST_ARGVS = [
    ["{f}", "-o", "{o}"],
    ["{f}", "-o", "{o}", "--json"],
    ["{f}", "--output={o}", "-i", "conv1", "--json"],
    ["-o{o}", "{f}", "-x", "fc"],
    ["{f}", "-o", "{o}", "--dry-run"],
    ["{f}", "-o", "{o}", "--dry-run", "--json"],
    ["{f}", "-o", "{o}", "--key", "model_state_dict", "--verify"],
    ["{f}", "-o", "{o}", "-i", "nomatch"],
    ["{f}", "-o", "{o}", "-i", "conv1", "-i", "nomatch", "--json"],
    ["{f}", "-o", "{o}", "--regex", "-i", "^conv", "--json"],
    ["{f}", "-o", "{o}", "--regex", "-i", "["],
    ["{f}", "-o", "{st}", "--json"],
    ["{f}", "-o", "{exists}"],
    ["{f}", "-o", "{exists}", "-f", "--json"],
    ["{f}", "-o", "{f}", "-f"],
    ["{f}", "-o", "{o}", "-o", "{st}"],
    ["{missing}", "-o", "{o}"],
    ["{tied}", "-o", "{o}", "--json"],
    ["{tied}", "-o", "{o}", "-i", "embed.*"],
]
EXTRACT_TYPER_ONLY_ARGVS = [
    ["{f}"],
    ["{f}", "-o"],
    ["{f}", "--help"],
    ["{f}", "-o", "{o}", "--model", "sample_models.models:SmallCNN"],
    ["{f}", "-o", "{o}", "--unsafe"],
    ["{f}", "-o", "{o}", "-fv"],
    ["{f}", "-o", "{o}", "--force=1"],
    ["{f}", "{f}", "-o", "{o}"],
    ["{f}", "-o", "{o}", "--strip-prefix", "x"],
]


def _extract_paths(tmp_path, train_ckpt, tied_file):
    """Fresh inputs for each run: `-o {f} -f` replaces the input itself."""
    import shutil

    d = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    d.mkdir()
    exists = d / "exists.pt"
    exists.write_bytes(b"an old output")
    return dict(
        f=str(shutil.copy(train_ckpt, d / "train.ckpt")),
        tied=str(shutil.copy(tied_file, d / "tied.pt")),
        o=str(d / "out.pt"),
        st=str(d / "out.safetensors"),
        exists=str(exists),
        missing=str(d / "missing.pt"),
    )


def _extract_run(fn, template, paths):
    """(exit code, stdout, stderr, bytes of every file in the run's folder) with the run's own folder
    name replaced, so that two runs in two folders compare equal."""
    from pathlib import Path

    args = ["extract"] + [t.format(**paths) for t in template]
    folder = Path(paths["o"]).parent
    cwd = os.getcwd()
    os.chdir(folder)  # an output named by a stray token (`-o --verify`) lands here, not in the repo
    try:
        rc, out, err = _run_captured(fn, args)
    finally:
        os.chdir(cwd)
    from zoo import masked_serialization_id

    # torch zips byte for byte but the serialization id (random in what torch.save writes)
    files = {
        p.name: masked_serialization_id(p) if zipfile.is_zipfile(p) else p.read_bytes()
        for p in sorted(folder.iterdir())
    }
    return rc, out.replace(str(folder), "DIR"), err.replace(str(folder), "DIR"), files


@pytest.mark.parametrize("template", EXTRACT_FAST_ARGVS, ids=lambda t: " ".join(t))
def test_fast_extract_matches_typer(template, train_ckpt, tied_file, tmp_path, monkeypatch):
    """The Typer-free parser runs the everyday `extract` command lines exactly as Typer does: same
    exit code, stdout and stderr, and the same files left behind, byte for byte."""
    from ckptsurgeon.cli.commands import run
    from ckptsurgeon.cli.fast import parse, run_fast

    monkeypatch.delenv("CKPTSURGEON_DEBUG", raising=False)
    fast_paths = _extract_paths(tmp_path, train_ckpt, tied_file)
    assert parse(["extract"] + [t.format(**fast_paths) for t in template]) is not None
    fast = _extract_run(run_fast, template, fast_paths)
    typer_run = _extract_run(run, template, _extract_paths(tmp_path, train_ckpt, tied_file))
    assert fast == typer_run
    if fast[0] == 0 and "--dry-run" not in template:
        written = [n for n in fast[3] if n.startswith("out.") or (n == "exists.pt" and "-f" in template)]
        assert written, "a successful extract writes its output"


@pytest.mark.parametrize("template", EXTRACT_TYPER_ONLY_ARGVS, ids=lambda t: " ".join(t))
def test_fast_extract_declines_the_rest(template, train_ckpt, tmp_path):
    from ckptsurgeon.cli.fast import parse, run_fast

    args = ["extract"] + [t.format(f=str(train_ckpt), o=str(tmp_path / "o.pt")) for t in template]
    assert parse(args) is None
    assert run_fast(args) is None


def test_fast_extract_output_loads_in_torch(train_ckpt, tmp_path):
    """What the fast path writes is the selected tensors, loaded by torch bit for bit."""
    from ckptsurgeon.cli.fast import run_fast

    out = tmp_path / "conv.pt"
    rc, _, err = _run_captured(run_fast, ["extract", str(train_ckpt), "-o", str(out), "-i", "conv1"])
    assert rc == 0, err
    want = torch.load(train_ckpt, weights_only=True)["model_state_dict"]
    got = torch.load(out, weights_only=True)
    assert list(got) == ["conv1.weight", "conv1.bias"]
    for k, v in got.items():
        assert v.dtype == want[k].dtype and torch.equal(v, want[k])


def test_extract_process_imports_neither_typer_nor_rich_nor_torch(train_ckpt, tmp_path):
    out = tmp_path / "o.pt"
    code = (
        "import sys\n"
        "from ckptsurgeon.cli import main\n"
        f"rc = main(['extract', {str(train_ckpt)!r}, '-o', {str(out)!r}, '--json'])\n"
        "print(rc, sorted(m for m in ('typer', 'rich', 'torch', 'click') if m in sys.modules), file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stderr.strip().splitlines()[-1] == "0 []", r.stderr
    assert json.loads(r.stdout)["num_tensors"] > 0 and out.exists()


_EXTRACT_TOKENS = [
    "--json",
    "--regex",
    "--verify",
    "--dry-run",
    "-f",
    "--force",
    "-i",
    "-x",
    "--key",
    "--key=model_state_dict",
    "-iconv1",
    "conv1",
    "fc",
    "-o",
    "{o}",
    "-o{o}",
    "--output={st}",
    "{exists}",
    "--",
    "-",
    "--unknown",
    "{f}",
    "{f}",
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(st.sampled_from(_EXTRACT_TOKENS), min_size=1, max_size=6))
def test_fast_extract_agrees_with_typer_on_any_command_line(tokens, train_ckpt, tied_file, tmp_path, monkeypatch):
    """Random command lines: whenever the fast parser takes one, Typer gives the same result."""
    from ckptsurgeon.cli.commands import run
    from ckptsurgeon.cli.fast import parse, run_fast

    monkeypatch.delenv("CKPTSURGEON_DEBUG", raising=False)
    fast_paths = _extract_paths(tmp_path, train_ckpt, tied_file)
    if parse(["extract"] + [t.format(**fast_paths) for t in tokens]) is None:
        return
    fast = _extract_run(run_fast, tokens, fast_paths)
    assert fast == _extract_run(run, tokens, _extract_paths(tmp_path, train_ckpt, tied_file))
