"""A zoo of tiny checkpoints written by torch itself, shared by the tests.

`build_zoo(directory)` writes every specimen and returns `{name: path}`; `ZOO` lists the names and
what each one covers. Every file is a few KB. Specimens are deterministic (fixed seeds), so two
builds produce the same tensors.

Formats: `.pt` files are `torch.save` zip files, `legacy_*.pt` use
`_use_new_zipfile_serialization=False`, `.safetensors` files come from `safetensors.torch`.

The `cuda_location*` specimens hold storages tagged "cuda:0" although this machine has no GPU:
`fake_location("cuda:0")` puts a tagger first in torch.serialization's location registry for the
duration of a `torch.save`, so torch writes "cuda:0" into each storage's persistent id exactly as
it would for a CUDA tensor. Load them with `map_location="cpu"`.

`craft_zip(path, members)` writes an arbitrary stored ZIP (for hand-made, broken or hostile
files); `pickle_bytes(obj)` pickles with protocol 2 like torch.save does, turning `StorageRef`
values into persistent ids and `TensorSpec` values into `_rebuild_tensor_v2` calls, so a test can
produce any data.pkl it needs without torch's own checks.
"""

from __future__ import annotations

import collections
import contextlib
import io
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# name -> what the specimen covers (the file name is derived from the name)
ZOO: dict[str, str] = {
    "dtypes": "one tensor of every dtype the engine models, incl. bfloat16, float8, uint16-64, complex",
    "views": "views with storage offsets, rows, columns and a slice of a larger tensor",
    "strides": "transposed, channels_last and expanded (stride 0) tensors",
    "tied": "two keys and a view sharing one storage (tied weights)",
    "empty": "0-dim tensors, empty tensors, an empty view at an offset",
    "parameters": "nn.Parameter values with and without requires_grad",
    "module": "a real nn.Module state_dict with BatchNorm: OrderedDict with _metadata",
    "training": "{'epoch', 'model_state_dict', 'optimizer_state_dict'} after an Adam step",
    "lightning": "a Lightning-style {'state_dict', 'hyper_parameters', ...} container",
    "values": "non-tensor values: bytes, set, torch.Size, torch.device, dtypes, big ints, nesting",
    "tensor": "a bare tensor as the whole checkpoint",
    "cuda_location": "storages tagged 'cuda:0' (see fake_location)",
    "legacy_module": "legacy format: a BatchNorm state_dict with _metadata",
    "legacy_training": "legacy format: a training container",
    "legacy_dtypes": "legacy format: every dtype torch can load back from it (see LEGACY_DTYPES)",
    "legacy_views": "legacy format: views and tied storages",
    "legacy_cuda_location": "legacy format: storages tagged 'cuda:0'",
    "safetensors": "safetensors: every dtype, an empty tensor and __metadata__",
}


class TinyNet(torch.nn.Module):
    """Conv + BatchNorm + Linear: a state_dict with buffers, num_batches_tracked and _metadata."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.bn = torch.nn.BatchNorm2d(3)
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dtype_tensors() -> dict[str, torch.Tensor]:
    """One small tensor per dtype, with non-trivial values."""
    g = _gen(1)
    base = torch.randn(5, generator=g) * 3
    out = {
        "float64": base.double(),
        "float32": base.float(),
        "float16": base.half(),
        "bfloat16": base.bfloat16(),
        "float8_e4m3fn": base.to(torch.float8_e4m3fn),
        "float8_e5m2": base.to(torch.float8_e5m2),
        "complex64": torch.randn(3, dtype=torch.complex64, generator=g),
        "complex128": torch.randn(2, dtype=torch.complex128, generator=g),
        "int8": torch.tensor([-128, -1, 0, 1, 127], dtype=torch.int8),
        "int16": torch.tensor([-32768, 7, 32767], dtype=torch.int16),
        "int32": torch.tensor([-(2**31), 5, 2**31 - 1], dtype=torch.int32),
        "int64": torch.tensor([-(2**63), 9, 2**63 - 1], dtype=torch.int64),
        "uint8": torch.tensor([0, 17, 255], dtype=torch.uint8),
        "uint16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
        "uint32": torch.tensor([0, 3, 2**32 - 1], dtype=torch.uint32),
        "uint64": torch.tensor([0, 2**63 + 5], dtype=torch.uint64),
        "bool": torch.tensor([True, False, True]),
    }
    return out


# torch 2.13 saves float8 / uint16-64 tensors in the legacy format (as UntypedStorage) but cannot
# load them back ("'UntypedStorage' has no attribute 'dtype'"), so legacy_dtypes leaves them out.
LEGACY_DTYPES = (
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "complex64",
    "complex128",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "bool",
)


def view_tensors() -> dict[str, torch.Tensor]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "base": base,
        "row": base[2],
        "column": base[:, 3],
        "block": base[1:3, 2:5],
        "tail": base.flatten()[20:],
        "lonely_slice": torch.arange(40, dtype=torch.int16)[10:20],  # brings its whole storage
    }


def stride_tensors() -> dict[str, torch.Tensor]:
    g = _gen(2)
    x = torch.randn(3, 4, generator=g)
    return {
        "transposed": x.t(),
        "channels_last": torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
        "expanded": torch.arange(3.0).expand(4, 3),
        "every_other": torch.arange(10, dtype=torch.int32)[::2],
    }


def tied_tensors() -> dict[str, torch.Tensor]:
    w = torch.randn(5, 3, generator=_gen(3))
    return {"encoder.weight": w, "decoder.weight": w, "first_row": w[0], "other": torch.ones(2)}


def empty_tensors() -> dict[str, torch.Tensor]:
    return {
        "scalar": torch.tensor(3.5),
        "int_scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.empty(0, 3),
        "empty_view": torch.arange(6.0)[6:],
        "zero_numel_2d": torch.zeros(2, 0),
    }


def parameter_values() -> dict[str, Any]:
    g = _gen(4)
    frozen = torch.nn.Parameter(torch.randn(3, generator=g), requires_grad=False)
    return {
        "weight": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
        "frozen": frozen,
        "frozen_again": frozen,
        "plain": torch.randn(2, generator=g),
        "grad_tensor": torch.randn(2, generator=g).requires_grad_(),
    }


def tiny_net(seed: int = 0) -> TinyNet:
    """A TinyNet after one training step (so BatchNorm buffers are not at their defaults)."""
    torch.manual_seed(seed)
    net = TinyNet()
    net(torch.randn(4, 2, 4, 4)).sum().backward()
    return net


def training_checkpoint() -> dict[str, Any]:
    net = tiny_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    opt.step()
    return {"epoch": 5, "model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict(), "loss": 0.25}


def lightning_checkpoint() -> dict[str, Any]:
    net = tiny_net(1)
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": collections.OrderedDict(("model." + k, v) for k, v in net.state_dict().items()),
        "hyper_parameters": {
            "lr": 1e-3,
            "layers": [4, 8],
            "name": "tiny",
            "betas": (0.9, 0.999),
            "flag": True,
            "nothing": None,
        },
        "callbacks": {},
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}},
        "lr_schedulers": [],
    }


def misc_values() -> dict[str, Any]:
    return {
        "bytes": b"\x00\xffabc",
        "text": "naïve ✓",
        "set": {1, 2, 3},
        "size": torch.Size([2, 3]),
        "devices": [torch.device("cpu"), torch.device("cuda", 1), torch.device("cuda")],
        "dtypes": (torch.float32, torch.bfloat16, torch.int4, torch.quint8),
        "ints": [0, -1, 255, 256, 65536, -(2**31), 2**31, 2**70, -(2**70)],
        "floats": [0.0, -1.5, 1e300, float("inf")],
        "nested": {"a": [(1, "x"), {"b": None}], "t": ()},
        "bools": (True, False),
        "weights": {"w": torch.ones(2)},
    }


@contextlib.contextmanager
def fake_location(location: str) -> Iterator[None]:
    """Make torch.save tag every storage with `location` (e.g. "cuda:0") while the block runs."""
    entry = (-1000, lambda storage: location, lambda storage, loc: None)
    registry = torch.serialization._package_registry
    registry.insert(0, entry)
    try:
        yield
    finally:
        registry.remove(entry)


def _save(obj: Any, path: Path, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _safetensors(path: Path) -> Path:
    tensors = {k: v for k, v in dtype_tensors().items() if k != "complex128"}  # no C128 code
    tensors["empty"] = torch.zeros(0, 4)
    save_file(tensors, str(path), metadata={"format": "pt", "note": "zoo"})
    return path


_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "dtypes": lambda d: _save(dtype_tensors(), d / "dtypes.pt"),
    "views": lambda d: _save(view_tensors(), d / "views.pt"),
    "strides": lambda d: _save(stride_tensors(), d / "strides.pt"),
    "tied": lambda d: _save(tied_tensors(), d / "tied.pt"),
    "empty": lambda d: _save(empty_tensors(), d / "empty.pt"),
    "parameters": lambda d: _save(parameter_values(), d / "parameters.pt"),
    "module": lambda d: _save(tiny_net().state_dict(), d / "module.pt"),
    "training": lambda d: _save(training_checkpoint(), d / "training.pt"),
    "lightning": lambda d: _save(lightning_checkpoint(), d / "lightning.ckpt"),
    "values": lambda d: _save(misc_values(), d / "values.pt"),
    "tensor": lambda d: _save(torch.arange(12.0).reshape(3, 4)[1:], d / "tensor.pt"),
    "legacy_module": lambda d: _save(tiny_net().state_dict(), d / "legacy_module.pt", legacy=True),
    "legacy_training": lambda d: _save(training_checkpoint(), d / "legacy_training.pt", legacy=True),
    "legacy_dtypes": lambda d: _save(
        {k: v for k, v in dtype_tensors().items() if k in LEGACY_DTYPES}, d / "legacy_dtypes.pt", legacy=True
    ),
    "legacy_views": lambda d: _save({**view_tensors(), **tied_tensors()}, d / "legacy_views.pt", legacy=True),
    "safetensors": lambda d: _safetensors(d / "zoo.safetensors"),
}


def _cuda(directory: Path, legacy: bool) -> Path:
    name = "legacy_cuda_location.pt" if legacy else "cuda_location.pt"
    with fake_location("cuda:0"):
        return _save(tied_tensors(), directory / name, legacy=legacy)


_BUILDERS["cuda_location"] = lambda d: _cuda(d, legacy=False)
_BUILDERS["legacy_cuda_location"] = lambda d: _cuda(d, legacy=True)


def build(name: str, directory: Path) -> Path:
    """Write the specimen `name` into `directory` and return its path."""
    return _BUILDERS[name](Path(directory))


def build_zoo(directory: Path) -> dict[str, Path]:
    """Write every specimen of ZOO into `directory`; return {name: path}."""
    return {name: build(name, directory) for name in ZOO}


# -- hand-made files -------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageRef:
    """Pickles as the persistent id `('storage', <storage class>, key, location, numel)` (add
    `view=None` for the legacy 6-tuple)."""

    storage_class: Any  # e.g. torch.FloatStorage, or any object pickle can name
    key: str
    numel: int
    location: str = "cpu"
    legacy: bool = False

    def pid(self) -> tuple:
        pid: tuple = ("storage", self.storage_class, self.key, self.location, self.numel)
        return pid + (None,) if self.legacy else pid


@dataclass(frozen=True)
class TensorSpec:
    """Pickles as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
    OrderedDict())`, with nothing checked."""

    storage: StorageRef
    size: tuple
    stride: tuple
    offset: int = 0
    requires_grad: bool = False

    def __reduce__(self) -> tuple:
        return (
            torch._utils._rebuild_tensor_v2,
            (self.storage, self.offset, self.size, self.stride, self.requires_grad, collections.OrderedDict()),
        )


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.pid() if isinstance(obj, StorageRef) else None


def pickle_bytes(obj: Any) -> bytes:
    """Protocol-2 pickle of `obj`, with StorageRef / TensorSpec handled as described above."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def craft_zip(path: Path, members: list[tuple[str, bytes]], *, compress: set[str] = frozenset()) -> Path:
    """Write a ZIP with `members` (name, data) in order, stored unless named in `compress`.

    Duplicate names are written as given (zipfile warns), so broken archives can be made too.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members:
                method = zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED
                zf.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return path


def torch_zip(
    path: Path,
    obj: Any,
    records: dict[str, bytes],
    *,
    prefix: str = "archive",
    extra: list[tuple[str, bytes]] | None = None,
) -> Path:
    """A checkpoint laid out like torch.save's: `prefix/data.pkl` = pickle_bytes(obj), then
    `prefix/data/<key>` for each record, `byteorder` and `version`."""
    members = [(f"{prefix}/data.pkl", pickle_bytes(obj)), (f"{prefix}/byteorder", b"little")]
    members += [(f"{prefix}/data/{k}", v) for k, v in records.items()]
    members += [(f"{prefix}/version", b"3\n")] + (extra or [])
    return craft_zip(path, members)


def masked_serialization_id(path: Path) -> bytes:
    """The file's bytes with the random `.data/serialization_id` content and CRCs zeroed."""
    data = bytearray(path.read_bytes())
    z = zipfile.ZipFile(path)
    for info in z.infolist():
        if info.filename.endswith("/.data/serialization_id"):
            start = data_start(data, info.header_offset)
            data[start : start + info.file_size] = bytes(info.file_size)
            data[start + info.file_size + 4 : start + info.file_size + 8] = bytes(4)
            cd = data.rfind(info.filename.encode()) - 46  # its central directory entry
            assert data[cd : cd + 4] == b"PK\x01\x02"
            data[cd + 16 : cd + 20] = bytes(4)
    return bytes(data)


def data_start(data: bytes | bytearray, header_offset: int) -> int:
    name_len, extra_len = struct.unpack_from("<HH", data, header_offset + 26)
    return header_offset + 30 + name_len + extra_len
