"""Write the sample checkpoints in sample_models/ (deterministic: same bytes on every run).

Run as ``python sample_models/make_samples.py`` or ``python -m sample_models.make_samples``;
``--out DIR`` writes them elsewhere. Trains SmallCNN for a few steps on synthetic data, then saves:

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
import sys
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sample_models.models import BufferNet, SmallCNN, TiedLM  # noqa: E402

SEED = 0
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


def train_smallcnn(steps: int = 12, epochs: int = 3) -> tuple[SmallCNN, torch.optim.Optimizer, float]:
    """SmallCNN after `epochs` x `steps` Adam steps on a fixed synthetic task; returns the last loss."""
    torch.manual_seed(SEED)
    model = SmallCNN(num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    images = torch.randn(64, 3, 16, 16)
    labels = (images.mean(dim=(2, 3)) @ torch.randn(3, 10)).argmax(dim=1)
    loss = torch.tensor(0.0)
    model.train()
    for _ in range(epochs):
        for step in range(steps):
            batch = slice((step * 16) % 64, (step * 16) % 64 + 16)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
    model.eval()
    return model, optimizer, float(loss.detach())


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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # identical floating-point results on any machine
    try:
        model, optimizer, loss = train_smallcnn()
        torch.manual_seed(SEED)
        tied = TiedLM()
        torch.manual_seed(SEED)
        buffers = BufferNet()
        buffers.train()
        with torch.no_grad():
            buffers(torch.randn(8, 4))  # non-trivial running stats, num_batches_tracked == 1
        buffers.eval()
    finally:
        torch.set_num_threads(threads)

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
