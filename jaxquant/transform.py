"""Pytree-level quantization: path rules -> schemes, and a size report.

Paths are the pytree key paths joined with ``/``: dict keys and attribute names as they are, sequence
indices as numbers, e.g. ``layers/3/attn/q_proj/kernel`` (Flax NNX state adds a trailing ``value`` on some
versions; write rules with ``.*`` where that matters).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core.api import quantize
from jaxquant.core.qarray import QArray, Scheme

__all__ = ["Report", "ReportRow", "path_str", "quantize_params", "report"]

Rules = Sequence[tuple[str, Scheme | None]]


def _key_str(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path: tuple[Any, ...]) -> str:
    """Join a ``jax.tree_util`` key path into ``a/b/0/c``."""
    return "/".join(_key_str(k) for k in path)


def _is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


def _compile_rules(rules: Rules) -> list[tuple[re.Pattern, Scheme | None, str]]:
    if isinstance(rules, str | bytes) or not isinstance(rules, Sequence):
        raise TypeError("rules must be a list of (path_regex, scheme_or_None) pairs")
    out = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2):
            raise TypeError(f"rules[{i}] must be a (path_regex, scheme_or_None) pair, got {rule!r}")
        pattern, scheme = rule
        if scheme is not None and not isinstance(scheme, Scheme):
            raise TypeError(f"rules[{i}]: scheme must be a jaxquant Scheme or None, got {type(scheme).__name__}")
        try:
            rx = re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"rules[{i}]: invalid regex {pattern!r}: {e}") from None
        out.append((rx, scheme, pattern))
    return out


def quantize_params(params: Any, rules: Rules, *, strict: bool = False, allow_nonfinite: bool = False) -> Any:
    """Quantize the leaves of any pytree of arrays by path rules.

    Args:
      params: a pytree (plain dicts, Flax Linen param dicts, Flax NNX state, ...). Leaves that are already
        QArrays are left alone.
      rules: ordered ``[(path_regex, scheme_or_None), ...]``; for each floating array leaf the first rule whose
        regex **fully** matches the leaf's path wins; ``None`` keeps the leaf as it is. Leaves matching no rule
        are kept.
      strict: raise ``ValueError`` (instead of a ``UserWarning``) when a rule matched no leaf.
      allow_nonfinite: passed to :func:`jaxquant.quantize`.

    Returns:
      A pytree of the same structure with QArrays in place of the quantized leaves.

    Raises:
      ValueError: a scheme cannot quantize a matched leaf (message names the path), or ``strict`` and some rule
        matched nothing.
    """
    compiled = _compile_rules(rules)
    used = [False] * len(compiled)

    def visit(path, leaf):
        if _is_qarray(leaf) or not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        p = path_str(path)
        for i, (rx, scheme, _) in enumerate(compiled):
            if rx.fullmatch(p):
                used[i] = True
                if scheme is None:
                    return leaf
                try:
                    return quantize(leaf, scheme, allow_nonfinite=allow_nonfinite)
                except (ValueError, TypeError) as e:
                    raise type(e)(f"{p}: {e}") from None
        return leaf

    out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=_is_qarray)
    unused = [pat for (_, _, pat), u in zip(compiled, used) if not u]
    if unused:
        msg = f"quantize_params: rule(s) matched no floating leaf: {unused}"
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    return out


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """One tensor of a :class:`Report`."""

    path: str
    scheme: str
    shape: tuple[int, ...]
    nbytes: int
    bits_per_weight: float
    quantized: bool


@dataclasses.dataclass(frozen=True)
class Report:
    """Per-tensor storage table with totals; ``str(report)`` renders it."""

    rows: tuple[ReportRow, ...]

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows)

    @property
    def quantized_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows if r.quantized)

    @property
    def quantized_weights(self) -> int:
        return sum(math.prod(r.shape) for r in self.rows if r.quantized)

    @property
    def bits_per_weight(self) -> float:
        """Average storage bits per weight over the quantized tensors only (nan if none)."""
        n = self.quantized_weights
        return 8.0 * self.quantized_bytes / n if n else float("nan")

    def __str__(self) -> str:
        head = f"{'path':<48} {'scheme':<26} {'shape':<16} {'bytes':>12} {'bpw':>7}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.path[-48:]:<48} {r.scheme[:26]:<26} {r.shape!s:<16} {r.nbytes:>12,} {r.bits_per_weight:>7.3f}"
            )
        lines.append("-" * len(head))
        nq = sum(r.quantized for r in self.rows)
        lines.append(
            f"{len(self.rows)} tensors ({nq} quantized), total {self.total_bytes:,} bytes; "
            f"quantized tensors: {self.quantized_bytes:,} bytes, {self.bits_per_weight:.3f} bits/weight"
        )
        return "\n".join(lines)


def report(params: Any) -> Report:
    """Per-tensor table (path, scheme, shape, bytes, bits/weight) of a pytree with QArray and array leaves."""
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_qarray)[0]:
        p = path_str(path)
        if _is_qarray(leaf):
            rows.append(
                ReportRow(p, leaf.scheme.describe(), tuple(leaf.shape), leaf.nbytes, leaf.bits_per_weight, True)
            )
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            shape = tuple(leaf.shape)
            nb = math.prod(shape) * np.dtype(leaf.dtype).itemsize
            rows.append(ReportRow(p, str(np.dtype(leaf.dtype)), shape, nb, 8.0 * nb / max(math.prod(shape), 1), False))
    return Report(tuple(rows))
