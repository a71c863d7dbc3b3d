"""Per-device block-size table for the kernels, with heuristics for devices not in the table.

``TABLE[device][kernel]`` is a list of ``(max_m, BlockConfig)`` rows, first row with ``M <= max_m`` wins.
Rows come from ``benchmarks/gpu_suite.py --tune`` on that device (it prints rows to paste here); devices
and kernels without rows use :func:`heuristic`, sized for ~132 streaming multiprocessors.

``LIMITS[device][kernel]`` optionally gives ``max_m``: above it ``jaxquant.qdot`` takes the XLA path
(dequantize once, then cuBLAS), when measurements showed that to be faster.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels._common import BlockConfig, cdiv

__all__ = ["LIMITS", "TABLE", "device_key", "get_config", "heuristic", "max_m"]

#: device key -> kernel -> [(max_m, config)]; filled from measurements (none yet: heuristics everywhere)
TABLE: dict[str, dict[str, list[tuple[int, BlockConfig]]]] = {}

#: device key -> kernel -> largest M for which the Pallas kernel beats the XLA path
LIMITS: dict[str, dict[str, int]] = {}

_ALIASES = (("H200", "h200"), ("H100", "h100"), ("H800", "h100"), ("A100", "a100"), ("L40", "l40"), ("L4", "l4"))


def device_key(kind: str | None = None) -> str:
    """Short key of a GPU (``"h100"``, ``"h200"``, ``"a100"``, ...) from ``jax.devices()[0].device_kind``."""
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

    Kernel names: ``int4``, ``int8w``, ``int2w`` (weight-only integer), ``nf4``, ``int8_outlier``,
    ``fp8_w8a16``, ``fp8_w8a8``, ``ternary`` (weight-only), ``ternary_a8``.
    """
    sms = sms or _num_sms()
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
        variant = "strided" if m <= 256 else "interleave"
        if kernel == "int2w":
            bk = max(bk, 128)
    elif kernel == "nf4":
        variant = "lut" if m <= 64 else "lut-interleave"
    elif kernel in ("ternary", "ternary_a8", "fp8_w8a8", "fp8_w8a16"):
        bk = 128
    tiles = cdiv(m, bm) * cdiv(n, bn)
    split = 1
    nsteps = cdiv(k, bk)
    if kernel != "int8_outlier":  # the outlier kernel has no split-K
        while tiles * split < 2 * sms and split * 2 <= min(16, nsteps // 2):
            split *= 2
    return BlockConfig(
        block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=stages, variant=variant
    )


def get_config(kernel: str, m: int, k: int, n: int, device: str | None = None) -> BlockConfig:
    """The tuned config for ``kernel`` at this shape on ``device`` (default: the current device)."""
    dev = device or device_key()
    for max_rows, cfg in TABLE.get(dev, {}).get(kernel, []):
        if m <= max_rows:
            return cfg
    return heuristic(kernel, m, k, n)


def max_m(kernel: str, device: str | None = None) -> int | None:
    """Largest ``M`` for which dispatch should use the kernel (``None``: no limit)."""
    dev = device or device_key()
    return LIMITS.get(dev, {}).get(kernel)
