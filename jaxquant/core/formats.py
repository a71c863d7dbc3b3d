"""Numeric formats: integer code ranges, the NF4 code table, fp8 formats.

Pure data and tiny helpers; no quantization logic lives here.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = ["FP8_FORMATS", "NF4_CODE", "NF4_MIDPOINTS", "fp8_dtype", "fp8_max", "int_range"]

# NormalFloat-4 (QLoRA, Dettmers et al. 2023, Appendix E): quantiles of N(0, 1) normalised to [-1, 1],
# with an exact zero; these are the float32 values bitsandbytes uses for its "nf4" type.
NF4_CODE = np.array(
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
# Decision boundaries between neighbouring codes; a value equal to a boundary goes to the lower code.
NF4_MIDPOINTS = ((NF4_CODE[1:] + NF4_CODE[:-1]) / 2).astype(np.float32)

FP8_FORMATS = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}


def fp8_dtype(fmt: str):
    """The JAX dtype for an fp8 format name (``"e4m3"`` = float8_e4m3fn, ``"e5m2"``)."""
    try:
        return FP8_FORMATS[fmt]
    except KeyError:
        raise ValueError(f"fmt must be one of {sorted(FP8_FORMATS)}, got {fmt!r}") from None


def fp8_max(fmt: str) -> float:
    """Largest finite value of an fp8 format: 448 for e4m3(fn), 57344 for e5m2."""
    return float(ml_dtypes.finfo(np.dtype(fp8_dtype(fmt))).max)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Code range ``(qmin, qmax)``.

    Symmetric codes are the *restricted* signed range ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` (int8: -127..127),
    so that ``+-absmax`` both map to a code and zero is exact. Asymmetric codes are unsigned ``[0, 2**b - 1]``.
    """
    if symmetric:
        m = 2 ** (bits - 1) - 1
        return -m, m
    return 0, 2**bits - 1
