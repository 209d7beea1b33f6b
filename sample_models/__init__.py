"""Tiny sample models and the checkpoints made from them (see make_samples.py)."""

from sample_models.models import BufferNet, SmallCNN, TiedLM, TransferCNN

__all__ = ["BufferNet", "SmallCNN", "TiedLM", "TransferCNN"]
