"""CRC-32 (the zip/gzip polynomial) for the engine: one implementation, shared by every reader
and writer.

`crc32` is ISA-L's (python-isal, 9-11 GB/s here, ~3x zlib's) where its wheel is installed, else
zlib's; both release the GIL, so two threads check two files at once. `crc32_combine` and
`crc32_zeros` do the polynomial arithmetic zlib does not expose to Python: joining the CRCs of two
pieces, and moving a CRC past a run of zero bytes (holes of sparse files) without reading them.
"""

from __future__ import annotations

import functools

try:
    from isal.isal_zlib import crc32
except ImportError:  # no wheel for this platform: zlib's, a third as fast
    from zlib import crc32

__all__ = ["crc32", "crc32_combine", "crc32_zeros"]


def crc32_zeros(crc: int, n: int) -> int:
    """`crc32(bytes(n), crc)` in O(log n) time."""
    if n <= 0:
        return crc
    return _multmodp(_x8nmodp(n), crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of `first + second` from crc1 = crc32(first), crc2 = crc32(second) and
    len2 = len(second): zlib's crc32_combine, which Python's zlib module does not expose."""
    return _multmodp(_x8nmodp(len2), crc1) ^ crc2


_CRC_POLY = 0xEDB88320  # CRC-32 polynomial, bit-reversed (as zlib)


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial (bit-reversed representation)."""
    p = 0
    m = 1 << 31
    while m:
        if a & m:
            p ^= b
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1
    return p


@functools.lru_cache(maxsize=1)
def _x2n_table() -> list[int]:
    """table[k] = x^(2^k) modulo the polynomial (made on first use: most runs never need it)."""
    table = [1 << 30]  # x^1
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))
    return table


@functools.lru_cache(maxsize=64)
def _x8nmodp(n: int) -> int:
    """x^(8n) modulo the CRC-32 polynomial: the operator that moves a CRC past n zero bytes."""
    x2n = _x2n_table()
    p = 1 << 31  # x^0
    k = 3
    while n:
        if n & 1:
            p = _multmodp(x2n[k & 31], p)
        n >>= 1
        k += 1
    return p
