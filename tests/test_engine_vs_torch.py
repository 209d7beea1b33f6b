"""The engine agrees with the torch path: every command's output through the byte-copying engine
loads (plain and mmap=True) to exactly what the torch.load/torch.save path writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from zoo import ZOO, build

from ckptsurgeon.io import load as ck_io
from ckptsurgeon.io import load_checkpoint, save_checkpoint, with_state_dict
from ckptsurgeon.rename import RenameRules
from ckptsurgeon.surgery import extract_state_dict, rename_state_dict

TORCH_FORMATS = [name for name in ZOO if name not in ("safetensors", "tensor", "values")]


def _tensors(obj: Any, out: list[tuple[str, torch.Tensor]], where: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        out.append((where, obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, out, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors(v, out, f"{where}[{i}]")
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8) if t.numel() else t.detach().reshape(-1)


def _assert_same_file_content(a: Path, b: Path) -> None:
    for mmap in (False, True):
        x = torch.load(a, weights_only=True, mmap=mmap)
        y = torch.load(b, weights_only=True, mmap=mmap)
        tx, ty = _tensors(x, []), _tensors(y, [])
        assert [k for k, _ in tx] == [k for k, _ in ty]
        for (k, s), (_, t) in zip(tx, ty):
            assert (s.dtype, s.shape, s.stride(), type(s)) == (t.dtype, t.shape, t.stride(), type(t)), k
            assert torch.equal(_bits(s), _bits(t)), k

        # which tensors share storage is the same
        def groups(ts: list[tuple[str, torch.Tensor]]) -> list[list[str]]:
            seen: dict[int, list[str]] = {}
            for k, t in ts:
                if t.untyped_storage().nbytes():
                    seen.setdefault(t.untyped_storage().data_ptr(), []).append(k)
            return sorted(v for v in seen.values() if len(v) > 1)

        assert groups(tx) == groups(ty)
        assert getattr(x, "_metadata", None) == getattr(y, "_metadata", None)


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch):
    """Force the reference path: torch.load to read, torch.save to write."""

    def use_torch() -> None:
        monkeypatch.setattr(ck_io, "_read_raw", lambda path, allow, *read, **kw: None)

    return use_torch


@pytest.mark.parametrize("name", TORCH_FORMATS)
def test_extract_and_rename_outputs_match_the_torch_path(name: str, tmp_path: Path, torch_path) -> None:
    src = build(name, tmp_path)
    engine = load_checkpoint(src)
    assert engine.engine == "raw"
    raw_extract, raw_rename = tmp_path / "raw_extract.pt", tmp_path / "raw_rename.pt"
    keys = list(engine.state_dict)[::2]
    save_checkpoint(extract_state_dict(engine.state_dict, keys), raw_extract)
    renamed, _ = rename_state_dict(engine.state_dict, RenameRules(add_prefix="m."))
    save_checkpoint(with_state_dict(engine, renamed), raw_rename)

    torch_path()
    ref = load_checkpoint(src)
    assert ref.engine == "torch"
    ref_extract, ref_rename = tmp_path / "ref_extract.pt", tmp_path / "ref_rename.pt"
    save_checkpoint(extract_state_dict(ref.state_dict, keys), ref_extract)
    renamed, _ = rename_state_dict(ref.state_dict, RenameRules(add_prefix="m."))
    save_checkpoint(with_state_dict(ref, renamed), ref_rename)

    _assert_same_file_content(raw_extract, ref_extract)
    _assert_same_file_content(raw_rename, ref_rename)


def test_inspect_never_imports_torch(tmp_path: Path) -> None:
    paths = [build(name, tmp_path) for name in ("module", "training", "legacy_module", "safetensors")]
    code = (
        "import sys\n"
        "from ckptsurgeon.cli import main\n"
        f"codes = [main(['inspect', p, '--json']) for p in {[str(p) for p in paths]!r}]\n"
        "codes.append(main(['inspect', sys.argv[1]]))\n"
        "print(codes, 'torch' in sys.modules, file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(paths[0])], capture_output=True, text=True, timeout=120)
    assert r.stderr.strip().splitlines()[-1] == "[0, 0, 0, 0, 0] False", r.stderr
