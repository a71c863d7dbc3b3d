"""A float64 NumPy transcription of GPTQ (Frantar et al. 2023, Algorithm 1 with lazy batches, groups and
act-order as in the reference implementation), on IntScheme's grid. Used only by the tests.

Layout is the paper's: ``W`` is ``(rows = outputs, columns = inputs)``; the public function takes and returns
the Flax ``(K, N)`` layout.
"""

from __future__ import annotations

import numpy as np


def round_up_f16(s: np.ndarray) -> np.ndarray:
    """float64 -> float16 rounded up, returned as float64 (IntScheme's fp16 scale storage)."""
    st = s.astype(np.float16)
    low = st.astype(np.float64) < s
    st = np.where(low, np.nextafter(st, np.float16(np.inf)), st)
    return st.astype(np.float64)


def params(x: np.ndarray, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per row of ``x`` (N, m): IntScheme's formulas."""
    if sym:
        qmax = 2 ** (bits - 1) - 1
        amax = np.abs(x).max(axis=1)
        s = round_up_f16(np.where(amax != 0, amax / qmax, 1.0))
        return s, np.zeros_like(s)
    qmax = 2**bits - 1
    lo = np.minimum(x.min(axis=1), 0)
    hi = np.maximum(x.max(axis=1), 0)
    s = round_up_f16(np.where(hi != lo, (hi - lo) / qmax, 1.0))
    z = np.clip(np.round(-lo / s), 0, qmax)
    return s, z


def quant(w: np.ndarray, s: np.ndarray, z: np.ndarray, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """Codes and dequantized values."""
    if sym:
        qmax = 2 ** (bits - 1) - 1
        q = np.clip(np.round(w / s), -qmax, qmax)
        return q, q * s
    qmax = 2**bits - 1
    q = np.clip(np.round(w / s) + z, 0, qmax)
    return q, (q - z) * s


def gptq_reference(
    w_kn: np.ndarray,
    h: np.ndarray,
    bits: int,
    group: int | None,
    sym: bool,
    *,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
) -> dict[str, np.ndarray]:
    """GPTQ of a (K, N) kernel; returns codes (K, N), scale (G, N), zero (G, N), g_idx (K,), w_hat (K, N)."""
    W = np.array(w_kn, np.float64).T.copy()  # (N, K)
    H = np.array(h, np.float64).copy()
    K = W.shape[1]
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    g = group or K
    dynamic = group is not None and not static_groups
    groups = None
    if not dynamic:
        groups = [params(W[:, i : i + g], bits, sym) for i in range(0, K, g)]
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(K)
    W = W[:, perm]
    H = H[perm][:, perm]
    H[np.diag_indices(K)] += damp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper U with U^T U = H^-1
    Q = np.zeros_like(W)
    scales, zeros = {}, {}
    s = z = None
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if dynamic:
                if col % g == 0:
                    # the group's weights as updated by every column quantized so far
                    end = min(col + g, K)
                    cur = W1[:, i : min(i2, end) - i1]
                    if end > i2:
                        rest = W[:, i2:end] - Err1[:, :i] @ Hinv[i1 : i1 + i, i2:end]
                        cur = np.concatenate([cur, rest], axis=1)
                    s, z = params(cur, bits, sym)
                    scales[col // g], zeros[col // g] = s, z
            else:
                s, z = groups[perm[col] // g]
            w = W1[:, i]
            d = Hinv1[i, i]
            q, wq = quant(w, s, z, bits, sym)
            Q[:, col] = q
            err = (w - wq) / d
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    invperm = np.argsort(perm)
    codes = Q[:, invperm].T
    if dynamic:
        g_idx = invperm // g
        S = np.stack([scales[j] for j in range(len(scales))])
        Z = np.stack([zeros[j] for j in range(len(zeros))])
    else:
        g_idx = np.arange(K) // g
        S = np.stack([p[0] for p in groups])
        Z = np.stack([p[1] for p in groups])
    w_hat = (codes - Z[g_idx]) * S[g_idx]
    return {"codes": codes, "scale": S, "zero": Z, "g_idx": g_idx, "w_hat": w_hat}
