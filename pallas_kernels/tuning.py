"""Per-device block-size table for the kernels, with heuristics for devices not in the table.

``TABLE[device][kernel]`` is a list of ``(max_m, BlockConfig)`` rows, first row with ``M <= max_m`` wins.
Rows come from ``benchmarks/gpu_suite.py --tune`` on that device (it prints rows to paste here); devices
and kernels without rows use :func:`heuristic`, sized for ~132 streaming multiprocessors.

``LIMITS[device][kernel]`` gives ``max_m``: above it ``jaxquant.qdot`` takes the XLA path (dequantize once, then
cuBLAS), where measurements showed (or bracket) that to be faster; ``ESTIMATED_LIMITS[kernel]`` does the same where
the device has no entry (the H200's limits, and static estimates for the dense chunk dot).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import jax

from pallas_kernels._common import BlockConfig, cdiv

__all__ = [
    "DEQUANT_DOT",
    "ESTIMATED_LIMITS",
    "LIMITS",
    "STORAGE_KEYS",
    "TABLE",
    "as_device",
    "base_kernel",
    "device_key",
    "gemv_config",
    "get_config",
    "heuristic",
    "limit_measured",
    "max_m",
    "use_dequant_dot",
    "use_kernel",
]

#: the dense 3/5/6/7-bit weight-only kernels
_DENSE_KERNELS = ("int3w", "int5w", "int6w", "int7w")

#: storage-specific tuning keys -> the kernel's key. A device's rows and limit under a storage key apply to weights in
#: that storage only; where a device has none, the kernel's own rows, limit, heuristic and DEQUANT_DOT start apply.
#: fp8 W8A8 from ``(N, K)`` codes ("nk", the layout XLA's fp8 GEMM reads without a transpose) measured the opposite
#: way from ``(K, N)`` codes on the H200 (see the limit comment below). K-major 2/4/8-bit integer codes
#: (``IntScheme(layout="nk")``) run the strided and split dots and the gemv: rows they cannot run are skipped
#: (``get_config(accept=)``), their heuristic is the split dot at every ``M``; not yet timed on a GPU, so they take
#: the kernel's limits.
STORAGE_KEYS: dict[str, str] = {"fp8_w8a8_nk": "fp8_w8a8", "int4_nk": "int4", "int8w_nk": "int8w", "int2w_nk": "int2w"}


def base_kernel(kernel: str) -> str:
    """The kernel's own key for a storage-specific key of :data:`STORAGE_KEYS` (e.g. ``"fp8_w8a8_nk"`` ->
    ``"fp8_w8a8"``); any other key unchanged."""
    return STORAGE_KEYS.get(kernel, kernel)


def _entry(per_kernel: dict, kernel: str):
    """``per_kernel[kernel]``, else the entry of its :func:`base_kernel` (``None`` if neither)."""
    if kernel in per_kernel:
        return per_kernel[kernel]
    return per_kernel.get(base_kernel(kernel))


# Measured on an NVIDIA H200 (benchmarks/results/h200.md, 2026-11-27, JAX 0.11.2): the int4 g128 block sweep at
# K=N=4096. M<=16: split_k=4, interleave, 5 stages (14.8 us at M=1, 13.4 us at M=16, vs 23.3 / 21.2 us with the
# heuristic); M<=256: 64x64x64 interleave (52.9 us vs 70.0 us; the XLA path took 64.1 us); M=4096: 128x128x64
# interleave, 8 warps (589 us, still 0.40x of the XLA path: routed to XLA by LIMITS below).
_HOPPER_INT4 = [
    (16, BlockConfig(16, 64, 128, split_k=4, num_warps=4, num_stages=5, variant="interleave")),
    (256, BlockConfig(64, 64, 64, split_k=1, num_warps=4, num_stages=3, variant="interleave")),
    (1 << 62, BlockConfig(128, 128, 64, split_k=1, num_warps=8, num_stages=3, variant="interleave")),
]
# NF4: the ``lut`` variant (a pointer gather per weight from global memory) measured 0.14x of bf16 on the H200;
# the ``select`` bit-tree (15 selects on scalar constants, no memory traffic) is used instead. At M=1 the GEMV and
# the 16-row dot kernel measured alike (H200 8192^2: 103.9 vs 102.8 us, benchmarks/results/h200-quick.md; H100:
# GEMV 95.2 us at M=1, dot 98.2 us at M=16): the GEMV row stays. For M=2..8 the GEMV rows were never measured, and
# their sm_90 K loops need 1.3-2.2x the dot kernel's instructions per weight (static issue floors at 8192^2: 51.6
# us at BM=2, 88.6 us at BM=8, against 40.2 us for the dot at any M <= 16; benchmarks/results/sass-sm90-defaults.md):
# the dot kernel from M=2.
_HOPPER_NF4 = [
    (1, BlockConfig(1, 128, 64, split_k=16, num_warps=4, num_stages=4, variant="select-gemv")),
    (64, BlockConfig(16, 64, 128, split_k=4, num_warps=4, num_stages=4, variant="select")),
]

# GEMV vs the tensor-core kernel at M <= 16, K=N=8192 (benchmarks/results/h200-quick.md, h100.md,
# h100-fp8-recheck.md): the 16x64x128 split-4 dot kernel beat the GEMV variant at every M for int8 W8A16
# (H200 M=1: 49.8 vs 65.0 us), ternary W1.58A16 (39.6 vs 49.7) and fp8 W8A16 (49.9 vs 55.7; H100 M=16 47.9 vs
# M=1 GEMV 57.6, M=5 GEMV 92.9); only fp8 W8A8 at M=1 is faster as a GEMV (H200 46.8 vs 56.5; H100 38.9 us GEMV
# vs 55.0 us dot at M=16), and at M=5 its GEMV is slow (H100 91.5 us).
_HOPPER_DOT16 = BlockConfig(16, 64, 128, split_k=4, num_warps=4, num_stages=4)
_HOPPER_SMALL_M = {
    "int8w": [(16, BlockConfig(16, 64, 128, split_k=4, num_warps=4, num_stages=4, variant="strided"))],
    "ternary": [(16, _HOPPER_DOT16)],
    "ternary_a8": [(16, _HOPPER_DOT16)],
    "fp8_w8a16": [(16, _HOPPER_DOT16)],
    "fp8_w8a8": [
        (1, BlockConfig(1, 128, 32, split_k=16, num_warps=4, num_stages=4, variant="gemv")),
        (16, _HOPPER_DOT16),
    ],
}

# H200, 2026-11-28 (benchmarks/results/h200-2026-11-28.md, kernels of 322c582, JAX 0.11.2), K=N=8192, M=1, timed in
# one run: the W1.58A8 dp4a GEMV (inline PTX; exact, 0.0 relative error vs the XLA path on the device) 22.1 us against
# 38.5 us for the 16-row dot; LLM.int8's one-launch activation split ("prepass", inline PTX; the same 5.9e-4 vs the
# XLA path as the default) 40.2 us against 53.7 us (at M=16 it lost: 96.2 against 57.9 us; measured from (N, K)
# storage: the prepass changes only the activation side, which both storages share); fp8 W8A8 from (N, K) codes with
# the activations quantized by the XLA pre-pass ("prequant", 1.9e-3 vs the XLA path; the in-kernel quantization's
# GEMV 2.6e-2) 29.8 us against 55.1 us for the GEMV and 43.1 us for the XLA path (XLA's fp8 GEMM on the codes as
# stored); the only M where it beat the XLA path (limit below).
_H200_M1 = {
    "ternary_a8": [
        (1, BlockConfig(1, 128, 64, split_k=16, num_warps=4, num_stages=4, variant="dp4a-gemv")),
        (16, _HOPPER_DOT16),
    ],
    "int8_outlier": [(1, BlockConfig(16, 64, 128, split_k=4, num_warps=4, num_stages=4, variant="prepass"))],
    "fp8_w8a8_nk": [(1, BlockConfig(16, 64, 128, split_k=4, num_warps=4, num_stages=4, variant="prequant"))],
}

#: device key -> kernel -> [(max_m, config)]; filled from measurements (other devices: heuristics)
TABLE: dict[str, dict[str, list[tuple[int, BlockConfig]]]] = {
    "h200": {"int4": _HOPPER_INT4, "nf4": _HOPPER_NF4, **_HOPPER_SMALL_M, **_H200_M1},
    # H100: same Hopper SM (132 SMs, same Triton code generation), less memory bandwidth. The 54-config int4
    # sweep at 8192², M=1 on an H100 (benchmarks/results/h100.md) found the H200 row best there too (34.1 us).
    "h100": {"int4": _HOPPER_INT4, "nf4": _HOPPER_NF4, **_HOPPER_SMALL_M},
}

# Largest M for the fused kernel on Hopper, above which ``qdot`` in "auto" mode takes the XLA path. Measured
# (benchmarks/results/h200.md, h100.md, 8192^2 unless said): every kernel beat jaxquant's XLA path at M = 1 and 16
# (weight-only kernels 2.8-6.4x, fp8 W8A8 9.6x, W1.58A8 3.2x, LLM.int8 only 1.1x) and lost at the next measured M
# (4096 / 8192: 0.12-0.65x); int4 also won at M=256 on the H100 (1.29x; 1.25x at 4096^2) and lost there on the H200
# (0.92x). Between the measured points the limit is inferred, not measured. A fused kernel's work per program is
# the dequantization of its weight tile, whatever the tile's rows: the measured times are flat from M=1 to 16 (H100
# int4 34.2 / 35.0 us, int8 W8A16 57.3 / 48.6, ternary 46.0 / 36.6), and the sm_90 K loops of the configs used at
# M = 32 and 64 (one 32- or 64-row tile) have static issue floors within 0.8-1.8x of the M=16 ones
# (benchmarks/results/sass-sm90-m16-64.md), while the XLA path dequantizes every weight on every call (130-530 us
# at 8192^2 for M <= 256; in the H200 decode benchmark the XLA path at batch 32 ran at 0.18-0.39x of bf16
# decode, benchmarks/results/decode-h200.md). So: 64 for the weight-only kernels, fp8 W8A8 and W1.58A8; NF4 32
# (its table keeps 16-row tiles up to 64: 4 tiles at M=64, about 4x its M=16 time, above the XLA path's); int4 on
# the H200 128 (2 of the 4 waves of 64-row tiles it measured at M=256: ~126 us against ~232); LLM.int8 stays at 16
# (its margin at 16 is 1.1x). The first GPU sweep at M = 32..256 should replace the inferred values.
# Measured since on the H200 (2026-11-28, benchmarks/results/h200-2026-11-28.md, 8192^2): int4 beat the XLA path at
# M = 128 (104.6 vs 215.7 us) and 256 (188.5 vs 232.9; 4096^2 too) but the Pallas dequantization + dot beat both at
# 256 (115.4 us; see DEQUANT_DOT), so int4 keeps 128; NF4 won at 32 (176.8 vs 291.6 us); W1.58A8 at 64 (79.8 vs
# 137.3); LLM.int8 ((N, K) storage) at 16 and lost at 4096. fp8 W8A8's limit depends on the storage layout: from
# (N, K) codes the XLA path (no transpose) beat the kernel at M = 1, 16, 64 (43.1 / 32.8 / 35.5 us against 55.1 /
# 40.4 / 53.9), from (K, N) codes the kernel won at 1, 16 and 64 (32.9 / 55.0 / 79.0 against 99.5 / 469.7 / 469.3 us,
# h200-2026-11-28-rest.md): so (N, K) codes have their own key, "fp8_w8a8_nk" (STORAGE_KEYS), with the limit 1 (its
# "prequant" row, 29.8 us, is the only kernel config that beat the XLA path there: 37.5 against 32.8 us at M=16),
# and (K, N) codes keep 64 (the H100 measured (K, N) codes only: both storages keep 64 there). Also measured at M=64
# there, all won: int8 W8A16 (53.1 vs 129.3 us), W1.58A16 (92.8 vs 129.8), fp8 W8A16 (41.7 vs 133.1), int4 asym
# (84.1 vs 216.4); and the dense 3/6-bit chunk dot at M=16 (int3 asym 42.2 vs 371.4, int6 asym 52.4 vs 374.5; M=64 not
# reached).
_HOPPER_LIMITS = {
    "int4": 128,
    "int8w": 64,
    "int2w": 64,
    "nf4": 32,
    "int8_outlier": 16,
    "fp8_w8a16": 64,
    "fp8_w8a8": 64,
    "ternary": 64,
    "ternary_a8": 64,
}

#: device key -> kernel -> largest M for which the fused kernel is used (measured, or inferred between measured
#: points: see the comment above; measured devices only)
LIMITS: dict[str, dict[str, int]] = {
    "h200": {**_HOPPER_LIMITS, "fp8_w8a8_nk": 1},
    "h100": {**_HOPPER_LIMITS, "int4": 256},
}

#: kernel -> largest ``M`` for the fused kernel where the device's :data:`LIMITS` has no entry (every GPU but the
#: H100 / H200, and kernels they never measured). Estimates, not measurements: the H200's limits (the only
#: measurements there are: every fused kernel lost to the XLA path at M = 4096 by 1.5-8.7x on both Hopper GPUs, and a
#: tensor-core GEMM's lead at large M is no smaller on other GPUs), and for the dense 3/5/6/7-bit chunk dot 256 from
#: static floors: sm_90, 3-bit g128 asym, 8192^2, its K loop's issue floor is 13.3 us at M=16 and 15.3 us per
#: 64-row tile (benchmarks/results/sass-chunk-dot.md), about 61 us at M=256, against the XLA path's per-call
#: dequantization (128 MB of bf16 weights written and read again) plus the bf16 GEMM; int4's fused kernel, measured,
#: still won at M=256 on the H100 and lost there on the H200 (0.92x).
ESTIMATED_LIMITS: dict[str, int] = {**_HOPPER_LIMITS, **{k: 256 for k in _DENSE_KERNELS}}

#: device key -> kernel -> smallest ``M`` from which ``qdot``, having left the fused kernel for the XLA path (``M``
#: above :data:`LIMITS`), dequantizes with the Pallas kernel (``jaxquant.ops.qdot_dequant_dot``: the same weights
#: and result) instead of XLA's. Filled from measurements only (``benchmarks/kernels.py`` prints it in the note
#: column of rows with M >= 256). H200, 2026-11-28 (benchmarks/results/h200-2026-11-28.md), bit-identical to the XLA
#: path in every row: int4 g128 at M=256 115.4 us (XLA path 232.9, fused kernel 188.5; 4096^2: 33.6 / 62.6 / 53.6)
#: and M=4096 829.1 us (950.0; 4096^2: 200.1 / 233.1); NF4 at M=4096 917.4 us (989.3; nothing measured between 32
#: and 4096, so from 4096).
DEQUANT_DOT: dict[str, dict[str, int]] = {"h200": {"int4": 256, "nf4": 4096}}

_ALIASES = (("H200", "h200"), ("H100", "h100"), ("H800", "h100"), ("A100", "a100"), ("L40", "l40"), ("L4", "l4"))


_FORCED_DEVICE: str | None = None


@contextlib.contextmanager
def as_device(key: str) -> Iterator[None]:
    """Within the block, :func:`device_key` (and so the tables, limits and :func:`get_config`) answers for the GPU
    ``key`` (e.g. ``"h100"``) instead of the local device: to explain a GPU's dispatch from any machine."""
    global _FORCED_DEVICE
    if not isinstance(key, str) or not key:
        raise ValueError(f"as_device: key must be a non-empty device key such as 'h100', got {key!r}")
    saved, _FORCED_DEVICE = _FORCED_DEVICE, key
    try:
        yield
    finally:
        _FORCED_DEVICE = saved


def device_key(kind: str | None = None) -> str:
    """Short key of a GPU (``"h100"``, ``"h200"``, ``"a100"``, ...) from ``jax.devices()[0].device_kind`` (or the
    key of an enclosing :func:`as_device`)."""
    if kind is None and _FORCED_DEVICE is not None:
        return _FORCED_DEVICE
    if kind is None:
        try:
            kind = jax.devices()[0].device_kind
        except RuntimeError:
            return "unknown"
    for needle, key in _ALIASES:
        if needle.lower() in kind.lower():
            return key
    return kind.lower().replace(" ", "_")


@functools.cache
def _num_sms() -> int:
    try:
        d = jax.devices()[0]
        return int(getattr(d, "core_count", 0) or 132)
    except (RuntimeError, TypeError, ValueError):
        return 132


def heuristic(kernel: str, m: int, k: int, n: int, sms: int | None = None) -> BlockConfig:
    """A reasonable config without measurements.

    Small ``M`` is memory bound: narrow ``N`` tiles and split-K until about two programs per SM stream
    weights. Large ``M`` is compute bound: 128x128 tiles (wgmma on Hopper), 8 warps.

    Kernel names: ``int4``, ``int8w``, ``int2w``, and ``int3w``, ``int5w``, ``int6w``, ``int7w`` (weight-only
    integer; the dense 3/5/6/7-bit widths: the GEMV up to ``M = 8``, then the chunk dot with 512-row K steps),
    ``nf4``, ``int8_outlier``,
    ``fp8_w8a16``, ``fp8_w8a8``, ``ternary`` (weight-only), ``ternary_a8``; a storage key of :data:`STORAGE_KEYS`
    gets its kernel's heuristic (K-major integer codes: the split dot at every ``M``).
    """
    kmajor = kernel in STORAGE_KEYS  # K-major codes (the integer storage keys reach the variant choice below)
    kernel = base_kernel(kernel)
    sms = sms or _num_sms()
    if kernel in _GEMV_HEURISTIC and m <= _GEMV_HEURISTIC[kernel]:
        return gemv_config(kernel, m, k, n, sms)
    if m <= 64:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        bn, bk, warps, stages = 64, 128, 4, 4
    elif m <= 256:
        bm, bn, bk, warps, stages = 64, 128, 64, 4, 3
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    variant = ""
    if kernel in ("int4", "int8w", "int2w"):
        # interleave with 4 warps and wide tiles can abort Triton ("Illegal shared layout"): strided up to 256
        # M <= 16: "split" (one contiguous activation tile split in registers): 416 K-loop instructions per trip
        # for sm_90 vs 464 strided, 654-745 interleave and 688 GEMV (benchmarks/kernel_sass.py); not yet timed
        variant = "split" if m <= 16 or kmajor else ("strided" if m <= 256 else "interleave")
        if kernel == "int2w":
            bk = max(bk, 128)
    elif kernel == "nf4":
        # the 16-row dot kernel at every small M, not the GEMV (gemv_config): sm_90, 8192^2, static issue floor of
        # "select-split" 38.2 us at any M <= 16 against 44.9 / 50.2 / 61.1 / 82.1 us for "select-split-gemv" at
        # M = 1 / 2 / 4 / 8 (12 bytes of spills at M=2; benchmarks/kernel_sass.py --device a100); the H200 measured
        # the non-split pair alike at M=1 (dot 102.8 vs GEMV 103.9 us). "-split": contiguous activation rows (0
        # exposed global loads per K step instead of 16)
        variant = "select-split" if m <= 256 else "select-interleave"  # interleave: 128x128 tiles, 8 warps
    elif kernel == "int8_outlier" and m > 256:
        # the int8 dot from a K-major (N, K) weight copy: sm_90 K loop of 61 instructions per trip with 2 IGMMA, no
        # byte transposes through shared memory (116 with 32 STS from the (K, N) weight; compiled on the CPU). Not
        # 128x256: with the outlier loop's float32 accumulator beside the int32 one it spills (255 registers)
        stages, variant = 4, "kmajor"
    elif kernel == "fp8_w8a8" and m > 256:
        # compute bound: fp8 activations from the XLA pre-pass, K-major weight, fp8 wgmma on sm_90 (K loop of 64
        # instructions per trip, no exposed load, 64 KiB shared memory: compiled on the CPU); not yet timed
        bk, stages, variant = 64, 4, "prequant"
    elif kernel in _DENSE_KERNELS:
        return _dense_dot_config(m, k, n, sms)
    elif kernel in ("ternary", "ternary_a8", "fp8_w8a8", "fp8_w8a16"):
        bk = 128
        if kernel == "ternary_a8" or (kernel == "ternary" and m <= 16):
            # one contiguous activation tile through the software pipeline; the default's four strided activation
            # loads per step are waited for in every trip behind 8 barriers (sm_90 K loop: 0 vs 16 exposed global
            # loads per trip; W1.58A16 324 vs 396 instructions; benchmarks/kernel_sass.py); W1.58A8 at M=4096 with
            # 128x128x128 tiles: 381 vs 478 instructions, 0 vs 64 exposed loads, 64 vs 128 STS per trip; not yet timed
            variant = "split"
    split = _split_k(cdiv(m, bm) * cdiv(n, bn), cdiv(k, bk), 2 * sms, 2)
    return BlockConfig(
        block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=stages, variant=variant
    )


def _dense_dot_config(m: int, k: int, n: int, sms: int) -> BlockConfig:
    """The dense chunk dot's config for ``M > 8``: 512-row K steps (16 chunks: one mma K step per code position),
    4 warps; ``16x64`` tiles with 3 pipeline stages up to ``M = 16``, ``32x64`` with 2 up to 32, then 64 rows:
    ``64x64`` on Hopper (its wgmma reads the weight tiles from shared memory: 145-161 KiB), ``64x128`` on an A100
    (94-126 KiB); GPUs with 99 KiB per block (sm_86 / sm_89) and unknown ones keep ``32x64`` and 2 stages. From a
    CPU sweep of sm_90 and sm_80 machine code at 8192^2, 3- and 7-bit g128 asym (``benchmarks/results/
    sass-chunk-dot.md``): these have no spills and 7.4-9.2 instructions per weight, 2 barriers per K-loop trip up to
    ``BM=32`` (sm_90 ``BM=64``: 65); ``16x128``, ``32x32`` and (4 warps) ``32x128`` spill, 7-bit ``64x128`` spills on
    sm_90, and ``64x64`` costs 25.6 instructions per weight on sm_80. Not yet timed."""
    dev = device_key()
    large_shared = dev in ("h100", "h200", "a100")  # 227 / 163 KiB of shared memory per block, others 99
    if m <= 16:
        bm, bn, stages = 16, 64, (3 if large_shared else 2)
    elif m <= 32 or not large_shared:
        bm, bn, stages = 32, 64, 2
    else:
        bm, bn, stages = 64, (128 if dev == "a100" else 64), 2
    split = _split_k(cdiv(m, bm) * cdiv(n, bn), cdiv(k, 512), 2 * sms, 2)
    return BlockConfig(bm, bn, 512, split_k=split, num_warps=4, num_stages=stages)


def _split_k(tiles: int, nsteps: int, programs: int, min_steps: int) -> int:
    """Split-K ways: doubled (up to 16) while the ``tiles`` output tiles times it stay below ``programs`` and every
    split keeps at least ``min_steps`` of the ``nsteps`` K steps."""
    split = 1
    while tiles * split < programs and split * 2 <= min(16, nsteps // min_steps):
        split *= 2
    return split


#: kernels whose heuristic takes the GEMV up to this ``M``: only where a GPU measured it faster than the 16-row
#: tensor-core kernel (fp8 W8A8 at M=1, H200 and H100); the dot kernel won for int8 W8A16, ternary and fp8
#: W8A16 at every M <= 16, and the int4 dot kernel's sm_90 K loop needs fewer instructions than its GEMV (416
#: "split" vs 688 per 8192 weights, benchmarks/kernel_sass.py). Dense 3/5/6/7-bit weights: the GEMV up to M=8
#: (their only kernel there), the chunk dot above.
_GEMV_HEURISTIC = {"fp8_w8a8": 1, "int3w": 8, "int5w": 8, "int6w": 8, "int7w": 8}

#: kernels with a ``variant="gemv"`` path, and their K rows per packed unit (a byte; 32 per ``bits``-word dense chunk)
_GEMV_K_PER_UNIT = {
    "int4": 2,
    "int8w": 1,
    "int3w": 32,
    "int5w": 32,
    "int6w": 32,
    "int7w": 32,
    "int2w": 4,
    "fp8_w8a16": 1,
    "fp8_w8a8": 1,
    "ternary": 4,
    "ternary_a8": 4,
}


def gemv_config(kernel: str, m: int, k: int, n: int, sms: int | None = None, variant: str | None = None) -> BlockConfig:
    """The config of a GEMV ``variant`` (default ``"gemv"``; ``"split-gemv"`` for dense widths, ``"select-split-gemv"``
    for ``nf4``) for ``M <= 8`` (memory bound) of ``nf4`` and the kernels in ``_GEMV_K_PER_UNIT``.

    ``BN=128`` columns per program, ``BM`` = ``M`` rounded up to a power of two, a K step of about ``32 / BM``
    packed rows (at least 8; 8 warps and twice that from ``BM=4``), so the per-row float32 accumulators stay near 32
    registers per thread (100-134 registers in all for sm_90, no spills, compiled on the CPU), and split-K until
    about four programs per SM. Dense 3/5/6/7-bit weights: a 128-row step (four chunks, 32 code tiles; 48 registers
    at ``BM=1`` for 3 bits), 4 warps and ``BN = 256 / BM`` from ``BM=4``. The ternary ``dp4a`` GEMV (int32
    accumulators, a fourth of the registers): 16 packed rows per step and 4 warps at every ``BM`` (sm_90, 8192², per
    weight: 2.02 instructions at ``M=1``, 2.30 at 2, 2.81 at 4, against 2.8-16 for other steps and warp counts).
    ``"+xq"`` variants are one launch: no split-K; the column tile halves down to 16 wide until there is a program
    per SM, and the K step grows as it narrows (8192 weights per trip at 32 wide: ``dp4a-gemv+xq`` 2.66 instructions
    per weight against 3.11 with half the step). Static counts (``benchmarks/kernel_sass.py``); not yet measured on
    a GPU.
    """
    kernel = base_kernel(kernel)
    sms = sms or _num_sms()
    bm = 1
    while bm < m:
        bm *= 2
    if kernel == "nf4":  # one (BN, B/2) accumulator per row, one 64-value block per K step
        bn, warps = (128, 4) if bm <= 2 else (64, 8)
        # "-split": contiguous activation rows (sm_90 K loop: 11 exposed global loads per step instead of 67)
        split = _split_k(cdiv(m, bm) * cdiv(n, bn), cdiv(k, 64), 2 * sms, 2)
        return BlockConfig(bm, bn, 64, split, num_warps=warps, num_stages=4, variant=variant or "select-split-gemv")
    per = _GEMV_K_PER_UNIT[kernel]
    # dense widths: each row's activations as one contiguous tile split in registers (sm_90, 3 bits, M=1: 5 exposed
    # global loads per K-loop trip instead of 36, 1053 instructions instead of 1104; benchmarks/kernel_sass.py)
    variant = variant or ("split-gemv" if per == 32 else "gemv")
    bn = 128
    warps = 4 if bm <= 2 or variant.startswith("dp4a") else 8
    if per == 32 and bm >= 4:
        # dense widths: 8 warps moved each row's activation columns through shared memory and spilled at BM=8
        # (sm_90, 3-bit g128 asym, 8192^2: 32 / 64 barriers per trip at BM=4 / 8, 240 bytes of spills at 8); 4 warps
        # with a 64 / 32-column tile: 4 / 8 barriers, no spills, 6% fewer instructions per weight
        warps, bn = 4, 256 // bm
    # 2-bit weights unpack four tiles per step: half the packed rows keeps registers in line (209 -> 89 at BM=1)
    pk = max(8, (32 if warps == 4 else 64) // bm // (2 if per == 4 else 1)) if per < 32 else 4
    if variant.startswith("dp4a"):
        pk = 16
    bk = pk * per
    one_launch = variant.endswith("+xq")
    if one_launch:
        while cdiv(m, bm) * cdiv(n, bn) < sms and bn > 16:
            bn //= 2
        bk = bk * 256 // bn
    split = 1 if one_launch else _split_k(cdiv(m, bm) * cdiv(n, bn), cdiv(k, bk), 4 * sms, 4)
    return BlockConfig(
        block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=4, variant=variant
    )


def get_config(
    kernel: str, m: int, k: int, n: int, device: str | None = None, accept: Callable[[BlockConfig], bool] | None = None
) -> BlockConfig:
    """The tuned config for ``kernel`` at this shape on ``device`` (default: the current device): the first table row
    with ``M <= max_m`` that ``accept`` (if given) takes, else :func:`heuristic`. ``accept`` lets a caller skip rows
    measured for another storage of the same kernel (the W1.58A8 dp4a GEMV reads only codes packed along K). For a
    storage key of :data:`STORAGE_KEYS` its own rows come first, then its kernel's."""
    dev = device or device_key()
    per_kernel = TABLE.get(dev, {})
    rows = per_kernel.get(kernel, []) + (per_kernel.get(base_kernel(kernel), []) if kernel in STORAGE_KEYS else [])
    for max_rows, cfg in rows:
        if m <= max_rows and (accept is None or accept(cfg)):
            return cfg
    return heuristic(kernel, m, k, n)


def max_m(kernel: str, device: str | None = None) -> int | None:
    """Largest ``M`` for which dispatch should use the kernel (``None``: no limit): the device's :data:`LIMITS`
    (measured, or inferred between measured points), else the kernel's :data:`ESTIMATED_LIMITS`. A storage key of
    :data:`STORAGE_KEYS` takes its own entry where there is one, else its kernel's."""
    dev = device or device_key()
    limit = _entry(LIMITS.get(dev, {}), kernel)
    return limit if limit is not None else _entry(ESTIMATED_LIMITS, kernel)


def limit_measured(kernel: str, device: str | None = None) -> bool:
    """Whether :func:`max_m` for ``kernel`` on ``device`` comes from the device's :data:`LIMITS` (its measurements,
    or inferences between measured points), not from :data:`ESTIMATED_LIMITS`."""
    return _entry(LIMITS.get(device or device_key(), {}), kernel) is not None


def use_kernel(kernel: str, m: int, device: str | None = None) -> bool:
    """Whether ``qdot`` in "auto" mode should run ``kernel`` for ``M`` rows on ``device`` (else the XLA path).

    ``False`` above the device's :data:`LIMITS` (where its measurements showed, or bracket, the XLA path faster) or,
    without an entry there, above the kernel's :data:`ESTIMATED_LIMITS`; kernels in neither always run.
    """
    limit = max_m(kernel, device)
    return limit is None or m <= limit


def use_dequant_dot(kernel: str, m: int, device: str | None = None) -> bool:
    """Whether ``qdot`` in "auto" mode should dequantize with the Pallas kernel for ``M`` rows of ``kernel``'s
    weights on ``device`` (only where :data:`DEQUANT_DOT` records a measurement and the fused kernel is not used; a
    storage key of :data:`STORAGE_KEYS` takes its kernel's start: K-major int4 codes run the same dequantization
    kernel, each tile transposed in it, not timed on a GPU)."""
    dev = device or device_key()
    start = _entry(DEQUANT_DOT.get(dev, {}), kernel)
    return start is not None and m >= start and not use_kernel(kernel, m, dev)
