"""The restricted VM names its opcodes, and they are exactly the ones torch's weights_only
unpickler runs: a byte outside that set is refused by both, with the opcode's name."""

from __future__ import annotations

import inspect
import pickle
import pickletools
import re
from pathlib import Path

import pytest
import torch._weights_only_unpickler as torch_vm

from ckptsurgeon.engine import unpickle as vm
from ckptsurgeon.errors import RestrictedPickleError

OPCODE_NAMES = {info.name for info in pickletools.opcodes}


def _torch_opcodes() -> set[str]:
    source = inspect.getsource(torch_vm.Unpickler.load)
    return {name for name in re.findall(r"\b([A-Z][A-Z0-9_]+)\b", source) if name in OPCODE_NAMES}


def test_the_vm_names_exactly_the_opcodes_torch_runs() -> None:
    named = {name for name, value in vars(vm).items() if name in OPCODE_NAMES}
    assert len(named) == 34
    assert named == _torch_opcodes()
    for name in named:
        assert getattr(vm, name) == getattr(pickle, name)[0], name  # an int, compared with `data[pos]`


@pytest.mark.parametrize("name", ["STRING", "FRAME", "INST", "OBJ", "EXT1", "BINBYTES", "LIST", "DICT"])
def test_an_opcode_torch_refuses_is_refused_by_name(tmp_path: Path, name: str) -> None:
    code = getattr(pickle, name)
    data = b"\x80\x02" + code + b"\x00" * 16
    with pytest.raises(RestrictedPickleError, match=rf"unsupported pickle opcode 0x{code[0]:02x} \({name}\)"):
        vm.unpickle(data, path=str(tmp_path / "x.pt"), where="data.pkl")
