"""Shared helpers of the Pallas kernel tests: independent float64 NumPy dequantizers and the CUDA checks.

The NumPy dequantizers below are written from the storage layouts' definitions (not from the kernels' or
schemes' code), so "kernel vs float64 NumPy" checks the layout interpretation as well as the arithmetic.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
import pytest

from pallas_kernels import _triton_tools as tt

# jaxquant's NF4 table is checked against this copy of bitsandbytes' values in the NF4 tests
NF4_VALUES = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)


def rel_err(a, b) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def np_unpack_rows(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Codes packed along axis 0 (``bits`` in 2, 4, 8: code ``i*per + j`` in bits ``j*bits`` of row ``i``; 3, 5, 6,
    7: a dense stream, 32 codes in the little-endian bits of ``bits`` uint32 rows, read here bit by bit)."""
    packed = np.asarray(packed)
    if bits == 8:
        return packed.astype(np.int64)[:k]
    if bits not in (2, 4):
        units, n = packed.shape[0] // bits, packed.shape[1]
        # (units, bits words, N) -> per column the (32 * bits)-bit stream of a chunk, least significant bit first
        w = packed.astype("<u4").reshape(units, bits, n).transpose(0, 2, 1)  # (units, N, bits)
        stream = np.unpackbits(w.copy().view(np.uint8), axis=-1, bitorder="little")  # (units, N, 32 * bits)
        codes = (stream.reshape(units, n, 32, bits) * (1 << np.arange(bits))).sum(-1)  # (units, N, 32)
        return codes.transpose(0, 2, 1).reshape(units * 32, n).astype(np.int64)[:k]
    per = 8 // bits
    out = np.zeros((packed.shape[0] * per, *packed.shape[1:]), np.int64)
    p = packed.astype(np.int64)
    for j in range(per):
        out[j::per] = (p >> (bits * j)) & ((1 << bits) - 1)
    return out[:k]


def np_group_rows(stat: np.ndarray, group: int | None, k: int, n: int) -> np.ndarray:
    """(G, N) per-group, (N,) per-column or () per-tensor statistics expanded to (K, N) rows."""
    stat = np.asarray(stat, np.float64)
    if group is None:
        return np.broadcast_to(stat.reshape(1, -1) if stat.ndim else stat, (k, n)).copy()
    return np.repeat(stat, group, axis=0)[:k]


def round_to(a: np.ndarray, dtype) -> np.ndarray:
    """Round float64 values (exactly representable in float32) to ``dtype`` and back to float64."""
    return np.asarray(a, np.float32).astype(np.dtype(dtype)).astype(np.float64)


def cuda_lowering(fn, *args) -> list[tt.TritonCall]:
    """Lower for CUDA (no GPU needed) and return the Triton kernels; asserts there is at least one."""
    text = tt.export_cuda(fn, *args)
    calls = tt.triton_calls(text)
    assert calls, "no Triton custom call in the CUDA lowering"
    assert tt.TRITON_CUSTOM_CALL in text
    return calls


requires_triton = pytest.mark.skipif(
    not tt.triton_available(), reason="PyPI triton (the dev extra) is not installed: cubin compilation skipped"
)


@functools.cache
def _compile_cached(ir: bytes, arch: int, num_warps: int, num_stages: int) -> tt.CubinReport:
    return tt.compile_cubin(
        tt.ir_text(ir), arch, num_warps, num_stages, timeout=float(os.environ.get("CUBIN_TIMEOUT", 180))
    )


def assert_compiles(calls: list[tt.TritonCall], archs=(90,)) -> list[tt.CubinReport]:
    """Compile every kernel for each architecture with PyPI triton; fail with the compiler's message."""
    reps = []
    for call in calls:
        for arch in archs:
            rep = _compile_cached(call.ir, arch, call.num_warps, call.num_stages)
            assert rep.ok, f"{call.name} failed to compile for sm_{arch}:\n{rep.message}"
            assert rep.cubin_bytes > 0
            reps.append(rep)
    return reps


def shape_struct(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)
