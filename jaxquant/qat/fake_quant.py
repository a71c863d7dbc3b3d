"""Fake quantization with a straight-through estimator, for any scheme, by path rules over a pytree.

Forward: ``fake_quant(w, scheme) = dequantize(quantize(w, scheme))``, computed by the scheme's own
``_quantize``/``_dequantize`` (so it is bit-identical to :func:`jaxquant.dequantize` of
:func:`jaxquant.quantize`, and an :func:`export_params` of the trained weights is exactly what training saw).

Backward (``jax.custom_vjp``), ``ste="clip"`` (default): the identity inside the clip range, zero outside,
where "inside" means the quantizer's clip is inactive: the nearest code is within the code range (per element,
with its own group's stored scale). Outside, the weight is saturated and moving it does not change the output.

* int: ``qmin <= round(w / s) (+ z) <= qmax`` (min/max grid: ``0 <= floor((w - m) / d + 1/2) <= 2^b - 1``);
  with absmax scales every weight is inside, with asymmetric grids the fp16-rounded zero point can push an
  extreme weight out;
* ternary: ``|round(w / s)| <= 1``, i.e. ``|w| < 1.5 s`` with ``s`` the absmean (about 1 weight in 5 of a
  Gaussian matrix is clipped);
* NF4, fp8, LLM.int8, casts: scales are absmax-based, every weight is inside, so the gradient is the identity.

``ste="identity"`` passes the gradient through unchanged everywhere (BitNet's ``w + stop_gradient(q(w) - w)``).
The scale's own dependence on ``w`` (absmax, absmean) is not differentiated (standard STE); learnable scales
are :mod:`jaxquant.qat.lsq`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.core.api import quantize
from jaxquant.core.formats import int_range
from jaxquant.core.numerics import true_divide
from jaxquant.core.qarray import QArray, Scheme
from jaxquant.schemes import IntScheme, TernaryScheme
from jaxquant.transform import Rules, _compile_rules, path_str

__all__ = ["STE_MODES", "clip_mask", "export_params", "fake_quant", "fake_quantize_params", "freeze"]

STE_MODES = ("clip", "identity")


def clip_mask(w: jax.Array, q: QArray) -> jax.Array:
    """Boolean ``w.shape`` mask: True where the quantizer's clip is inactive for ``w`` (the code that
    round-to-nearest picks is inside the code range), i.e. where the straight-through gradient is kept; see
    the module docstring."""
    s = q.scheme
    if isinstance(s, IntScheme):
        w2 = s._to_2d(w.astype(jnp.float32))
        k, n = w2.shape
        sc = s._load_stats(q.scale.astype(jnp.float32), k, n)
        qmin, qmax = int_range(s.bits, s.symmetric)
        if s.symmetric:
            c = jnp.round(true_divide(w2, sc))
        elif s.range == "zeropoint":
            c = jnp.round(true_divide(w2, sc)) + s._load_stats(q.zero.astype(jnp.float32), k, n)
        else:
            m = s._load_stats(q.zero.astype(jnp.float32), k, n)
            c = jnp.floor(true_divide(w2 - m, sc) + 0.5)
        return ((c >= qmin) & (c <= qmax)).reshape(w.shape)
    if isinstance(s, TernaryScheme):
        c = jnp.round(true_divide(w.astype(jnp.float32), q.scale))
        return jnp.abs(c) <= 1
    return jnp.ones(w.shape, bool)


def _check_ste(ste: str) -> None:
    if ste not in STE_MODES:
        raise ValueError(f"ste must be one of {STE_MODES}, got {ste!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _fake_quant(w: jax.Array, scheme: Scheme, ste: str) -> jax.Array:
    return scheme._dequantize(scheme._quantize(w))


def _fq_fwd(w, scheme, ste):
    q = scheme._quantize(w)
    mask = clip_mask(w, q) if ste == "clip" else None
    return scheme._dequantize(q), mask


def _fq_bwd(scheme, ste, mask, g):
    if mask is None:
        return (g,)
    return (jnp.where(mask, g, jnp.zeros_like(g)),)


_fake_quant.defvjp(_fq_fwd, _fq_bwd)


def fake_quant(w: jax.Array, scheme: Scheme, *, ste: str = "clip") -> jax.Array:
    """``dequantize(quantize(w, scheme))`` with a straight-through gradient (see the module docstring).

    Works under ``jit``/``vmap``/``grad``; the shape checks run at trace time, the NaN check of
    :func:`jaxquant.quantize` does not (NaN propagates, as in training it should be visible in the loss).

    Raises:
      TypeError: ``scheme`` is not a Scheme or ``w`` is not floating.
      ValueError: the scheme cannot quantize ``w``'s shape; unknown ``ste``.
    """
    if not isinstance(scheme, Scheme):
        raise TypeError(f"scheme must be a jaxquant Scheme instance, got {type(scheme).__name__}")
    _check_ste(ste)
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"fake_quant: w must be a floating array, got {w.dtype}")
    scheme._check_shape(tuple(w.shape))
    return _fake_quant(w, scheme, ste)


def _match(compiled, p: str) -> tuple[int, Scheme | None] | None:
    for i, (rx, scheme, _) in enumerate(compiled):
        if rx.fullmatch(p):
            return i, scheme
    return None


def _is_float_leaf(leaf: Any) -> bool:
    return not isinstance(leaf, QArray) and hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def fake_quantize_params(
    params: Any,
    rules: Rules,
    *,
    steps: Mapping[str, jax.Array] | None = None,
    ste: str = "clip",
    warn_unused: bool = True,
) -> Any:
    """Fake-quantize the leaves of a pytree by the same path rules as :func:`jaxquant.quantize_params`.

    Call it inside the loss: ``loss(fake_quantize_params(params, rules), batch)``; the gradient reaches the
    float (latent) ``params`` through the straight-through estimator, so one call turns a float training step
    into QAT. Leaves with an entry in ``steps`` (path -> learnable step, from
    :func:`jaxquant.qat.init_steps`) use LSQ (:func:`jaxquant.qat.lsq_fake_quant`) instead.

    Args:
      params: any pytree of arrays (plain dicts, ``nnx.State``...).
      rules: ``[(path_regex, scheme_or_None), ...]``; the first rule fully matching a floating leaf's path wins.
      steps: optional LSQ steps by path.
      ste: ``"clip"`` or ``"identity"`` (see the module docstring).
      warn_unused: warn (once per trace) about rules that matched no leaf.
    """
    from jaxquant.qat.lsq import lsq_fake_quant

    _check_ste(ste)
    compiled = _compile_rules(rules)
    used = [False] * len(compiled)
    steps = dict(steps or {})

    def visit(path, leaf):
        if not _is_float_leaf(leaf):
            return leaf
        p = path_str(path)
        m = _match(compiled, p)
        if m is None:
            return leaf
        i, scheme = m
        used[i] = True
        if scheme is None:
            return leaf
        try:
            if p in steps:
                return lsq_fake_quant(leaf, steps[p], scheme)
            return fake_quant(leaf, scheme, ste=ste)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{p}: {e}") from None

    out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=lambda x: isinstance(x, QArray))
    unused = [pat for (_, _, pat), u in zip(compiled, used) if not u]
    if unused and warn_unused:
        warnings.warn(f"fake_quantize_params: rule(s) matched no floating leaf: {unused}", UserWarning, stacklevel=2)
    return out


def export_params(params: Any, rules: Rules, *, steps: Mapping[str, jax.Array] | None = None) -> Any:
    """Freeze QAT weights into real packed QArrays: the same rules (and LSQ steps) as training.

    Without ``steps`` this is :func:`jaxquant.quantize_params`; ``dequantize`` of every exported leaf equals what
    :func:`fake_quantize_params` computed in the forward pass, bit for bit. Leaves with a learned step are
    quantized with that step (:func:`jaxquant.qat.lsq_quantize`).
    """
    from jaxquant.qat.lsq import lsq_quantize

    compiled = _compile_rules(rules)
    steps = dict(steps or {})

    def visit(path, leaf):
        if not _is_float_leaf(leaf):
            return leaf
        p = path_str(path)
        m = _match(compiled, p)
        if m is None or m[1] is None:
            return leaf
        try:
            if p in steps:
                return lsq_quantize(leaf, steps[p], m[1])
            return quantize(leaf, m[1])
        except (ValueError, TypeError) as e:
            raise type(e)(f"{p}: {e}") from None

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=lambda x: isinstance(x, QArray))


freeze = export_params
