"""The vectorized K-quant quantizers against a plain element-by-element transcription of llama.cpp's reference
search (``quantize_row_q*_K_ref``: ``make_qkx2_quants``, ``make_qx_quants``, ``make_q3_quants``), written here
with float32 scalars in the reference's order of operations. Same super-blocks in -> the same dequantized
values out, bit for bit (so the same scales, minima and codes)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from jaxquant.formats._kquants import KQUANT_ENCODERS, nearest_int

f = np.float32


def ni(v) -> int:
    return int(nearest_int(np.array([v], np.float32))[0])


def f16(v) -> np.float32:
    return f(np.float16(v))


def qkx2(x, w, nmax, rmin, rdelta, nstep, use_mad):
    n = len(x)
    mn, mx, sw = x[0], x[0], w[0]
    sx = sw * x[0]
    for i in range(1, n):
        mn = x[i] if x[i] < mn else mn
        mx = x[i] if x[i] > mx else mx
        sw = sw + w[i]
        sx = sx + w[i] * x[i]
    if mn > 0:
        mn = f(0)
    if mx == mn:
        return f(0), -mn, [0] * n

    def err(scale, mn_, L):
        e = f(0)
        for i in range(n):
            d = scale * f(L[i]) + mn_ - x[i]
            e = e + w[i] * (abs(d) if use_mad else d * d)
        return e

    iscale = f(nmax) / (mx - mn)
    scale = f(1) / iscale
    L = [max(0, min(nmax, ni(iscale * (x[i] - mn)))) for i in range(n)]
    best = err(scale, mn, L)
    for step in range(nstep + 1):
        iscale = (f(rmin) + f(rdelta) * f(step) + f(nmax)) / (mx - mn)
        la = [max(0, min(nmax, ni(iscale * (x[i] - mn)))) for i in range(n)]
        sl = sl2 = sxl = f(0)
        for i in range(n):
            wl = w[i] * f(la[i])
            sl, sl2, sxl = sl + wl, sl2 + wl * f(la[i]), sxl + wl * x[i]
        det = sw * sl2 - sl * sl
        if det > 0:
            ts = (sw * sxl - sx * sl) / det
            tm = (sl2 * sx - sl * sxl) / det
            if tm > 0:
                tm, ts = f(0), sxl / sl2
            cur = err(ts, tm, la)
            if cur < best:
                L, best, scale, mn = la, cur, ts, tm
    return scale, -mn, L


def qx(x, nmax):
    n = len(x)
    amax, mx = f(0), f(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < f(1e-15):
        return f(0), [0] * n

    def run(iscale):
        L, slx, sl2 = [], f(0), f(0)
        for v in x:
            lv = max(-nmax, min(nmax - 1, ni(iscale * v)))
            w = v * v
            slx, sl2 = slx + w * v * f(lv), sl2 + w * f(lv) * f(lv)
            L.append(lv + nmax)
        return L, slx, sl2

    L, slx, sl2 = run(f(-nmax) / mx)
    scale = slx / sl2 if sl2 else f(0)
    best = scale * slx
    for k in range(-9, 10):
        if k == 0:
            continue
        la, slx, sl2 = run(-(f(nmax) + f(0.1) * f(k)) / mx)
        if sl2 > 0 and slx * slx > best * sl2:
            L, scale = la, slx / sl2
            best = scale * slx
    return scale, L


def q3(x, nmax=4):
    n = len(x)
    amax, mx = f(0), f(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < f(1e-15):
        return f(0), [0] * n
    iscale = f(-nmax) / mx
    L = [max(-nmax, min(nmax - 1, ni(iscale * v))) for v in x]
    slx = sl2 = f(0)
    for i in range(n):
        w = x[i] * x[i]
        slx, sl2 = slx + w * x[i] * f(L[i]), sl2 + w * f(L[i]) * f(L[i])
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = x[i] * x[i]
            s1 = slx - w * x[i] * f(L[i])
            if s1 > 0:
                s2 = sl2 - w * f(L[i]) * f(L[i])
                new = max(-nmax, min(nmax - 1, ni(x[i] * s2 / s1)))
                if new != L[i]:
                    s1 = s1 + w * x[i] * f(new)
                    s2 = s2 + w * f(new) * f(new)
                    if s2 > 0 and s1 * s1 * sl2 > slx * slx * s2:
                        L[i], slx, sl2 = new, s1, s2
                        changed += 1
        if not changed:
            break
    return (slx / sl2 if sl2 > 0 else f(0)), [v + nmax for v in L]


def block_kx(x, nmax, rmin, rdelta, nstep):
    """Q4_K (nmax 15) / Q5_K (nmax 31) super-block -> dequantized values."""
    scales, mins, Ls = [], [], []
    for j in range(8):
        xs = x[32 * j : 32 * j + 32]
        s2 = f(0)
        for v in xs:
            s2 = s2 + v * v
        av = f(np.sqrt(s2 / f(32)))
        s, m, L = qkx2(xs, [av + abs(v) for v in xs], nmax, rmin, rdelta, nstep, False)
        scales.append(s)
        mins.append(m)
        Ls.append(L)
    max_s = max([f(0), *scales])
    max_m = max([f(0), *mins])
    inv_s = f(63) / max_s if max_s > 0 else f(0)
    inv_m = f(63) / max_m if max_m > 0 else f(0)
    d, dmin = f16(max_s / f(63)), f16(max_m / f(63))
    y = []
    for j in range(8):
        ls, lm = min(63, ni(inv_s * scales[j]) & 0xFF), min(63, ni(inv_m * mins[j]) & 0xFF)
        dd, dm = d * f(ls), dmin * f(lm)
        L = Ls[j] if dd == 0 else [max(0, min(nmax, ni((v + dm) / dd))) for v in x[32 * j : 32 * j + 32]]
        y += [dd * f(q) - dm for q in L]
    return y


def block_q2k(x):
    scales, mins, Ls = [], [], []
    for j in range(16):
        xs = x[16 * j : 16 * j + 16]
        s, m, L = qkx2(xs, [abs(v) for v in xs], 3, -0.5, 0.1, 15, True)
        scales.append(s)
        mins.append(m)
        Ls.append(L)
    max_s, max_m = max([f(0), *scales]), max([f(0), *mins])
    sb = [ni(f(15) / max_s * s) & 0xFF if max_s > 0 else 0 for s in scales]
    if max_m > 0:
        sb = [(b | (ni(f(15) / max_m * m) << 4)) & 0xFF for b, m in zip(sb, mins)]
    d = f16(max_s / f(15)) if max_s > 0 else f(0)
    dmin = f16(max_m / f(15)) if max_m > 0 else f(0)
    y = []
    for j in range(16):
        dd, dm = d * f(sb[j] & 0xF), dmin * f(sb[j] >> 4)
        L = Ls[j] if dd == 0 else [max(0, min(3, ni((v + dm) / dd))) for v in x[16 * j : 16 * j + 16]]
        y += [dd * f(q) - dm for q in L]
    return y


def block_q3k(x):
    scales, Ls = zip(*[q3(x[16 * j : 16 * j + 16]) for j in range(16)])
    amax, max_s = f(0), f(0)
    for s in scales:
        if abs(s) > amax:
            amax, max_s = abs(s), s
    if max_s:
        iscale = f(-32) / max_s
        ls = [max(-32, min(31, ni(iscale * s))) + 32 for s in scales]
        d = f16(f(1) / iscale)
    else:
        ls, d = [0] * 16, f(0)
    y = []
    for j in range(16):
        dd = d * f(ls[j] - 32)
        L = Ls[j] if dd == 0 else [max(-4, min(3, ni(v / dd))) + 4 for v in x[16 * j : 16 * j + 16]]
        y += [dd * f(q - 4) for q in L]
    return y


def block_q6k(x):
    scales, Ls = zip(*[qx(x[16 * j : 16 * j + 16], 32) for j in range(16)])
    amax, max_s = f(0), f(0)
    for s in scales:
        if abs(s) > amax:
            amax, max_s = abs(s), s
    if amax < f(1e-15):
        return [f(0)] * 256
    iscale = f(-128) / max_s
    d = f16(f(1) / iscale)
    y = []
    for j in range(16):
        sc = min(127, ni(iscale * scales[j]))
        dd = d * f(sc)
        L = Ls[j] if dd == 0 else [max(-32, min(31, ni(v / dd))) + 32 for v in x[16 * j : 16 * j + 16]]
        y += [dd * f(q - 32) for q in L]
    return y


SCALAR = {
    "Q2_K": block_q2k,
    "Q3_K": block_q3k,
    "Q4_K": lambda x: block_kx(x, 15, -1.0, 0.1, 20),
    "Q5_K": lambda x: block_kx(x, 31, -0.5, 0.1, 15),
    "Q6_K": block_q6k,
}


def _blocks() -> np.ndarray:
    rng = np.random.default_rng(42)
    b = [
        rng.standard_normal(256),
        rng.standard_normal(256) * 1e-3 + 0.01,  # all positive (min clamps to 0)
        rng.standard_t(2, 256),  # outliers
        np.round(rng.standard_normal(256) * 4) / 8,  # few distinct values, many ties
        np.r_[np.zeros(128), rng.uniform(-1, 1, 128)],  # zero sub-blocks
        np.full(256, -0.25),  # constant
    ]
    return np.stack(b).astype(np.float32)


@pytest.mark.parametrize("qtype", sorted(SCALAR))
def test_vectorized_equals_scalar_reference(qtype):
    x = _blocks()
    got = gguf.quants.dequantize(KQUANT_ENCODERS[qtype](x), T[qtype])
    for i, row in enumerate(x):
        want = np.array(SCALAR[qtype]([f(v) for v in row]), np.float32)
        assert np.array_equal(got[i].view(np.uint32), want.view(np.uint32)), (qtype, i)
