"""LSQ: learned step size quantization (Esser et al. 2020) for symmetric :class:`~jaxquant.IntScheme` layouts.

The step ``s`` has the scheme's scale layout (``()`` per tensor, ``(N,)`` per channel, ``(G, N)`` per group)
and is a trainable parameter next to the float weight. With ``v = w / s`` (per element, its group's step)::

    forward     w_hat = clip(round(v), -qmax, qmax) * s_st        (s_st = s rounded to the scheme's scale_dtype)
    d w_hat/dw  = 1 inside (-qmax <= v <= qmax), 0 outside
    d w_hat/ds  = (round(v) - v) inside, -qmax / qmax below / above,  times g = 1 / sqrt(n_s * qmax)

summed over the ``n_s`` elements sharing the step (``g`` is LSQ's gradient scale). The forward uses the step as
it will be stored, so :func:`lsq_quantize` (the export) reproduces it bit for bit. :func:`init_steps` starts
every step at the RTN scale of the initial weight (LSQ starts exactly at round-to-nearest).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core import packing
from jaxquant.core.api import quantize
from jaxquant.core.formats import int_range
from jaxquant.core.layout import codes_kn
from jaxquant.core.numerics import true_divide
from jaxquant.core.qarray import QArray, Scheme
from jaxquant.schemes import IntScheme
from jaxquant.schemes._grouping import num_groups
from jaxquant.transform import Rules, _compile_rules, path_str

__all__ = ["init_steps", "lsq_fake_quant", "lsq_quantize"]

_MIN_STEP = 1e-6


def _check(w: jax.Array, step: jax.Array, scheme: Scheme) -> None:
    if not (isinstance(scheme, IntScheme) and scheme.symmetric):
        raise ValueError(f"LSQ supports symmetric IntScheme only, got {getattr(scheme, 'describe', lambda: scheme)()}")
    scheme._check_shape(tuple(w.shape))
    k, n = _kn(w.shape, scheme)
    want = {"tensor": (), "channel": (n,), "group": (num_groups(k, scheme.group_size or 1), n)}[scheme.granularity]
    if tuple(jnp.shape(step)) != want:
        got = tuple(jnp.shape(step))
        raise ValueError(f"LSQ step for {scheme.describe()} on shape {tuple(w.shape)} must be {want}, got {got}")


def _kn(shape: tuple[int, ...], scheme: IntScheme) -> tuple[int, int]:
    if scheme.granularity == "tensor" and len(shape) != 2:
        return math.prod(shape), 1
    return shape[0], shape[1]


def _rows(x: jax.Array, scheme: IntScheme, k: int, n: int) -> jax.Array:
    return scheme._load_stats(x, k, n)


def _stored_step(step: jax.Array, scheme: IntScheme) -> jax.Array:
    s = jnp.maximum(jnp.abs(step.astype(jnp.float32)), _MIN_STEP)
    return s.astype(jnp.dtype(scheme.scale_dtype))


def _codes(w: jax.Array, step: jax.Array, scheme: IntScheme) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(codes (K, N) float32, v = w / s (K, N), s_rows (K, N))`` with the stored step."""
    k, n = _kn(w.shape, scheme)
    w2 = w.astype(jnp.float32).reshape(k, n)
    s_rows = _rows(_stored_step(step, scheme).astype(jnp.float32), scheme, k, n)
    _, qmax = int_range(scheme.bits, True)
    v = true_divide(w2, s_rows)
    return jnp.clip(jnp.round(v), -qmax, qmax), v, s_rows


def _reduce_to_step(d: jax.Array, scheme: IntScheme, k: int) -> jax.Array:
    if scheme.granularity == "tensor":
        return jnp.sum(d)
    if scheme.granularity == "channel":
        return jnp.sum(d, axis=0)
    g = scheme.group_size
    return jax.ops.segment_sum(d, jnp.arange(k) // g, num_segments=num_groups(k, g))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lsq(w: jax.Array, step: jax.Array, scheme: IntScheme) -> jax.Array:
    codes, _, s_rows = _codes(w, step, scheme)
    return (codes * s_rows).reshape(w.shape).astype(w.dtype)


def _lsq_fwd(w, step, scheme):
    codes, v, s_rows = _codes(w, step, scheme)
    return (codes * s_rows).reshape(w.shape).astype(w.dtype), (codes, v, jnp.asarray(step))


def _lsq_bwd(scheme, res, g):
    codes, v, step = res
    k, n = codes.shape
    _, qmax = int_range(scheme.bits, True)
    g2 = g.astype(jnp.float32).reshape(k, n)
    inside = (v >= -qmax) & (v <= qmax)
    dw = jnp.where(inside, g2, 0.0).reshape(g.shape).astype(g.dtype)
    per = {"tensor": k * n, "channel": k, "group": scheme.group_size}[scheme.granularity]
    gscale = 1.0 / math.sqrt(per * qmax)
    ds_el = g2 * jnp.where(inside, codes - v, jnp.where(v < 0, -float(qmax), float(qmax)))
    ds = _reduce_to_step(ds_el, scheme, k) * gscale
    return dw, ds.reshape(step.shape).astype(step.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_fake_quant(w: jax.Array, step: jax.Array, scheme: Scheme) -> jax.Array:
    """LSQ fake quantization of ``w`` with the learnable ``step`` (see the module docstring).

    Raises:
      ValueError: not a symmetric IntScheme, or ``step`` has the wrong shape for the scheme's layout.
    """
    w = jnp.asarray(w)
    step = jnp.asarray(step)
    _check(w, step, scheme)
    return _lsq(w, step, scheme)


def lsq_quantize(w: jax.Array, step: jax.Array, scheme: Scheme) -> QArray:
    """The packed QArray of ``w`` with a learned ``step``: ``dequantize`` of it equals :func:`lsq_fake_quant`."""
    w = jnp.asarray(w)
    step = jnp.asarray(step)
    _check(w, step, scheme)
    return _lsq_quantize_compiled(w, step, scheme)


@functools.partial(jax.jit, static_argnums=2)
def _lsq_quantize_compiled(w: jax.Array, step: jax.Array, scheme: IntScheme) -> QArray:
    codes, _, _ = _codes(w, step, scheme)
    _, qmax = int_range(scheme.bits, True)
    if scheme.bits == 8:
        data = codes.astype(jnp.int8)
    else:
        data = packing.pack((codes + (qmax + 1)).astype(jnp.uint8), scheme.bits)
    return QArray(
        data=codes_kn(data, scheme.layout),  # (N, packed rows) for a K-major scheme
        scale=_stored_step(step, scheme),
        scheme=scheme,
        shape=tuple(w.shape),
        dtype=jnp.dtype(w.dtype).name,
    )


def init_steps(params: Any, rules: Rules) -> dict[str, jax.Array]:
    """``{path: step}`` for every leaf a rule maps to a symmetric IntScheme, each step the RTN scale of the
    current weight (float32). Other schemes get no step (they train with the plain STE)."""
    compiled = _compile_rules(rules)
    out: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))[0]:
        if isinstance(leaf, QArray) or not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
            continue
        p = path_str(path)
        for rx, scheme, _ in compiled:
            if rx.fullmatch(p):
                if isinstance(scheme, IntScheme) and scheme.symmetric:
                    out[p] = jnp.asarray(quantize(leaf, scheme).scale, jnp.float32)
                break
    return out


def steps_nbytes(steps: Mapping[str, jax.Array]) -> int:
    """Bytes of a steps dict (for reports)."""
    return int(sum(np.asarray(v).nbytes for v in steps.values()))
