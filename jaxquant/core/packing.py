"""Bit packing of small unsigned integer codes, along axis 0.

Every function here is a pure ``jax.numpy`` function that works under ``jax.jit`` and ``jax.vmap``.
Codes are unsigned (``0 <= c < 2**bits``); signed values are offset by the caller before packing.

Layouts (``n`` = number of codes along axis 0, padded with zeros to a whole word):

* 8 bits: ``uint8``, one code per byte, shape ``(n, ...)``.
* 4 bits: ``uint8``, two codes per byte, shape ``(ceil(n/2), ...)``; code ``2i`` in the low nibble,
  code ``2i+1`` in the high nibble (the GPTQ / llama.cpp order along the packed axis).
* 2 bits: ``uint8``, four codes per byte, shape ``(ceil(n/4), ...)``; code ``4i+j`` in bits ``2j..2j+1``.
* any other width ``b`` (3, 5, 6, 7): dense bit stream, 32 codes in ``b`` little-endian ``uint32`` words,
  shape ``(ceil(n/32)*b, ...)``; code ``j`` of a chunk occupies stream bits ``[j*b, (j+1)*b)``.
* base 3 ("trits"): values in {0, 1, 2}, five per byte as ``sum_j t_j 3**j`` (< 243), i.e. 1.6 bits each.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["bits_storage", "pack", "pack_trits", "packed_rows", "trit_rows", "unpack", "unpack_trits"]


def packed_rows(n: int, bits: int) -> int:
    """Number of rows (along axis 0) of the packed array for ``n`` codes of width ``bits``."""
    _check_bits(bits)
    if bits == 8:
        return n
    if bits in (4, 2):
        per = 8 // bits
        return -(-n // per)
    return -(-n // 32) * bits


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def _pad_rows(x: jnp.ndarray, multiple: int) -> jnp.ndarray:
    n = x.shape[0]
    pad = (-n) % multiple
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)], axis=0)
    return x


def pack(codes: jnp.ndarray, bits: int) -> jnp.ndarray:
    """Pack unsigned ``codes`` (any integer dtype, values in ``[0, 2**bits)``) along axis 0.

    Returns ``uint8`` for ``bits`` in {2, 4, 8} and ``uint32`` otherwise; see the module docstring.
    """
    _check_bits(bits)
    if codes.ndim == 0:
        raise ValueError("pack needs at least one axis")
    if bits == 8:
        return codes.astype(jnp.uint8)
    if bits in (4, 2):
        per = 8 // bits
        c = _pad_rows(codes.astype(jnp.uint8), per)
        c = c.reshape(c.shape[0] // per, per, *c.shape[1:])
        out = c[:, 0]
        for j in range(1, per):
            out = out | (c[:, j] << jnp.uint8(j * bits))
        return out
    c = _pad_rows(codes.astype(jnp.uint32), 32)
    c = c.reshape(c.shape[0] // 32, 32, *c.shape[1:])
    words = []
    for w in range(bits):
        word = jnp.zeros_like(c[:, 0])
        lo, hi = 32 * w, 32 * (w + 1)
        for j in range(32):
            start = j * bits
            end = start + bits
            if end <= lo or start >= hi:
                continue
            shift = start - lo
            if shift >= 0:
                word = word | (c[:, j] << jnp.uint32(shift))
            else:
                word = word | (c[:, j] >> jnp.uint32(-shift))
        words.append(word)
    out = jnp.stack(words, axis=1)
    return out.reshape(out.shape[0] * bits, *out.shape[2:])


def unpack(packed: jnp.ndarray, bits: int, n: int) -> jnp.ndarray:
    """Inverse of :func:`pack`: the first ``n`` codes along axis 0, as ``uint8``."""
    _check_bits(bits)
    if bits == 8:
        return packed[:n].astype(jnp.uint8)
    if bits in (4, 2):
        per = 8 // bits
        mask = jnp.uint8((1 << bits) - 1)
        parts = [(packed >> jnp.uint8(j * bits)) & mask for j in range(per)]
        out = jnp.stack(parts, axis=1)
        return out.reshape(packed.shape[0] * per, *packed.shape[1:])[:n]
    p = packed.astype(jnp.uint32).reshape(packed.shape[0] // bits, bits, *packed.shape[1:])
    mask = jnp.uint32((1 << bits) - 1)
    vals = []
    for j in range(32):
        start = j * bits
        w, off = divmod(start, 32)
        v = p[:, w] >> jnp.uint32(off)
        if off + bits > 32:
            v = v | (p[:, w + 1] << jnp.uint32(32 - off))
        vals.append(v & mask)
    out = jnp.stack(vals, axis=1)
    return out.reshape(out.shape[0] * 32, *out.shape[2:])[:n].astype(jnp.uint8)


def trit_rows(n: int) -> int:
    """Rows of the base-3 packed array for ``n`` trits (five per byte)."""
    return -(-n // 5)


def pack_trits(trits: jnp.ndarray) -> jnp.ndarray:
    """Pack values in {0, 1, 2} five per byte along axis 0: ``byte = sum_j t_{5i+j} * 3**j``."""
    t = _pad_rows(trits.astype(jnp.uint8), 5)
    t = t.reshape(t.shape[0] // 5, 5, *t.shape[1:])
    out = jnp.zeros_like(t[:, 0])
    for j in range(5):
        out = out + t[:, j] * jnp.uint8(3**j)
    return out


def unpack_trits(packed: jnp.ndarray, n: int) -> jnp.ndarray:
    """Inverse of :func:`pack_trits`: the first ``n`` trits along axis 0, as ``uint8``."""
    parts = [(packed // jnp.uint8(3**j)) % jnp.uint8(3) for j in range(5)]
    out = jnp.stack(parts, axis=1)
    return out.reshape(packed.shape[0] * 5, *packed.shape[1:])[:n]


def bits_storage(n: int, bits: int) -> int:
    """Bytes used by :func:`pack` for ``n`` codes (per column)."""
    rows = packed_rows(n, bits)
    return rows * (1 if bits in (2, 4, 8) else 4)
