"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, ICLR 2023) as one jitted pure function.

Problem. For a linear layer ``y = x @ W`` with kernel ``W`` of shape ``(K, N)`` (in_features, out_features,
Flax layout) and calibration inputs ``X`` of shape ``(T, K)``, find codes ``Q`` on an :class:`IntScheme` grid
that minimise the layer's output error on the calibration data::

    L(W_hat) = || X W - X W_hat ||_F^2 = tr(E^T H E),     E = W - W_hat,     H = X^T X   (K x K)

Every output column is an independent least-squares problem sharing ``H``. GPTQ quantizes the K input rows
one at a time (in natural order, or by decreasing ``diag(H)`` with ``act_order``) and after quantizing row
``i`` updates the not-yet-quantized rows ``j > i`` optimally (the Optimal Brain Surgeon step). With
``U`` the upper Cholesky factor of the damped inverse Hessian,

    H_d = H + damp * mean(diag(H)) * I,        U^T U = H_d^{-1}      (U upper triangular),

the step for row ``i`` is::

    q_i   = quant(w_i)                          (round-to-nearest with the group's scale/zero)
    e_i   = (w_i - q_i) / U[i, i]
    w_j  <- w_j - U[i, j] * e_i      for all j > i

"Lazy batch" updates (the paper's section 3.2): inside a block of ``block_size`` rows the rank-1 updates only
touch the block; the rest of ``W`` receives the block's errors at once, ``W[i2:] -= U[i1:i2, i2:]^T E``,
a matrix product. This is the same arithmetic reordered, so the result does not depend on ``block_size``
(up to float rounding).

Groups. Scales and zero points follow :class:`jaxquant.IntScheme` exactly (fp16 scales rounded up,
``uint8`` zero points, the restricted symmetric range), so the result is an ordinary IntScheme ``QArray``:

* ``group_size=None`` (per output channel) and ``static_groups=True``: the parameters of every group are
  taken from the original weights before any update (groups of consecutive input rows, last one shorter).
* dynamic groups (``static_groups=False``): a group's parameters are computed from the *updated* weights when
  its first row is quantized, groups being consecutive rows in quantization order. Without ``act_order`` that
  is the ordinary group layout. With ``act_order`` the groups are made of scattered input rows, recorded as
  ``QArray.aux["g_idx"]`` (``g_idx[k]`` = group of input row ``k``, the GPTQ/AutoGPTQ convention), which
  :meth:`IntScheme._dequantize` honours; inference then gathers scales per row. ``act_order`` with
  ``static_groups=True`` needs no ``g_idx`` (the usual choice for fast kernels).

  The reference implementation reads a group that starts inside a lazy block from the not-yet-block-updated
  matrix, which makes its result depend on ``block_size``; here the block size is rounded to a multiple of
  the group size so that a group always sees fully updated weights (the block_size = 1 semantics).

Dead inputs (``H[k, k] == 0``: the input never fires on the calibration data) get ``H[k, k] = 1`` and
``W[k, :] = 0``, as in the reference. A Hessian that is not positive definite after damping is retried with
``damp`` multiplied by 10 (up to 4 times) inside the compiled program.

Everything runs inside ``jax.jit`` with ``lax.fori_loop`` over blocks and rows (no Python loop at run time),
and works under ``jax.vmap`` (over weights sharing a Hessian, or over (weight, Hessian) pairs). Computation is
float32, or float64 when ``w`` is float64 (with ``jax.enable_x64``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core import packing
from jaxquant.core.formats import int_range
from jaxquant.core.layout import codes_kn
from jaxquant.core.numerics import true_divide
from jaxquant.core.qarray import QArray
from jaxquant.core.validate import check_weight, is_concrete
from jaxquant.schemes._grouping import group_view, num_groups
from jaxquant.schemes.rtn import IntScheme

__all__ = ["GPTQStats", "check_gptq_scheme", "gptq", "gptq_with_stats"]

_SUB = 16  # rows of the innermost rank-1 loop (two-level lazy batching)
_HI = jax.lax.Precision.HIGHEST


class GPTQStats(NamedTuple):
    """Calibration losses of one GPTQ call (scalars; batched under ``vmap``).

    Attributes:
      loss: ``tr(E^T H E)`` with ``E = W - W_hat`` for the GPTQ result (``H`` undamped, as given).
      rtn_loss: the same for round-to-nearest with the same scheme (what GPTQ should beat).
      ref: ``tr(W^T H W)``, the output energy: ``loss / ref`` is the relative output error.
      damp: the damping actually used (larger than requested if the Hessian needed retries).
    """

    loss: jax.Array
    rtn_loss: jax.Array
    ref: jax.Array
    damp: jax.Array


def check_gptq_scheme(scheme: Any) -> IntScheme:
    """Validate that ``scheme`` is an :class:`IntScheme` GPTQ can target and return it.

    Raises:
      TypeError: not an IntScheme.
      ValueError: per-tensor granularity or the ``minmax`` grid (GPTQ targets per-channel or grouped
        scales with an integer zero point, or symmetric scales).
    """
    if not isinstance(scheme, IntScheme):
        raise TypeError(
            f"GPTQ needs an IntScheme (e.g. IntScheme(bits=4, group_size=128, symmetric=False)), "
            f"got {type(scheme).__name__}"
        )
    if scheme.granularity == "tensor":
        raise ValueError("GPTQ needs per-channel or grouped scales; granularity='tensor' is not supported")
    if scheme.range != "zeropoint":
        raise ValueError("GPTQ supports the zero-point grid (range='zeropoint'), not range='minmax'")
    return scheme


# ---------------------------------------------------------------------------------------------------------
# grid helpers (mirror IntScheme._quantize bit for bit in float32)
# ---------------------------------------------------------------------------------------------------------


def _round_up(s: jax.Array, sdt: Any) -> jax.Array:
    """Cast positive scales to ``sdt`` rounding up (as ``round_scale_up``, for float32 or float64 ``s``)."""
    sdt = jnp.dtype(sdt)
    if sdt == s.dtype:
        return s
    st = jax.lax.optimization_barrier(s.astype(sdt))
    low = st.astype(s.dtype) < s
    return jnp.where(low, jnp.nextafter(st, jnp.asarray(np.inf, sdt)), st)


def _params(x: jax.Array, scheme: IntScheme, axis: int) -> tuple[jax.Array, jax.Array]:
    """Stored scale and zero point of the values ``x`` reduced over ``axis``, IntScheme's formulas.

    Returns ``(scale in scheme.scale_dtype, zero in x.dtype)``; ``zero`` is 0 for symmetric schemes.
    """
    dt = x.dtype
    _, qmax = int_range(scheme.bits, scheme.symmetric)
    if scheme.symmetric:
        amax = jnp.max(jnp.abs(x), axis=axis)
        s = jnp.where(amax != 0, true_divide(amax, np.asarray(qmax, dt)), np.asarray(1, dt))
        return _round_up(s, scheme.scale_dtype), jnp.zeros_like(s)
    lo = jnp.minimum(jnp.min(x, axis=axis), 0)
    hi = jnp.maximum(jnp.max(x, axis=axis), 0)
    s = jnp.where(hi != lo, true_divide(hi - lo, np.asarray(qmax, dt)), np.asarray(1, dt))
    s_st = _round_up(s, scheme.scale_dtype)
    z = jnp.clip(jnp.round(true_divide(-lo, s_st.astype(dt))), 0, qmax)
    return s_st, z


def _quant(w: jax.Array, s: jax.Array, z: jax.Array, scheme: IntScheme) -> tuple[jax.Array, jax.Array]:
    """Codes and dequantized values of ``w`` with float scale ``s`` and zero ``z`` (broadcasting)."""
    qmin, qmax = int_range(scheme.bits, scheme.symmetric)
    if scheme.symmetric:
        q = jnp.clip(jnp.round(true_divide(w, s)), qmin, qmax)
        return q, q * s
    q = jnp.clip(jnp.round(true_divide(w, s)) + z, qmin, qmax)
    return q, (q - z) * s


def _static_params(w: jax.Array, scheme: IntScheme) -> tuple[jax.Array, jax.Array]:
    """(G, N) parameters of the ordinary layout (one row for per-channel) from ``w`` (K, N)."""
    if scheme.granularity == "channel":
        s, z = _params(w, scheme, axis=0)
        return s[None], z[None]
    return _params(group_view(w, scheme.group_size), scheme, axis=1)


def _inv_chol_upper(h: jax.Array) -> jax.Array:
    """Upper-triangular ``U`` with ``U^T U = h^{-1}`` (the Cholesky factor GPTQ uses), without forming
    ``h^{-1}``: with ``J`` the reversal permutation and ``L`` the lower Cholesky factor of ``J h J``,
    ``U = J L^{-1} J`` (unique, so it equals ``cholesky(inverse(h), upper=True)``)."""
    hr = h[::-1, ::-1]
    lr = jnp.linalg.cholesky(hr)
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    linv = jax.scipy.linalg.solve_triangular(lr, eye, lower=True)
    return linv[::-1, ::-1]


def _plan(k: int, scheme: IntScheme, block_size: int, static_groups: bool) -> tuple[bool, int, int]:
    """(dynamic groups?, effective block size, padded K)."""
    g = scheme.group_size if scheme.granularity == "group" else None
    dynamic = g is not None and not static_groups
    if dynamic:
        nb = min(max(1, block_size // g), num_groups(k, g))
        b = nb * g
    else:
        b = min(block_size, k)
    kp = -(-k // b) * b
    return dynamic, b, kp


# ---------------------------------------------------------------------------------------------------------
# the compiled algorithm
# ---------------------------------------------------------------------------------------------------------


class _Raw(NamedTuple):
    codes: jax.Array  # (K, N) codes in original row order, float (signed for symmetric)
    scale: jax.Array  # (G, N) stored dtype
    zero: jax.Array  # (G, N) float (0 for symmetric)
    g_idx: jax.Array  # (K,) int32
    stats: GPTQStats


def _core(
    w: jax.Array,
    h: jax.Array,
    damp: jax.Array,
    *,
    scheme: IntScheme,
    block_size: int,
    act_order: bool,
    static_groups: bool,
    with_stats: bool,
    sub_rows: int = 16,
    group_params: tuple[jax.Array, jax.Array] | None = None,
) -> _Raw:
    dt = jnp.float64 if w.dtype == jnp.float64 else jnp.float32
    k, n = w.shape
    w0 = w.astype(dt)
    h0 = h.astype(dt)
    dead = jnp.diagonal(h0) == 0
    hh = h0 + jnp.diag(dead.astype(dt))
    wz = jnp.where(dead[:, None], jnp.zeros((), dt), w0)

    dynamic, bsz, kp = _plan(k, scheme, block_size, static_groups)
    g = scheme.group_size if scheme.granularity == "group" else k
    n_groups = num_groups(k, g)

    if act_order:
        perm = jnp.argsort(-jnp.diagonal(hh), stable=True)
    else:
        perm = jnp.arange(k)
    wp = wz[perm]
    hp = hh[perm][:, perm]

    # damped inverse-Hessian Cholesky factor, retried with 10x damping if not positive definite
    mean_diag = jnp.mean(jnp.diagonal(hp))
    eye = jnp.eye(k, dtype=dt)

    def factor(d):
        return _inv_chol_upper(hp + (d * mean_diag) * eye)

    # (one factorisation in the program: the first loop iteration uses the requested damping)
    def bad(c):
        return jnp.logical_and(~jnp.all(jnp.isfinite(c[1])), c[2] < 5)

    def attempt(c):
        d = jnp.where(c[2] == 0, c[0], c[0] * 10 + jnp.asarray(1e-6, dt) * (c[0] == 0))
        return d, factor(d), c[2] + 1

    nan_u = jnp.full((k, k), jnp.nan, dt)
    damp_used, u, _ = jax.lax.while_loop(bad, attempt, (jnp.asarray(damp, dt), nan_u, jnp.int32(0)))

    # pad to whole blocks: zero rows with an identity factor contribute no error and no update
    pad = kp - k
    if pad:
        wp = jnp.concatenate([wp, jnp.zeros((pad, n), dt)])
        u = jnp.block([[u, jnp.zeros((k, pad), dt)], [jnp.zeros((pad, k), dt), jnp.eye(pad, dtype=dt)]])

    sdt = jnp.dtype(scheme.scale_dtype)
    if dynamic:
        gp = kp // g
        tab_s = jnp.ones((gp, n), sdt)
        tab_z = jnp.zeros((gp, n), dt)
        gid = None
    else:
        if group_params is None:
            tab_s, tab_z = _static_params(wz, scheme)
        else:
            tab_s = group_params[0].astype(sdt).reshape(n_groups, n)
            tab_z = group_params[1].astype(dt).reshape(n_groups, n)
        gid = perm // g if scheme.granularity == "group" else jnp.zeros((k,), perm.dtype)
        gid = jnp.concatenate([gid, jnp.zeros((pad,), gid.dtype)]) if pad else gid

    sub = math.gcd(bsz, g if dynamic else bsz, sub_rows)  # rows per rank-1 sub-block; divides bsz (and g)

    def rows_body(w_sub, u_sub, s, z, ts, tz, gid_sub):
        """Rank-1 steps over the ``sub`` rows of a sub-block, unrolled: every output column runs the same
        short scalar recursion, so XLA fuses the whole sub-block into a few elementwise kernels instead of a
        loop of tiny ones (that sequential chain is the only row-by-row part of GPTQ)."""
        rows = [w_sub[i] for i in range(sub)]
        qs, es = [], []
        for i in range(sub):
            if dynamic:
                si, zi = s, z
            else:
                gi = gid_sub[i]
                si, zi = ts[gi].astype(dt), tz[gi]
            q, wq = _quant(rows[i], si, zi, scheme)
            err = (rows[i] - wq) / u_sub[i, i]
            for j in range(i + 1, sub):
                rows[j] = rows[j] - u_sub[i, j] * err
            qs.append(q)
            es.append(err)
        return jnp.stack(qs), jnp.stack(es)

    def block_body(b, carry):
        wc, qc, ts, tz = carry
        i1 = b * bsz
        w1 = jax.lax.dynamic_slice(wc, (i1, 0), (bsz, n))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (bsz, bsz))

        def sub_body(j, c):
            w1, q1, e1, s, z, ts, tz = c
            r = j * sub
            if dynamic:

                def fresh(_):
                    s_new, z_new = _params(jax.lax.dynamic_slice(w1, (r, 0), (g, n)), scheme, axis=0)
                    return s_new.astype(dt), z_new

                s, z = jax.lax.cond(r % g == 0, fresh, lambda _: (s, z), None)
                gi = (i1 + r) // g
                ts = jax.lax.dynamic_update_slice(ts, s.astype(sdt)[None], (gi, 0))
                tz = jax.lax.dynamic_update_slice(tz, z[None], (gi, 0))
                gid_sub = None
            else:
                gid_sub = jax.lax.dynamic_slice(gid, (i1 + r,), (sub,))
            w_sub = jax.lax.dynamic_slice(w1, (r, 0), (sub, n))
            u_sub = jax.lax.dynamic_slice(u1, (r, r), (sub, sub))
            q_sub, e_sub = rows_body(w_sub, u_sub, s, z, ts, tz, gid_sub)
            # the sub-block's errors reach the rest of the block at once (earlier rows get U = 0)
            u_r = jax.lax.dynamic_slice(u1, (r, 0), (sub, bsz))
            w1 = w1 - jnp.dot(u_r.T, e_sub, precision=_HI)
            q1 = jax.lax.dynamic_update_slice(q1, q_sub, (r, 0))
            e1 = jax.lax.dynamic_update_slice(e1, e_sub, (r, 0))
            return w1, q1, e1, s, z, ts, tz

        init = (w1, jnp.zeros((bsz, n), dt), jnp.zeros((bsz, n), dt), jnp.ones((n,), dt), jnp.zeros((n,), dt), ts, tz)
        _, q1, e1, _, _, ts, tz = jax.lax.fori_loop(0, bsz // sub, sub_body, init)
        # lazy update of every later row (rows <= i2 are done; U is upper triangular so earlier rows get 0)
        u_rows = jax.lax.dynamic_slice(u, (i1, 0), (bsz, kp))
        wc = wc - jnp.dot(u_rows.T, e1, precision=_HI)
        qc = jax.lax.dynamic_update_slice(qc, q1, (i1, 0))
        return wc, qc, ts, tz

    _, qp, tab_s, tab_z = jax.lax.fori_loop(0, kp // bsz, block_body, (wp, jnp.zeros((kp, n), dt), tab_s, tab_z))

    invperm = jnp.argsort(perm)
    codes = qp[:k][invperm]
    if dynamic:
        g_idx = (invperm // g).astype(jnp.int32)
        tab_s, tab_z = tab_s[:n_groups], tab_z[:n_groups]
    else:
        g_idx = (jnp.arange(k) // g).astype(jnp.int32)

    if with_stats:
        s_rows = tab_s.astype(dt)[g_idx]
        z_rows = tab_z[g_idx]
        w_hat = (codes - z_rows) * s_rows
        rs, rz = _static_params(w0, scheme)
        rid = (jnp.arange(k) // g) if scheme.granularity == "group" else jnp.zeros((k,), jnp.int32)
        _, w_rtn = _quant(w0, rs.astype(dt)[rid], rz[rid], scheme)

        def quad(e):
            return jnp.sum(e * jnp.dot(h0, e, precision=_HI))

        stats = GPTQStats(quad(w0 - w_hat), quad(w0 - w_rtn), quad(w0), damp_used)
    else:
        nan = jnp.asarray(jnp.nan, dt)
        stats = GPTQStats(nan, nan, nan, damp_used)
    return _Raw(codes, tab_s, tab_z, g_idx, stats)


@functools.partial(
    jax.jit,
    static_argnames=("scheme", "block_size", "act_order", "static_groups", "with_stats", "dtype_name", "sub_rows"),
)
def _gptq_jit(
    w, h, damp, group_params, *, scheme, block_size, act_order, static_groups, with_stats, dtype_name, sub_rows=_SUB
):
    raw = _core(
        w,
        h,
        damp,
        group_params=group_params,
        scheme=scheme,
        block_size=block_size,
        act_order=act_order,
        static_groups=static_groups,
        with_stats=with_stats,
        sub_rows=sub_rows,
    )
    dynamic, _, _ = _plan(w.shape[0], scheme, block_size, static_groups)
    q = _to_qarray(raw, scheme, tuple(w.shape), dtype_name, with_gidx=dynamic and act_order)
    return q, raw.stats


def _to_qarray(raw: _Raw, scheme: IntScheme, shape: tuple[int, int], dtype_name: str, with_gidx: bool) -> QArray:
    """Pack raw GPTQ output into an ordinary IntScheme QArray (see :mod:`jaxquant.schemes.rtn` for layouts)."""
    _, qmax = int_range(scheme.bits, scheme.symmetric)
    zero = None
    if scheme.symmetric:
        if scheme.bits == 8:
            data = raw.codes.astype(jnp.int8)
        else:
            data = packing.pack((raw.codes + (qmax + 1)).astype(jnp.uint8), scheme.bits)
    else:
        data = packing.pack(raw.codes.astype(jnp.uint8), scheme.bits)
        zero = raw.zero.astype(jnp.uint8)
    scale = raw.scale
    if scheme.granularity == "channel":
        scale = scale[0]
        zero = None if zero is None else zero[0]
    aux = {"g_idx": raw.g_idx} if with_gidx else {}
    data = codes_kn(data, scheme.layout)  # (N, packed rows) for a K-major scheme
    return QArray(data=data, scale=scale, zero=zero, aux=aux, scheme=scheme, shape=shape, dtype=dtype_name)


def _check_group_params(group_params, scheme, k, n, static_groups):
    """Validate user-given static group parameters; returns ``(scale, zero)`` arrays or None."""
    if group_params is None:
        return None
    if scheme.granularity == "group" and not static_groups:
        raise ValueError("GPTQ: group_params fix the grid up front; they need static_groups=True (or per-channel)")
    if not isinstance(group_params, tuple | list) or len(group_params) != 2:
        raise TypeError("GPTQ: group_params must be a (scale, zero) pair (zero may be None for symmetric schemes)")
    g = scheme.group_size if scheme.granularity == "group" else k
    want = (num_groups(k, g), n) if scheme.granularity == "group" else (n,)
    scale = jnp.asarray(group_params[0])
    if tuple(scale.shape) != want:
        raise ValueError(f"GPTQ: group_params scale must have shape {want}, got {tuple(scale.shape)}")
    zero = group_params[1]
    if scheme.symmetric:
        zero = jnp.zeros(want, jnp.float32)
    else:
        if zero is None:
            raise ValueError("GPTQ: an asymmetric scheme needs zero points in group_params")
        zero = jnp.asarray(zero)
        if tuple(zero.shape) != want:
            raise ValueError(f"GPTQ: group_params zero must have shape {want}, got {tuple(zero.shape)}")
    return scale, zero


def _check_args(w, h, scheme, damp, block_size, act_order, static_groups):
    scheme = check_gptq_scheme(scheme)
    w = check_weight(w, "w")
    if w.ndim != 2:
        raise ValueError(f"GPTQ: w must be a 2-D (in_features, out_features) kernel, got shape {tuple(w.shape)}")
    if not hasattr(h, "shape") or not hasattr(h, "dtype"):
        h = np.asarray(h)
    if not jnp.issubdtype(h.dtype, jnp.floating):
        raise TypeError(f"GPTQ: h must be a floating (K, K) Hessian, got dtype {h.dtype}")
    k = w.shape[0]
    if tuple(h.shape) != (k, k):
        raise ValueError(f"GPTQ: h must have shape ({k}, {k}) to match w {tuple(w.shape)}, got {tuple(h.shape)}")
    h = jnp.asarray(h)
    if is_concrete(h) and not bool(jnp.isfinite(h).all()):
        raise ValueError("GPTQ: the Hessian h contains NaN/Inf (check the calibration activations)")
    if isinstance(damp, bool) or not isinstance(damp, int | float | np.floating | np.integer):
        if not (hasattr(damp, "shape") and damp.shape == ()):
            raise TypeError(f"GPTQ: damp must be a float, got {type(damp).__name__}")
    elif not (0 <= float(damp) < 1e6):
        raise ValueError(f"GPTQ: damp must be >= 0 (a fraction of mean(diag(H)), e.g. 0.01), got {damp}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"GPTQ: block_size must be a positive int, got {block_size!r}")
    for name, v in (("act_order", act_order), ("static_groups", static_groups)):
        if not isinstance(v, bool):
            raise TypeError(f"GPTQ: {name} must be a bool, got {type(v).__name__}")
    return w, h, scheme


def gptq_with_stats(
    w: jax.Array,
    h: jax.Array,
    scheme: IntScheme,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    with_stats: bool = True,
    group_params: tuple[jax.Array, jax.Array | None] | None = None,
) -> tuple[QArray, GPTQStats]:
    """GPTQ-quantize a kernel and report the calibration losses (see the module docstring for the math).

    Args:
      w: float kernel ``(K, N)`` = (in_features, out_features).
      h: ``(K, K)`` Hessian ``X^T X`` of the layer's calibration inputs (any positive multiple works: only
        ``damp * mean(diag(h))`` is scale dependent, and relatively so).
      scheme: target :class:`IntScheme` (per-channel or grouped, symmetric or zero-point asymmetric, 2..8 bits).
      damp: ``lambda`` in ``H + lambda * mean(diag(H)) * I`` (GPTQ's ``percdamp``).
      block_size: rows per lazy block (a speed knob; rounded to a multiple of the group size for dynamic
        groups, so that a group never straddles a block).
      act_order: quantize rows by decreasing ``diag(H)`` (the "desc_act" heuristic).
      static_groups: compute every group's scale/zero up front from the original weights (needed with
        ``act_order`` for the plain group layout; see the module docstring).
      with_stats: compute the losses (two ``K x K x N`` products); if False they are NaN.
      group_params: optional fixed grid ``(scale, zero)`` in the QArray layout (``(G, N)``, or ``(N,)`` per
        channel; ``zero`` ignored for symmetric schemes) instead of min/max of the original weights, e.g. from a
        clipping search; needs static groups. Weights outside the grid are clamped and GPTQ compensates.

    Returns:
      ``(QArray of scheme, GPTQStats)``. The QArray carries ``aux["g_idx"]`` only for ``act_order`` with
      dynamic groups.

    Raises:
      TypeError: wrong argument types (scheme not an IntScheme, non-float ``w``/``h``).
      ValueError: shapes do not match, NaN/Inf in ``w`` or ``h``, unsupported scheme, bad ``damp``/``block_size``.
    """
    w, h, scheme = _check_args(w, h, scheme, damp, block_size, act_order, static_groups)
    gp = _check_group_params(group_params, scheme, w.shape[0], w.shape[1], static_groups)
    return _gptq_jit(
        w,
        h,
        damp,
        gp,
        scheme=scheme,
        block_size=block_size,
        act_order=act_order,
        static_groups=static_groups,
        with_stats=with_stats,
        dtype_name=jnp.dtype(w.dtype).name,
    )


def gptq(
    w: jax.Array,
    h: jax.Array,
    scheme: IntScheme,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
) -> QArray:
    """GPTQ-quantize a ``(K, N)`` kernel given the Hessian ``h = X^T X`` of its calibration inputs.

    Minimises ``tr((W - W_hat)^T H (W - W_hat))`` row by row with optimal updates of the remaining rows (see
    the module docstring); returns an ordinary :class:`IntScheme` QArray (``jaxquant.dequantize`` /
    ``qdot`` work unchanged). Works under ``jax.jit`` and ``jax.vmap``. Same arguments as
    :func:`gptq_with_stats`, which also returns the losses.
    """
    q, _ = gptq_with_stats(
        w,
        h,
        scheme,
        damp=damp,
        block_size=block_size,
        act_order=act_order,
        static_groups=static_groups,
        with_stats=False,
    )
    return q
