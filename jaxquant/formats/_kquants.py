"""K-quant quantizers (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): a vectorized NumPy implementation of the search that
llama.cpp's reference quantizers (``quantize_row_q*_K_ref`` in ``ggml-quants.c``, used by ``llama-quantize``
when no importance matrix is given) perform.

Every super-block of 256 weights is quantized independently, so all super-blocks of a tensor are processed at
once: the loops below run over the (16 or 32) elements of a sub-block and over the search steps, each step a
NumPy operation across all sub-blocks. Arithmetic is float32 in the reference's order (sums accumulate element
by element, products associate left to right), and ``nearest_int`` is the reference's round-half-to-even bit
trick, so the result is bit-identical to an IEEE float32 build of the reference (one without fused
multiply-add contraction; a build that contracts ``a*b+c`` into FMA may round a few ties differently).

The searches
------------
``make_qkx2`` (Q2_K, Q4_K, Q5_K: asymmetric ``x ~ s*l - m`` with ``l`` in ``[0, nmax]``): start from the
min/max grid (``m = -min(min x, 0)``, ``s = (max x - min)/nmax``), then for ``k = 0..nstep`` try the grid
``iscale = (nmax + rmin + k*rdelta) / (max - min)``, round ``l = clip(round(iscale*(x - min)), 0, nmax)`` and
solve the weighted least-squares problem for ``(s, m)`` given ``l`` (weights ``w``); ``min`` is the best
minimum found so far (``-m`` of the current winner), as in the reference::

    D = Sw*Sll - Sl^2,  s = (Sw*Sxl - Sx*Sl)/D,  -m = (Sll*Sx - Sl*Sxl)/D   (if -m > 0: m = 0, s = Sxl/Sll)

keeping the candidate with the smallest weighted error ``sum w*|s*l - m - x|^p`` (``p = 1`` for Q2_K, 2 else).
Q4_K/Q5_K use ``w = rms(x) + |x|`` over sub-blocks of 32, Q2_K ``w = |x|`` over sub-blocks of 16.

``make_qx`` (Q6_K: symmetric ``x ~ s*l``, ``l`` in ``[-nmax, nmax-1]``, weights ``x^2``): the grid through the
largest-magnitude value ``iscale = -nmax/max``, then 18 nearby grids ``-(nmax + k/10)/max``, ``k = +-1..+-9``;
each gives ``s = Sxl/Sll`` and the grid maximizing ``Sxl^2/Sll`` wins.

``make_q3`` (Q3_K: ``l`` in ``[-4, 3]``, weights ``x^2``): the grid through the largest-magnitude value, then up
to five coordinate-descent passes: each ``l_i`` is re-rounded against the scale fitted without it and kept
when it raises ``Sxl^2/Sll``.

The per-sub-block scales (and minima) are then themselves quantized against one fp16 super-block scale (6-bit
for Q4_K/Q5_K, 4-bit for Q2_K, signed 6-bit for Q3_K, signed 8-bit for Q6_K), and the codes are recomputed
with the quantized scales: ``l = clip(round((x + m_q)/s_q))``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KQUANT_ENCODERS", "nearest_int"]

F32 = np.float32
QK_K = 256
_GROUP_MAX_EPS = F32(1e-15)
_MAGIC = F32(12582912.0)  # 1.5 * 2**23


def nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp's ``nearest_int``: ``round-half-to-even(v)`` via ``v + 1.5*2^23`` in float32 (int32 result).

    For ``|v| <= 2^22`` this equals ``np.rint(v)``; outside that range it reproduces the reference's
    (meaningless but deterministic) bits, which the callers then clamp.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        val = (np.asarray(v, F32) + _MAGIC).astype(F32)
    return (val.view(np.int32) & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def _fp16_round(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 bytes as uint16, the fp16 value back in float32)."""
    with np.errstate(over="ignore"):
        h = np.asarray(x, F32).astype(np.float16)
    return h.view(np.uint16), h.astype(F32)


def _u16_bytes(u: np.ndarray) -> np.ndarray:
    """(..., ) uint16 -> (..., 2) uint8 little-endian."""
    u = np.asarray(u, np.uint16)
    return np.stack([(u & 0xFF).astype(np.uint8), (u >> 8).astype(np.uint8)], axis=-1)


# ------------------------------------------------------------------------------------------------------------
# searches (vectorized over the leading axis: one row per sub-block)
# ------------------------------------------------------------------------------------------------------------


def make_qkx2(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric sub-block search; returns ``(scale (B,), min_offset (B,), L (B, n) uint8)``.

    ``x ~ scale * L - min_offset``; see the module docstring.
    """
    b, n = x.shape
    mn = x[:, 0].copy()
    mx = x[:, 0].copy()
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        xi = x[:, i]
        mn = np.where(xi < mn, xi, mn)
        mx = np.where(xi > mx, xi, mx)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * xi
    mn = np.where(mn > 0, F32(0), mn)
    flat = mx == mn
    fnmax = F32(nmax)
    iscale = fnmax / np.where(flat, F32(1), mx - mn)
    scale = F32(1) / iscale
    L = np.clip(nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    best = np.zeros(b, F32)
    for i in range(n):
        diff = (scale * L[:, i].astype(F32) + mn) - x[:, i]
        diff = np.abs(diff) if use_mad else diff * diff
        best = best + w[:, i] * diff
    frmin, frdelta = F32(rmin), F32(rdelta)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for step in range(nstep + 1):
            # the reference re-centres on the best minimum found so far (``min`` is updated in its loop)
            its = ((frmin + frdelta * F32(step)) + fnmax) / np.where(flat, F32(1), mx - mn)
            la = np.clip(nearest_int(its[:, None] * (x - mn[:, None])), 0, nmax)
            laf = la.astype(F32)
            s_l = np.zeros(b, F32)
            s_l2 = np.zeros(b, F32)
            s_xl = np.zeros(b, F32)
            for i in range(n):
                wl = w[:, i] * laf[:, i]
                s_l = s_l + wl
                s_l2 = s_l2 + wl * laf[:, i]
                s_xl = s_xl + wl * x[:, i]
            det = sum_w * s_l2 - s_l * s_l
            ok = det > 0
            det_safe = np.where(ok, det, F32(1))
            t_scale = (sum_w * s_xl - sum_x * s_l) / det_safe
            t_min = (s_l2 * sum_x - s_l * s_xl) / det_safe
            pos = t_min > 0
            t_min = np.where(pos, F32(0), t_min)
            t_scale = np.where(pos, s_xl / np.where(s_l2 == 0, F32(1), s_l2), t_scale)
            cur = np.zeros(b, F32)
            for i in range(n):
                diff = (t_scale * laf[:, i] + t_min) - x[:, i]
                diff = np.abs(diff) if use_mad else diff * diff
                cur = cur + w[:, i] * diff
            upd = ok & (cur < best) & ~flat
            L = np.where(upd[:, None], la, L)
            best = np.where(upd, cur, best)
            scale = np.where(upd, t_scale, scale)
            mn = np.where(upd, t_min, mn)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, F32(0), scale)
    return scale.astype(F32), (-mn).astype(F32), L.astype(np.uint8)


def _first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max |x| per row, the signed value at its first occurrence)."""
    idx = np.argmax(np.abs(x), axis=1)
    mx = np.take_along_axis(x, idx[:, None], axis=1)[:, 0]
    return np.abs(mx), mx


def make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric search with weights ``x^2`` (reference ``rmse_type = 1``); returns ``(scale, L + nmax)``."""
    b, n = x.shape
    amax, mx = _first_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    mx_safe = np.where(zero, F32(1), mx)
    w = x * x
    wx = w * x

    def sums(iscale):
        lv = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = lv.astype(F32)
        slx = np.zeros(b, F32)
        sl2 = np.zeros(b, F32)
        for i in range(n):
            slx = slx + wx[:, i] * lf[:, i]
            sl2 = sl2 + (w[:, i] * lf[:, i]) * lf[:, i]
        return lv, slx, sl2

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lv, slx, sl2 = sums(F32(-nmax) / mx_safe)
        L = lv + nmax
        scale = np.where(sl2 != 0, slx / np.where(sl2 == 0, F32(1), sl2), F32(0))
        best = scale * slx
        for k in range(-9, 10):
            if k == 0:
                continue
            its = -(F32(nmax) + F32(0.1) * F32(k)) / mx_safe
            lv, slx, sl2 = sums(its)
            upd = (sl2 > 0) & (slx * slx > best * sl2)
            L = np.where(upd[:, None], lv + nmax, L)
            scale = np.where(upd, slx / np.where(sl2 == 0, F32(1), sl2), scale)
            best = np.where(upd, scale * slx, best)
    L = np.where(zero[:, None], 0, L)
    scale = np.where(zero, F32(0), scale)
    return scale.astype(F32), L.astype(np.int32)


def make_q3(x: np.ndarray, nmax: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K sub-block search (grid + coordinate descent); returns ``(scale, L + nmax)`` (``L = 0`` for zeros)."""
    b, n = x.shape
    amax, mx = _first_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    mx_safe = np.where(zero, F32(1), mx)
    w = x * x
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-nmax) / mx_safe
        L = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        slx = np.zeros(b, F32)
        sl2 = np.zeros(b, F32)
        for i in range(n):
            lf = L[:, i].astype(F32)
            slx = slx + wx[:, i] * lf
            sl2 = sl2 + (w[:, i] * lf) * lf
        for _ in range(5):  # a pass without any change is a fixed point, so running all five passes is exact
            for i in range(n):
                li = L[:, i].astype(F32)
                s1 = slx - wx[:, i] * li
                s2 = sl2 - (w[:, i] * li) * li
                c1 = s1 > 0
                new_l = np.clip(nearest_int((x[:, i] * s2) / np.where(c1, s1, F32(1))), -nmax, nmax - 1)
                nf = new_l.astype(F32)
                c2 = new_l != L[:, i]
                t1 = s1 + wx[:, i] * nf
                t2 = s2 + (w[:, i] * nf) * nf
                c3 = (t2 > 0) & ((t1 * t1) * sl2 > (slx * slx) * t2)
                upd = c1 & c2 & c3 & ~zero
                L[:, i] = np.where(upd, new_l, L[:, i])
                slx = np.where(upd, t1, slx)
                sl2 = np.where(upd, t2, sl2)
        scale = np.where(sl2 > 0, slx / np.where(sl2 > 0, sl2, F32(1)), F32(0))
    L = np.where(zero[:, None], 0, L + nmax)
    scale = np.where(zero, F32(0), scale)
    return scale.astype(F32), L.astype(np.int32)


# ------------------------------------------------------------------------------------------------------------
# packing helpers
# ------------------------------------------------------------------------------------------------------------


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """(nb, 256) codes 0..3 -> (nb, 64): byte ``32h + l`` holds elements ``128h + 32s + l`` at bits ``2s``."""
    q = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    out = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return out.reshape(-1, 64)


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins (nb, 8) -> the 12-byte Q4_K/Q5_K layout."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4]
    out[:, 4:8] = lm[:, 0:4]
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return out


def _unpack_scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


# ------------------------------------------------------------------------------------------------------------
# block encoders: (nb, 256) float32 -> (nb, type_size) uint8
# ------------------------------------------------------------------------------------------------------------


def _encode_kx(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[np.ndarray, ...]:
    """Shared part of Q4_K/Q5_K: returns (d bytes, dmin bytes, 12 scale bytes, L (nb, 256))."""
    nb = x.shape[0]
    xs = x.reshape(nb * 8, 32)
    sum_x2 = np.zeros(nb * 8, F32)
    for i in range(32):
        sum_x2 = sum_x2 + xs[:, i] * xs[:, i]
    av_x = np.sqrt(sum_x2 / F32(32))
    w = av_x[:, None] + np.abs(xs)
    scales, mins, L = make_qkx2(xs, w, nmax, rmin, rdelta, nstep, use_mad=False)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    L = L.reshape(nb, 256).astype(np.int32)
    max_scale = np.maximum(F32(0), scales.max(axis=1))
    max_min = np.maximum(F32(0), mins.max(axis=1))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0))
        inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0))
    ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF)
    lm = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF)
    sbytes = _pack_scale_min_k4(ls, lm)
    d16, d = _fp16_round(max_scale / F32(63))
    m16, dm = _fp16_round(max_min / F32(63))
    sc, m = _unpack_scale_min_k4(sbytes)
    dd = d[:, None] * sc.astype(F32)  # (nb, 8)
    dmm = dm[:, None] * m.astype(F32)
    xb = x.reshape(nb, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = nearest_int((xb + dmm[:, :, None]) / np.where(dd == 0, F32(1), dd)[:, :, None])
    lq = np.clip(lq, 0, nmax)
    L = np.where((dd == 0)[:, :, None], L.reshape(nb, 8, 32), lq).reshape(nb, 256)
    return _u16_bytes(d16), _u16_bytes(m16), sbytes, L


def encode_q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K blocks: ``d, dmin`` (fp16), 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit codes."""
    d, dmin, sbytes, L = _encode_kx(x, 15, -1.0, 0.1, 20)
    q = L.reshape(-1, 4, 2, 32).astype(np.uint8)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d, dmin, sbytes, qs], axis=1)


def encode_q5_k(x: np.ndarray) -> np.ndarray:
    """Q5_K blocks: ``d, dmin``, 12 scale bytes, 32 bytes of high bits, 128 bytes of low nibbles."""
    d, dmin, sbytes, L = _encode_kx(x, 31, -0.5, 0.1, 15)
    q = L.reshape(-1, 4, 2, 32).astype(np.uint8)  # pair p, half h, lane j
    low = q & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    hi = (q >> 4) & 1  # bit for element 64p + 32h + j goes to bit 2p + h of qh[j]
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for p in range(4):
        for h in range(2):
            qh |= hi[:, p, h] << (2 * p + h)
    return np.concatenate([d, dmin, sbytes, qh, qs], axis=1)


def encode_q2_k(x: np.ndarray) -> np.ndarray:
    """Q2_K blocks: 16 bytes of 4-bit scale|min<<4, 64 bytes of 2-bit codes, ``d, dmin`` (fp16)."""
    nb = x.shape[0]
    xs = x.reshape(nb * 16, 16)
    scales, mins, L = make_qkx2(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
    scales = scales.reshape(nb, 16)
    mins = mins.reshape(nb, 16)
    L = L.reshape(nb, 16, 16).astype(np.int32)
    max_scale = np.maximum(F32(0), scales.max(axis=1))
    max_min = np.maximum(F32(0), mins.max(axis=1))
    ps, pm = max_scale > 0, max_min > 0
    with np.errstate(divide="ignore"):
        isc = F32(15) / np.where(ps, max_scale, F32(1))
        imn = F32(15) / np.where(pm, max_min, F32(1))
    sb = np.where(ps[:, None], nearest_int(isc[:, None] * scales) & 0xFF, 0).astype(np.uint8)
    lm = np.where(pm[:, None], nearest_int(imn[:, None] * mins) << 4, 0) & 0xFF
    sb = sb | lm.astype(np.uint8)
    d16, d = _fp16_round(np.where(ps, max_scale / F32(15), F32(0)))
    m16, dm = _fp16_round(np.where(pm, max_min / F32(15), F32(0)))
    dd = d[:, None] * (sb & 0xF).astype(F32)
    dmm = dm[:, None] * (sb >> 4).astype(F32)
    xb = x.reshape(nb, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = np.clip(nearest_int((xb + dmm[:, :, None]) / np.where(dd == 0, F32(1), dd)[:, :, None]), 0, 3)
    L = np.where((dd == 0)[:, :, None], L, lq).reshape(nb, 256)
    return np.concatenate([sb, _pack_2bit(L), _u16_bytes(d16), _u16_bytes(m16)], axis=1)


def encode_q3_k(x: np.ndarray) -> np.ndarray:
    """Q3_K blocks: 32 bytes of high-bit mask, 64 bytes of 2-bit low codes, 12 bytes of signed 6-bit scales,
    ``d`` (fp16)."""
    nb = x.shape[0]
    scales, L = make_q3(x.reshape(nb * 16, 16), 4)
    scales = scales.reshape(nb, 16)
    L = L.reshape(nb, 16, 16)
    amax_i = np.argmax(np.abs(scales), axis=1)
    max_scale = np.take_along_axis(scales, amax_i[:, None], axis=1)[:, 0]
    nz = max_scale != 0
    with np.errstate(divide="ignore"):
        iscale = F32(-32) / np.where(nz, max_scale, F32(1))
    lv = nearest_int(iscale[:, None] * scales)
    lv = ((lv + 128) & 0xFF) - 128  # the reference stores it in an int8_t
    lv = np.clip(lv, -32, 31) + 32
    lv = np.where(nz[:, None], lv, 0).astype(np.uint8)
    sbytes = np.zeros((nb, 12), np.uint8)
    sbytes[:, 0:8] = (lv[:, 0:8] & 0xF) | ((lv[:, 8:16] & 0xF) << 4)
    hi = lv >> 4
    for j in range(16):
        sbytes[:, 8 + j % 4] |= hi[:, j] << (2 * (j // 4))
    d16, d = _fp16_round(np.where(nz, F32(1) / iscale, F32(0)))
    sc = lv.astype(np.int32) - 32
    dd = d[:, None] * sc.astype(F32)
    xb = x.reshape(nb, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = np.clip(nearest_int(xb / np.where(dd == 0, F32(1), dd)[:, :, None]), -4, 3) + 4
    L = np.where((dd == 0)[:, :, None], L, lq).reshape(nb, 256)
    hmask = np.zeros((nb, 32), np.uint8)
    hb = (L > 3).astype(np.uint8).reshape(nb, 8, 32)  # element 32k + m -> bit k of hmask[m]
    for k in range(8):
        hmask |= hb[:, k] << k
    L = np.where(L > 3, L - 4, L)
    return np.concatenate([hmask, _pack_2bit(L), sbytes, _u16_bytes(d16)], axis=1)


def encode_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K blocks: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales, ``d`` (fp16)."""
    nb = x.shape[0]
    scales, L = make_qx(x.reshape(nb * 16, 16), 32)
    scales = scales.reshape(nb, 16)
    L = L.reshape(nb, 16, 16)
    idx = np.argmax(np.abs(scales), axis=1)
    max_scale = np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
    zero = np.abs(max_scale) < _GROUP_MAX_EPS
    with np.errstate(divide="ignore"):
        iscale = F32(-128) / np.where(zero, F32(1), max_scale)
    d16, d = _fp16_round(F32(1) / iscale)
    sc = np.minimum(127, nearest_int(iscale[:, None] * scales))
    sc = (((sc + 128) & 0xFF) - 128).astype(np.int8)
    dd = d[:, None] * sc.astype(F32)
    xb = x.reshape(nb, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = np.clip(nearest_int(xb / np.where(dd == 0, F32(1), dd)[:, :, None]), -32, 31) + 32
    L = np.where((dd == 0)[:, :, None], L, lq).reshape(nb, 2, 4, 32).astype(np.uint8)  # half, quarter, lane
    low = L & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    hi = L >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), _u16_bytes(d16)], axis=1)
    out[zero] = 0
    return out


#: qtype name -> encoder of (nb, 256) float32 blocks
KQUANT_ENCODERS = {
    "Q2_K": encode_q2_k,
    "Q3_K": encode_q3_k,
    "Q4_K": encode_q4_k,
    "Q5_K": encode_q5_k,
    "Q6_K": encode_q6_k,
}
