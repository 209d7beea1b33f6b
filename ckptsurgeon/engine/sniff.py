"""Deciding a file's format from its first bytes (never from its name).

:func:`sniff_format` returns "torch-zip", "torch-legacy" or "safetensors", or raises
BadCheckpointError with a hint that says what the file looks like instead (an HTML error page, a
Git LFS pointer, a compressed file, plain text, ...).
"""

from __future__ import annotations

import struct

from ..errors import BadCheckpointError

HEAD_SIZE = 4096  # bytes the caller should pass as `head` (or the whole file if smaller)

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch/serialization.py, first pickle of a legacy file
_MAGIC_LONG1 = b"\x8a\x0a" + MAGIC_NUMBER.to_bytes(10, "little")
_MAGIC_TEXT = b"L%dL\n" % MAGIC_NUMBER  # protocols 0 and 1 (no PROTO opcode): the LONG opcode

ZIP_LOCAL = b"PK\x03\x04"
ZIP_EMPTY = b"PK\x05\x06"

_COMPRESSED = {
    b"\x1f\x8b": "gzip-compressed",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ\x00": "xz-compressed",
    b"\x28\xb5\x2f\xfd": "zstd-compressed",
    b"7z\xbc\xaf\x27\x1c": "a 7-Zip archive",
}
_OTHER = {
    b"\x93NUMPY": "a NumPy .npy array, not a torch checkpoint",
    b"\x89HDF\r\n\x1a\n": "an HDF5 file (e.g. Keras .h5), not a torch checkpoint",
    b"GGUF": "a GGUF file (llama.cpp), not a torch checkpoint",
}


def is_legacy_magic(head: bytes) -> bool:
    """Whether `head` starts with the pickled magic number of torch's legacy format."""
    if head.startswith(_MAGIC_TEXT):
        return True
    if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:
        return False
    body = head[2:]
    if body[:1] == b"\x95":  # FRAME (protocol 4+) with an 8-byte length
        body = body[9:]
    return body.startswith(_MAGIC_LONG1)


def sniff_format(head: bytes, file_size: int, path: str) -> str:
    """The format of a file whose first bytes are `head` (at least HEAD_SIZE of them, or all).

    Raises BadCheckpointError naming `path` when the file is not a checkpoint we read.
    """

    def refuse(what: str) -> BadCheckpointError:
        return BadCheckpointError(f"{path}: not a checkpoint: {what}")

    if file_size == 0:
        raise refuse("empty file (0 bytes)")
    if head.startswith(ZIP_LOCAL):
        return "torch-zip"
    if head.startswith(ZIP_EMPTY):
        raise refuse("an empty ZIP archive")
    if is_legacy_magic(head):
        return "torch-legacy"
    if len(head) >= 9 and head[8:].lstrip(b" \t\r\n")[:1] == b"{":
        (header_len,) = struct.unpack_from("<Q", head)
        if header_len + 8 <= file_size:
            return "safetensors"
        if header_len < 1 << 32:  # a plausible length: a cut-off safetensors file
            raise BadCheckpointError(
                f"{path}: truncated safetensors file: the header claims {header_len} bytes but the "
                f"file has {file_size - 8} after the length"
            )
    if head.startswith(b"version https://git-lfs.github.com/spec/"):
        raise refuse("a Git LFS pointer file, not the file itself; run `git lfs pull`")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        raise refuse("looks like an HTML page, e.g. a download error page")
    for magic, what in _COMPRESSED.items():
        if head.startswith(magic):
            raise refuse(f"{what}; decompress it first")
    for magic, what in _OTHER.items():
        if head.startswith(magic):
            raise refuse(what)
    if head[257:262] == b"ustar":
        raise refuse(
            "a tar archive: the pre-1.0 torch.save format (or another tar file), which torch's "
            "weights_only loader refuses too; re-save it with a trusted torch"
        )
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise refuse("a plain Python pickle without torch's magic number")
    if _looks_like_text(head):
        first = head.split(b"\n", 1)[0][:60].decode("utf-8", "replace")
        raise refuse(f"plain text (first line {first!r})")
    raise refuse(f"unknown format (first bytes {head[:8].hex(' ')})")


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut at the end of `head`
            return False
        text = head[: e.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\r\n\f" for c in text)
