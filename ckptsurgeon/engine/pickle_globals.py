"""The globals a checkpoint's pickle may name, and what each resolves to (for :mod:`.unpickle`).

Three tables, checked in this order by the VM's GLOBAL / STACK_GLOBAL:

* :data:`MODELLED_GLOBALS`: the globals the engine models (OrderedDict, the tensor/parameter
  rebuild functions, storage classes, dtypes, `torch.Size`, `torch.device`, `_codecs.encode` for
  bytes, `builtins.set`), each as the value the VM pushes (what calling one does is in
  :mod:`.pickle_calls`);
* the rest of torch's weights_only allowlist (:data:`TORCH_WEIGHTS_ONLY_GLOBALS`) and the caller's
  `allow_globals`: valid, but not modelled (an :class:`Opaque` placeholder);
* everything else: a :class:`PickledGlobal`, never imported, which REDUCE / NEWOBJ turn into an
  :class:`OpaqueObject` placeholder (never called) when the caller reads opaque entries; else, and
  always for a name of :data:`BLOCKLISTED_MODULES` or one that :func:`runs_code` (`os.system`,
  `builtins.eval`, `subprocess.Popen`, ...), refused.

What makes an opaque entry acceptable (it builds no tensor) is checked by the VM
(:mod:`.unpickle`) and :func:`~.pickle_checks.opaque_refusals`.

Also here: :func:`resolve_name` (torch's Python 2 renames) and :func:`scan_globals`, which lists
the names a pickle refers to without running it.
"""

from __future__ import annotations

from typing import Any

from .meta import STORAGE_DTYPE, TorchDtype

# Modules torch never allows, even when a user allowlists a name from them.
BLOCKLISTED_MODULES = frozenset({"sys", "os", "posix", "nt"})

# Modules whose globals can run code or reach the system (files, sockets, processes, threads,
# exit hooks), and names that run code. `--allow-global` refuses them (see ckptsurgeon.safety);
# the VM never reads them as opaque entries: a file naming one is refused.
DANGEROUS_MODULES = (
    "os",
    "posix",
    "nt",
    "subprocess",
    "sys",
    "shutil",
    "importlib",
    "runpy",
    "pickle",
    "_pickle",
    "pkgutil",
    "builtins",
    "__builtin__",
    "socket",
    "ctypes",
    "code",
    "codeop",
    "pty",
    "commands",
    "multiprocessing",
    "webbrowser",
    "marshal",
    "types",
    "functools",
    "operator",
    "io",
    "_io",
    "timeit",
    "pdb",
    "bdb",
    "trace",
    "profile",
    "cProfile",
    "threading",
    "asyncio",
    "signal",
    "torch.storage",
    "torch.serialization",
    "torch.jit",
    "torch._C",
    "torch.ops",
    "torch.hub",
    "torch.utils",
    "torch.package",
    "torch._dynamo",
    "torch.fx",
    "torch.compiler",
    "logging",
    "zipfile",
    "tarfile",
    "shelve",
    "dbm",
    "sqlite3",
    "_sqlite3",
    "tempfile",
    "pathlib",
    "mmap",
    "select",
    "selectors",
    "_socket",
    "ssl",
    "_ssl",
    "socketserver",
    "http",
    "urllib",
    "ftplib",
    "smtplib",
    "poplib",
    "imaplib",
    "xmlrpc",
    "wsgiref",
    "_thread",
    "concurrent",
    "_posixsubprocess",
    "_ctypes",
    "gzip",
    "bz2",
    "lzma",
    "zipimport",
    "fileinput",
    "glob",
    "weakref",
    "_weakref",
    "atexit",
    "gc",
    "fcntl",
    "termios",
    "tty",
    "resource",
    "platform",
    "sched",
    "mailbox",
    "netrc",
    "_winapi",
    "msvcrt",
    "winreg",
    "site",
    "venv",
    "ensurepip",
)
DANGEROUS_NAMES = frozenset(
    {
        "eval",
        "exec",
        "compile",
        "getattr",
        "setattr",
        "__import__",
        "open",
        "apply",
        "_load_from_bytes",
    }
)
# Data types an opaque entry may name although their module is refused: OmegaConf's metadata
# names `dict`, `list` and `int` as types, hyper-parameters hold paths (nothing in an opaque
# entry is ever called; these only make values when the owner unpickles the file).
_INERT_GLOBALS = frozenset(
    [
        f"builtins.{t}"
        for t in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes", "bool")
        + ("object", "slice", "range", "NoneType")
    ]
    + [f"pathlib.{c}" for c in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")]
)
# More names that run code, which no opaque entry may name (a file naming one is refused).
_OPAQUE_REFUSED_NAMES = DANGEROUS_NAMES | {"system", "popen", "runstring", "run_path", "run_module", "loads", "load"}


def denied_module(module: str) -> str | None:
    """The entry of DANGEROUS_MODULES that `module` is (or is inside), else None."""
    for bad in DANGEROUS_MODULES:
        if module == bad or module.startswith(bad + "."):
            return bad
    return None


def runs_code(full: str) -> bool:
    """Whether the global `full` ("module.name") comes from a module of DANGEROUS_MODULES or
    BLOCKLISTED_MODULES (but data types such as `builtins.dict` or `pathlib.PosixPath`) or is named like a
    function that runs code (`eval`, `system`, `loads`, ...): the globals an opaque entry may
    never name."""
    if full in _INERT_GLOBALS:
        return False
    module, _, attr = full.rpartition(".")
    return module in BLOCKLISTED_MODULES or denied_module(module) is not None or attr in _OPAQUE_REFUSED_NAMES


# From torch/_utils.py (itself from CPython's _compat_pickle): Python 2 names torch renames.
IMPORT_MAPPING = {
    "__builtin__": "builtins",
    "copy_reg": "copyreg",
    "Queue": "queue",
    "repr": "reprlib",
    "_abcoll": "collections.abc",
    "UserDict": "collections",
    "UserList": "collections",
    "UserString": "collections",
    "whichdb": "dbm",
    "StringIO": "io",
    "cStringIO": "io",
}
NAME_MAPPING = {
    ("__builtin__", "xrange"): ("builtins", "range"),
    ("__builtin__", "reduce"): ("functools", "reduce"),
    ("__builtin__", "intern"): ("sys", "intern"),
    ("__builtin__", "unichr"): ("builtins", "chr"),
    ("__builtin__", "unicode"): ("builtins", "str"),
    ("__builtin__", "long"): ("builtins", "int"),
    ("itertools", "izip"): ("builtins", "zip"),
    ("itertools", "imap"): ("builtins", "map"),
    ("itertools", "ifilter"): ("builtins", "filter"),
    ("itertools", "ifilterfalse"): ("itertools", "filterfalse"),
    ("itertools", "izip_longest"): ("itertools", "zip_longest"),
    ("UserDict", "IterableUserDict"): ("collections", "UserDict"),
    ("UserList", "UserList"): ("collections", "UserList"),
    ("UserString", "UserString"): ("collections", "UserString"),
    ("__builtin__", "basestring"): ("builtins", "str"),
    ("exceptions", "StandardError"): ("builtins", "Exception"),
    ("UserDict", "UserDict"): ("collections", "UserDict"),
}

_TENSOR_TYPES = ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
_DTYPE_GLOBALS = frozenset(
    [
        "bfloat16",
        "bits16",
        "bits1x8",
        "bits2x4",
        "bits4x2",
        "bits8",
        "bool",
        "complex128",
        "complex32",
        "complex64",
        "float16",
        "float32",
        "float4_e2m1fn_x2",
        "float64",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "int16",
        "int32",
        "int64",
        "int8",
        "qint32",
        "qint8",
        "quint2x4",
        "quint4x2",
        "quint8",
        "uint16",
        "uint32",
        "uint64",
        "uint8",
    ]
    + [f"int{i}" for i in range(1, 8)]
    + [f"uint{i}" for i in range(1, 8)]
)

# torch 2.13's `_weights_only_unpickler._get_allowed_globals()` keys (a test compares them).
TORCH_WEIGHTS_ONLY_GLOBALS = frozenset(
    [
        "_codecs.encode",
        "builtins.bytearray",
        "builtins.complex",
        "builtins.set",
        "collections.Counter",
        "collections.OrderedDict",
        "torch.Size",
        "torch.Tensor",
        "torch.device",
        "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout",
        "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
        "torch._tensor._rebuild_from_type_v2",
        "torch.per_channel_affine",
        "torch.per_channel_affine_float_qparams",
        "torch.per_channel_symmetric",
        "torch.per_tensor_affine",
        "torch.per_tensor_symmetric",
    ]
    + [f"torch.{d}" for d in _DTYPE_GLOBALS]
    + [
        f"torch._utils.{f}"
        for f in (
            "_rebuild_device_tensor_from_cpu_tensor",
            "_rebuild_device_tensor_from_numpy",
            "_rebuild_meta_tensor_no_storage",
            "_rebuild_nested_tensor",
            "_rebuild_parameter",
            "_rebuild_parameter_with_state",
            "_rebuild_qtensor",
            "_rebuild_sparse_tensor",
            "_rebuild_tensor",
            "_rebuild_tensor_v2",
            "_rebuild_tensor_v3",
            "_rebuild_wrapper_subclass",
        )
    ]
    + [f"torch.{n}Storage" for n in _TENSOR_TYPES + ("ComplexDouble", "ComplexFloat")]
    + [f"torch.{n}Storage" for n in ("QInt32", "QInt8", "QUInt2x4", "QUInt4x2", "QUInt8")]
    + [f"torch.cuda.{n}Storage" for n in _TENSOR_TYPES + ("ComplexDouble", "ComplexFloat")]
    + [f"torch.{n}Tensor" for n in _TENSOR_TYPES]
    + [f"torch.cuda.{n}Tensor" for n in _TENSOR_TYPES]
    + [f"torch.sparse.{n}Tensor" for n in _TENSOR_TYPES if n != "Bool"]
    + [f"torch.cuda.sparse.{n}Tensor" for n in _TENSOR_TYPES if n != "Bool"]
)

# Allowed constructors that allocate memory sized by an int argument (`bytearray(10**12)`).
ALLOCATING_GLOBALS = frozenset(
    {"builtins.bytearray", "torch.Tensor", "torch.storage.TypedStorage", "torch.storage.UntypedStorage"}
    | {n for n in TORCH_WEIGHTS_ONLY_GLOBALS if n.endswith(("Tensor", "Storage"))}
)


class StorageClass:
    """A pickled storage class global (`torch.FloatStorage`, `torch.storage.UntypedStorage`, ...)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"<storage class {self.name}>"


class Opaque:
    """Placeholder for a value the engine does not model (or refuses); `name` says what it was."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<opaque {self.name}>"


class PickledGlobal:
    """A GLOBAL outside every allowlist, read as a name and never imported.

    `module` and `name` are as the file writes them (a writer pickles them again unchanged);
    `full` is the name torch would look up (Python 2 names mapped, see :func:`resolve_name`).
    """

    __slots__ = ("module", "name", "full")

    def __init__(self, module: str, name: str, full: str):
        self.module = module
        self.name = name
        self.full = full

    def __eq__(self, other: object) -> bool:
        if type(other) is not PickledGlobal:
            return NotImplemented
        return (self.module, self.name) == (other.module, other.name)

    def __hash__(self) -> int:
        return hash((self.module, self.name))

    def __repr__(self) -> str:
        return f"<global {self.full} (not loaded)>"


class OpaqueObject:
    """An object the file builds by calling a :class:`PickledGlobal` (or another OpaqueObject):
    recorded, never built.

    `callable` with `args` (a tuple) through REDUCE, or through NEWOBJ when `newobj`; then, in
    the order pickle writes them, the items APPEND(S) added (`listitems`), the pairs SETITEM(S)
    set (`dictitems`) and the states BUILD gave it (`states`). Pickling these again gives
    `pickle.load` the same object (see :mod:`.pickle_write`). Equal when made by the same pickle
    instructions from equal values (two reads of one file give equal entries); hashed by identity.
    """

    __slots__ = ("callable", "args", "newobj", "listitems", "dictitems", "states")

    def __init__(self, callable: PickledGlobal | OpaqueObject, args: tuple[Any, ...], newobj: bool):
        self.callable = callable
        self.args = args
        self.newobj = newobj
        self.listitems: list[Any] = []
        self.dictitems: list[tuple[Any, Any]] = []
        self.states: list[Any] = []

    @property
    def full(self) -> str:
        """The name of the global whose call made the object (e.g. "argparse.Namespace")."""
        inner: Any = self.callable
        while type(inner) is OpaqueObject:
            inner = inner.callable
        return str(inner.full)

    def children(self) -> list[Any]:
        """Every value the object was made from, in pickling order."""
        out: list[Any] = [self.callable, self.args, *self.listitems]
        for k, v in self.dictitems:
            out += (k, v)
        out += self.states
        return out

    def __eq__(self, other: object) -> bool:
        if type(other) is not OpaqueObject:
            return NotImplemented
        return self is other or (
            self.newobj == other.newobj
            and self.callable == other.callable
            and self.args == other.args
            and self.listitems == other.listitems
            and self.dictitems == other.dictitems
            and self.states == other.states
        )

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"<{self.full} (not loaded)>"


class ModelledCallable:
    """A modelled global callable; `kind` selects its handler."""

    __slots__ = ("kind",)

    def __init__(self, kind: str):
        self.kind = kind

    def __repr__(self) -> str:
        return f"<global {self.kind}>"


ORDERED_DICT = ModelledCallable("collections.OrderedDict")
SET = ModelledCallable("builtins.set")
PARAMETER = ModelledCallable("torch.nn.parameter.Parameter")
MODELLED_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": ORDERED_DICT,
    "torch.nn.parameter.Parameter": PARAMETER,
    "torch._utils._rebuild_tensor": ModelledCallable("torch._utils._rebuild_tensor"),
    "builtins.set": SET,
    "_codecs.encode": ModelledCallable("_codecs.encode"),
    "torch.Size": ModelledCallable("torch.Size"),
    "torch.device": ModelledCallable("torch.device"),
    "torch._utils._rebuild_tensor_v2": ModelledCallable("torch._utils._rebuild_tensor_v2"),
    "torch._utils._rebuild_tensor_v3": ModelledCallable("torch._utils._rebuild_tensor_v3"),
    "torch._utils._rebuild_parameter": ModelledCallable("torch._utils._rebuild_parameter"),
    "torch.storage.UntypedStorage": StorageClass("torch.storage.UntypedStorage", "uint8"),
}
for _name, _dtype in STORAGE_DTYPE.items():
    if _name != "UntypedStorage":
        MODELLED_GLOBALS[f"torch.{_name}"] = StorageClass(f"torch.{_name}", _dtype)
        MODELLED_GLOBALS[f"torch.cuda.{_name}"] = StorageClass(f"torch.cuda.{_name}", _dtype)
for _name in _DTYPE_GLOBALS:
    MODELLED_GLOBALS[f"torch.{_name}"] = TorchDtype(_name)
del _name, _dtype


def resolve_name(module: str, name: str) -> str:
    """The dotted name torch's weights_only unpickler looks up for a GLOBAL opcode."""
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


def scan_globals(data: bytes, start: int = 0) -> set[str]:
    """Every GLOBAL / STACK_GLOBAL name in the pickle at `start`, read without executing it."""
    import io
    import pickletools

    names: set[str] = set()
    strings: list[str] = []
    # protocol 4 memoizes every string and fetches repeated module names from the memo
    memo: dict[int, str] = {}
    memoized = 0  # MEMOIZE's next index
    last: str | None = None  # the string the last opcode pushed, if it pushed one
    try:
        for info, arg, _pos in pickletools.genops(io.BytesIO(memoryview(data)[start:])):
            name = info.name
            if type(arg) is str:
                if name == "GLOBAL" or name == "INST":
                    module, _, attr = arg.partition(" ")
                    names.add(resolve_name(module, attr))
                    last = None
                elif "UNICODE" in name:
                    strings.append(arg)
                    last = arg
                else:
                    last = None
            elif name == "MEMOIZE":
                if last is not None:
                    memo[memoized] = last
                memoized += 1
            elif name in ("BINPUT", "LONG_BINPUT", "PUT") and isinstance(arg, int):
                if last is not None:
                    memo[arg] = last
                elif arg in memo:
                    del memo[arg]
            elif name in ("BINGET", "LONG_BINGET", "GET") and isinstance(arg, int):
                last = memo.get(arg)
                if last is not None:
                    strings.append(last)
            elif name == "STACK_GLOBAL":
                if len(strings) >= 2:
                    names.add(resolve_name(strings[-2], strings[-1]))
                last = None
            elif name == "STOP":
                break
            elif name != "FRAME" and name != "MARK":
                last = None
    except Exception:  # noqa: BLE001 - a malformed tail ends the scan; we report what we saw
        pass
    return names


def refused_globals(names: set[str], allow_globals: frozenset[str]) -> set[str]:
    """The names among `names` that the VM refuses (the blocklisted ones, and those in no table)."""
    out = set()
    for full in names:
        module = full.rsplit(".", 1)[0]
        if module in BLOCKLISTED_MODULES:
            out.add(full)
        elif full in MODELLED_GLOBALS or full in TORCH_WEIGHTS_ONLY_GLOBALS or full in allow_globals:
            continue
        else:
            out.add(full)
    return out
