"""Write the sample checkpoints in sample_models/ (deterministic: same bytes on every run).

Run as ``python sample_models/make_samples.py`` or ``python -m sample_models.make_samples``;
``--out DIR`` writes them elsewhere. Every value is a seeded multiple of 2**-12 made by integer
arithmetic (no training, no floating-point computation), so the bytes are the same on every CPU:

==========================  ====================================================================
smallcnn.pt                 bare state_dict (torch zip format)
smallcnn_train.ckpt         training container: epoch, model_state_dict, optimizer_state_dict, loss
smallcnn_dp.pt              the same weights as nn.DataParallel saves them (keys prefixed `module.`)
smallcnn.safetensors        the same weights as safetensors
smallcnn_legacy.pt          the same weights in the legacy (pre-1.6, non-zip) torch format
tiedlm.pt                   TiedLM: `embed.weight` and `head.weight` share one storage
buffernet.pt                BufferNet: a persistent buffer and BatchNorm statistics
==========================  ====================================================================
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sample_models.models import BufferNet, SmallCNN, TiedLM  # noqa: E402

SEED = 0
LOSS = 0.525828  # the recorded "last training loss" of smallcnn_train.ckpt
HERE = Path(__file__).resolve().parent
FILES = (
    "smallcnn.pt",
    "smallcnn_train.ckpt",
    "smallcnn_dp.pt",
    "smallcnn.safetensors",
    "smallcnn_legacy.pt",
    "tiedlm.pt",
    "buffernet.pt",
)


def _grid_values(rng: random.Random, numel: int, low: int, high: int) -> list[float]:
    """`numel` multiples of 2**-12 drawn from [low, high] * 2**-12: exact in every float dtype used
    here, and made by integer arithmetic only, so the same on every CPU."""
    return [rng.randint(low, high) / 4096 for _ in range(numel)]


def _fill(module: nn.Module, rng: random.Random) -> None:
    """Give every floating-point parameter and buffer of `module` seeded grid values.

    BatchNorm running variances and weights stay positive and near 1, as after training; each
    storage is filled once (a tied weight keeps one set of values).
    """
    seen: set[int] = set()
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.is_floating_point() or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            positive = name.endswith("running_var") or (name.startswith("bn") and name.endswith("weight"))
            low, high = (2048, 6144) if positive else (-1024, 1024)
            values = _grid_values(rng, tensor.numel(), low, high)
            tensor.copy_(torch.tensor(values, dtype=tensor.dtype).reshape(tensor.shape))


def trained_smallcnn() -> tuple[SmallCNN, torch.optim.Optimizer, float]:
    """SmallCNN as after 3 epochs of 12 Adam steps, with its optimizer state and last loss.

    No training is run: floating-point results of training differ between CPUs (AVX2 against
    AVX-512, thread counts), and these files must come out byte for byte the same on any machine.
    Weights, statistics and Adam moments are seeded grid values; the loss is a recorded number.
    """
    rng = random.Random(SEED)
    model = SmallCNN(num_classes=10)
    _fill(model, rng)
    steps = 36
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.num_batches_tracked.fill_(steps)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for p in model.parameters():
        optimizer.state[p] = {
            "step": torch.tensor(float(steps)),
            "exp_avg": torch.tensor(_grid_values(rng, p.numel(), -64, 64)).reshape(p.shape),
            "exp_avg_sq": torch.tensor(_grid_values(rng, p.numel(), 0, 16)).reshape(p.shape),
        }
    model.eval()
    return model, optimizer, LOSS


def save_legacy(obj: object, path: Path) -> None:
    """``torch.save(obj, path, _use_new_zipfile_serialization=False)`` with reproducible bytes.

    torch's legacy writer names storages by memory address (`str(storage._cdata)`) and writes them
    in the sorted order of those names, so its output changes from run to run. This is the same
    writer (same pickles, same persistent ids, same data records) naming storages "0", "1", ... in
    the order they are first pickled.
    """
    import pickle

    from torch import serialization as ser

    keys: dict[int, str] = {}
    storages: dict[str, torch.storage.TypedStorage] = {}

    class LegacyPickler(pickle.Pickler):
        def persistent_id(self, value: object) -> tuple | None:
            if not isinstance(value, torch.storage.TypedStorage):
                return None
            untyped = value._untyped_storage
            key = keys.setdefault(untyped._cdata, str(len(keys)))
            storages.setdefault(key, value)
            storage_type = getattr(torch, value._pickle_storage_type())
            return ("storage", storage_type, key, ser.location_tag(untyped), value._size(), None)

    sys_info = {
        "protocol_version": ser.PROTOCOL_VERSION,
        "little_endian": sys.byteorder == "little",
        "type_sizes": {"short": ser.SHORT_SIZE, "int": ser.INT_SIZE, "long": ser.LONG_SIZE},
    }
    with open(path, "wb") as f:
        for header in (ser.MAGIC_NUMBER, ser.PROTOCOL_VERSION, sys_info):
            pickle.dump(header, f, protocol=ser.DEFAULT_PROTOCOL)
        LegacyPickler(f, protocol=ser.DEFAULT_PROTOCOL).dump(obj)
        ordered = sorted(storages)
        pickle.dump(ordered, f, protocol=ser.DEFAULT_PROTOCOL)
        f.flush()
        for key in ordered:
            storage = storages[key]
            storage._untyped_storage._write_file(f, True, True, torch._utils._element_size(storage.dtype))


def make_samples(out: Path = HERE) -> list[Path]:
    """Write every sample checkpoint into `out`; return their paths."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model, optimizer, loss = trained_smallcnn()
    tied = TiedLM()
    _fill(tied, random.Random(SEED + 1))
    buffers = BufferNet()
    _fill(buffers, random.Random(SEED + 2))
    buffers.bn.num_batches_tracked.fill_(1)
    buffers.eval()

    state = model.state_dict()
    torch.save(state, out / "smallcnn.pt")
    torch.save(
        {
            "epoch": 3,
            "model_state_dict": state,
            "optimizer_state_dict": optimizer.state_dict(),
            "loss": round(loss, 6),
        },
        out / "smallcnn_train.ckpt",
    )
    torch.save(nn.DataParallel(model).state_dict(), out / "smallcnn_dp.pt")
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(out / "smallcnn.safetensors"),
        metadata={"format": "pt"},  # one entry: safetensors writes a map's entries in random order
    )
    save_legacy(state, out / "smallcnn_legacy.pt")
    torch.save(tied.state_dict(), out / "tiedlm.pt")
    torch.save(buffers.state_dict(), out / "buffernet.pt")
    return [out / name for name in FILES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write into (default: sample_models/)")
    args = parser.parse_args(argv)
    for path in make_samples(args.out):
        print(f"{path.stat().st_size:>8}  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
