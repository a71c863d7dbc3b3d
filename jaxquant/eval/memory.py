"""Memory accounting: process memory (peak and current) and the storage size of parameter pytrees."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import jax
import numpy as np

from jaxquant.core.qarray import QArray

__all__ = [
    "TreeSize",
    "current_rss_bytes",
    "device_memory_stats",
    "format_bytes",
    "peak_rss_bytes",
    "tree_nbytes",
    "tree_size",
]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (``getrusage`` ``ru_maxrss``).

    Linux reports ``ru_maxrss`` in KiB, macOS in bytes; both are converted to bytes. The peak never decreases.
    """
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def current_rss_bytes() -> int | None:
    """Current resident set size in bytes (from ``/proc/self/statm``), or ``None`` where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def device_memory_stats(device: jax.Device | None = None) -> dict[str, int] | None:
    """The accelerator allocator's statistics (``bytes_in_use``, ``peak_bytes_in_use`` …), or ``None``.

    CPU devices usually report nothing; GPUs report their allocator counters.
    """
    dev = device if device is not None else jax.devices()[0]
    try:
        stats = dev.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    return dict(stats) if stats else None


def _is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


def _leaf_nbytes(leaf: Any) -> int:
    if isinstance(leaf, QArray):
        return int(leaf.nbytes)
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        return 0  # None, Python scalars, strings …: not parameter storage
    return math.prod(shape) * np.dtype(dtype).itemsize


def tree_nbytes(tree: Any) -> int:
    """Storage bytes of a parameter pytree.

    Array leaves (jax, numpy, ``ShapeDtypeStruct``) count ``size * itemsize``; :class:`~jaxquant.QArray`
    leaves count their real storage, ``QArray.nbytes`` (packed data + scales + zeros + side arrays). Leaves
    without a shape and dtype (``None``, Python numbers) count zero.
    """
    return sum(_leaf_nbytes(leaf) for leaf in jax.tree.leaves(tree, is_leaf=_is_qarray))


@dataclasses.dataclass(frozen=True)
class TreeSize:
    """Size breakdown of a parameter pytree (see :func:`tree_size`).

    Attributes:
      nbytes: total storage bytes.
      quantized_bytes: bytes held by QArray leaves.
      other_bytes: bytes held by plain array leaves.
      n_params: logical number of parameters (QArray: elements of its logical shape).
      n_quantized_params: logical parameters stored in QArrays.
    """

    nbytes: int
    quantized_bytes: int
    other_bytes: int
    n_params: int
    n_quantized_params: int

    @property
    def bits_per_param(self) -> float:
        """Average storage bits per logical parameter, over the whole tree."""
        return 8.0 * self.nbytes / max(self.n_params, 1)

    @property
    def quantized_bits_per_param(self) -> float:
        """Average storage bits per logical parameter of the QArray leaves only (``nan`` if none)."""
        if not self.n_quantized_params:
            return float("nan")
        return 8.0 * self.quantized_bytes / self.n_quantized_params


def tree_size(tree: Any) -> TreeSize:
    """Bytes and logical parameter counts of a pytree, split into QArray and plain-array leaves."""
    qb = ob = n = nq = 0
    for leaf in jax.tree.leaves(tree, is_leaf=_is_qarray):
        if isinstance(leaf, QArray):
            qb += int(leaf.nbytes)
            n += leaf.size
            nq += leaf.size
        elif getattr(leaf, "shape", None) is not None and getattr(leaf, "dtype", None) is not None:
            ob += _leaf_nbytes(leaf)
            n += math.prod(leaf.shape)
    return TreeSize(nbytes=qb + ob, quantized_bytes=qb, other_bytes=ob, n_params=n, n_quantized_params=nq)


def format_bytes(n: float) -> str:
    """Human-readable size with binary units, e.g. ``format_bytes(3 * 2**20) == "3.00 MiB"``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
