"""Every argument and option of the command line, declared once, as plain data.

Both parsers are built from this table: Typer's command signatures (`commands`) and the Typer-free
parser of the everyday `inspect` / `extract` lines (`fast`, for the options marked `fast`). Help
texts and metavars live here and nowhere else. No typer import: `fast` reads this module on every
call. Adding an option is one entry here plus its use in the command's body.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, NamedTuple


class Kind(str, Enum):
    """How an entry takes its value."""

    FLAG = "flag"  # --json: True when given
    TEXT = "text"  # --key PATH: one string
    TEXTS = "texts"  # -i PATTERN: repeatable, a list of strings
    PATH = "path"  # a file name (pathlib.Path)
    PATHS = "paths"  # positional, one or more file names
    LOCATION = "location"  # a checkpoint's file, directory or URL, kept as given (str: "out/", "s3://b/k")
    LOCATIONS = "locations"  # positional, one or more locations
    FLOAT = "float"
    INT = "int"
    CHOICE = "choice"  # one value of an Enum (`choices`)


class Group(str, Enum):
    """What an option is about; the order of the groups is the order in `--help`."""

    INPUT = "input"
    SELECTION = "selection"
    LOADING = "loading"
    OPERATION = "operation"
    MODEL = "model check"
    WRITING = "writing"
    OUTPUT = "output"


COMMANDS = ("inspect", "extract", "rename", "merge", "diff")
WRITERS = ("extract", "rename", "merge")
PATTERN_HELP = (
    "'conv1' selects the key conv1 and the module under it (conv1.weight; never conv10.* or conv1x1.*), "
    "'fc.' keys starting with fc., '*.bias' a glob over the whole key (* crosses dots); "
    "with --regex a Python regex searched anywhere"
)


class Opt(NamedTuple):
    """One argument (no `flags`) or option of one or more commands."""

    dest: str  # the keyword the command's body receives
    flags: tuple[str, ...]  # ("--include", "-i"); () for a positional argument
    kind: Kind
    metavar: str
    help: str
    commands: tuple[str, ...]
    group: Group
    required: bool = False
    default: Any = None  # None, False for a flag, a list for TEXTS
    fast: bool = False  # the Typer-free parser takes it (inspect and extract only)
    choices: str | None = None  # CHOICE: "module:Enum" of the core, imported only by Typer's parser


OPTIONS: tuple[Opt, ...] = (
    # ------------------------------------------------------------------------------ arguments
    Opt("ckpt", (), Kind.LOCATION, "CKPT",
        "Checkpoint file (torch.save zip or legacy format, or .safetensors): a path or a URL (s3://, gs://, hf://, "
        "https://, file://).",
        ("inspect", "extract", "rename"), Group.INPUT, required=True, fast=True),
    Opt("ckpts", (), Kind.LOCATIONS, "CKPT...", "Two or more checkpoint files (paths or URLs).",
        ("merge",), Group.INPUT, required=True),
    Opt("a", (), Kind.LOCATION, "A", "First checkpoint (A): a path or a URL.", ("diff",), Group.INPUT, required=True),
    Opt("b", (), Kind.LOCATION, "B", "Second checkpoint (B): a path or a URL.", ("diff",), Group.INPUT,
        required=True),
    # ------------------------------------------------------------------------------ selection
    Opt("include", ("--include", "-i"), Kind.TEXTS, "PATTERN",
        f"Select keys matching PATTERN (repeatable; any include matches): {PATTERN_HELP}.",
        ("inspect", "extract", "diff"), Group.SELECTION, fast=True),
    Opt("exclude", ("--exclude", "-x"), Kind.TEXTS, "PATTERN",
        "Drop keys matching PATTERN (repeatable; same rules as --include, applied after it).",
        ("inspect", "extract", "diff"), Group.SELECTION, fast=True),
    Opt("regex", ("--regex",), Kind.FLAG, "", "Patterns are Python regular expressions (re.search).",
        ("inspect", "extract", "diff"), Group.SELECTION, default=False, fast=True),
    # -------------------------------------------------------------------------------- loading
    Opt("key", ("--key",), Kind.TEXT, "PATH",
        "Dotted path of the state_dict inside a container, e.g. 'model_state_dict' or 'ema.0'.",
        COMMANDS, Group.LOADING, fast=True),
    Opt("key_a", ("--key-a",), Kind.TEXT, "PATH", "The state_dict's path inside A (overrides --key for A).",
        ("diff",), Group.LOADING),
    Opt("key_b", ("--key-b",), Kind.TEXT, "PATH", "The state_dict's path inside B (overrides --key for B).",
        ("diff",), Group.LOADING),
    Opt("unsafe", ("--unsafe",), Kind.FLAG, "",
        "Allow a full unpickle (weights_only=False). EXECUTES CODE from the file: trusted files only.",
        COMMANDS, Group.LOADING, default=False),
    Opt("allow_global", ("--allow-global",), Kind.TEXTS, "MODULE.NAME",
        "Allow one plain-data class in the pickle, e.g. argparse.Namespace (repeatable); built from attribute "
        "state only, never called; narrower than --unsafe.",
        COMMANDS, Group.LOADING),
    Opt("jobs", ("--jobs", "-j"), Kind.INT, "N",
        "Read, copy, check and compare shards and tensors in N threads (default: the CPUs, at most 8); "
        "the result is the same for every N.",
        COMMANDS, Group.LOADING, fast=True),
    Opt("storage_options", ("--storage-options",), Kind.TEXT, "JSON",
        "fsspec storage options for URL inputs and outputs, a JSON object, e.g. '{\"anon\": true}' or "
        "'{\"client_kwargs\": {\"endpoint_url\": \"http://127.0.0.1:9000\"}}'.",
        COMMANDS, Group.LOADING, fast=True),
    # ------------------------------------------------------------------------------ operation
    Opt("strip_prefix", ("--strip-prefix",), Kind.TEXTS, "P",
        "Remove prefix P where a key starts with it (repeatable, in order).", ("rename",), Group.OPERATION),
    Opt("add_prefix", ("--add-prefix",), Kind.TEXT, "P", "Prepend P to every key (applied last).",
        ("rename",), Group.OPERATION),
    Opt("sub", ("--sub",), Kind.TEXTS, "s/REGEX/REPL/",
        "sed-style substitution on every key (repeatable, in order; Python re.sub syntax, flags g and i).",
        ("rename",), Group.OPERATION),
    Opt("map_file", ("--map",), Kind.PATH, "FILE.json", "JSON object old -> new (applied first).",
        ("rename",), Group.OPERATION),
    Opt("on_conflict", ("--on-conflict",), Kind.CHOICE, "error|first|last",
        "A key found in several inputs: error (exit 2), or take the first or last.",
        ("merge",), Group.OPERATION, default="error", choices="ckptsurgeon.merge:OnConflict"),
    Opt("average", ("--average",), Kind.FLAG, "",
        "Weighted mean of floating-point tensors (same keys and shapes required).",
        ("merge",), Group.OPERATION, default=False),
    Opt("weights", ("--weights",), Kind.TEXT, "W,W,...",
        "With --average: comma-separated weights, normalised to sum 1.", ("merge",), Group.OPERATION),
    Opt("rtol", ("--rtol",), Kind.FLOAT, "R", "Relative tolerance: equal when |a-b| <= atol + rtol*|b|.",
        ("diff",), Group.OPERATION, default=0.0),
    Opt("atol", ("--atol",), Kind.FLOAT, "A", "Absolute tolerance.", ("diff",), Group.OPERATION, default=0.0),
    Opt("ignore_dtype", ("--ignore-dtype",), Kind.FLAG, "",
        "Report dtype changes without failing on them (the values must still agree).",
        ("diff",), Group.OPERATION, default=False),
    # ---------------------------------------------------------------------------- model check
    Opt("model", ("--model",), Kind.TEXT, "SPEC",
        "Check against a model class: 'package.module:Name' or 'path/file.py:Name'.", COMMANDS, Group.MODEL),
    Opt("model_kwargs", ("--model-kwargs",), Kind.TEXT, "JSON", "JSON object of constructor arguments for --model.",
        COMMANDS, Group.MODEL),
    Opt("allow_missing", ("--allow-missing",), Kind.FLAG, "",
        "With --model: keys the model has but the checkpoint lacks are fine.", COMMANDS, Group.MODEL, default=False),
    Opt("allow_unexpected", ("--allow-unexpected",), Kind.FLAG, "",
        "With --model: keys the checkpoint has but the model lacks are fine.", COMMANDS, Group.MODEL, default=False),
    # -------------------------------------------------------------------------------- writing
    Opt("output", ("--output", "-o"), Kind.LOCATION, "OUT",
        "File or directory to write (see --format): a path, or a URL of a file (s3://, gs://, hf://; uploaded "
        "whole once complete); a trailing / makes it a directory of shards.",
        WRITERS, Group.WRITING, required=True, fast=True),
    Opt("force", ("--force", "-f"), Kind.FLAG, "", "Replace an existing output (also when it is an input).",
        WRITERS, Group.WRITING, default=False, fast=True),
    Opt("dry_run", ("--dry-run",), Kind.FLAG, "", "Show what would be written; write nothing.",
        WRITERS, Group.WRITING, default=False, fast=True),
    Opt("format", ("--format",), Kind.CHOICE, "pt|safetensors|hf|hf-bin|dcp",
        "Layout of OUT: pt (torch.save's zip), safetensors, hf (a directory of safetensors shards + index, as the "
        "Hub), hf-bin (.bin shards + index), dcp (torch.distributed.checkpoint). By default from OUT: "
        "*.safetensors -> safetensors; a trailing /, an existing directory or --max-shard-size -> hf; else pt.",
        WRITERS, Group.WRITING, fast=True, choices="ckptsurgeon.io:OutputFormat"),
    Opt("dtype", ("--dtype",), Kind.CHOICE, "DTYPE",
        "Cast the floating-point tensors written to DTYPE (float16, bfloat16, float32, float64, float8_e4m3fn, "
        "float8_e5m2), bit for bit as torch's tensor.to(DTYPE); integer, bool, complex and quantized tensors are "
        "kept as they are, tied tensors stay tied.",
        WRITERS, Group.WRITING, fast=True, choices="ckptsurgeon.cast:CastDtype"),
    Opt("max_shard_size", ("--max-shard-size",), Kind.TEXT, "SIZE",
        "Largest shard of an hf or hf-bin output (default 5GB), or data file of a dcp output (default: one file): "
        "500MB, 5GB (decimal, as the Hub), 2GiB, or bytes; a tensor bigger than SIZE gets a shard of its own.",
        WRITERS, Group.WRITING, fast=True),
    Opt("verify", ("--verify",), Kind.FLAG, "",
        "Read the data back and check it: inspect checks every record's CRC-32; a writer compares the written "
        "file with what was meant before it replaces OUT.",
        ("inspect", *WRITERS), Group.WRITING, default=False, fast=True),
    Opt("stats", ("--stats",), Kind.FLAG, "",
        "Read the values: per tensor min, max, mean, std (sample, as torch.std) and the counts of NaN, Inf "
        "and zeros, in float64, streamed.",
        ("inspect",), Group.OPERATION, default=False, fast=True),
    Opt("check_finite", ("--check-finite",), Kind.FLAG, "",
        "Exit 1 when a selected tensor holds NaN or Inf, and name them (a CI gate against a diverged run).",
        ("inspect",), Group.OPERATION, default=False, fast=True),
    Opt("sha256", ("--hash",), Kind.FLAG, "",
        "sha256 of each tensor's values (its contiguous little-endian bytes): equal for equal values in any "
        "file format or layout.",
        ("inspect",), Group.OPERATION, default=False, fast=True),
    # --------------------------------------------------------------------------------- output
    Opt("as_json", ("--json",), Kind.FLAG, "", "Print one JSON document on stdout instead of tables.",
        COMMANDS, Group.OUTPUT, default=False, fast=True),
)  # fmt: skip


def options_for(command: str) -> list[Opt]:
    """The entries of `command`: arguments first, then options by group (the order of `--help`)."""
    mine = [o for o in OPTIONS if command in o.commands]
    order = list(Group)
    return sorted(mine, key=lambda o: (bool(o.flags), order.index(o.group)))
