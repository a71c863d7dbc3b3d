"""How fast does a Pallas-Triton K loop stream a packed weight, with no arithmetic beyond an integer sum?

A diagnostic for the fused kernels' times on the H200 (``benchmarks/results/h200-2026-11-28.md``): at K = N = 8192
every int4 variant took 33-36 µs whatever its instruction count (4.8 to 11.6 per weight in sm_90 code), i.e. about
1 TB/s for a 33.5 MB weight, where a device copy moves 4 TB/s. This times, for that weight's bytes:

- ``xla``: XLA's column sum of the ``(K/2, N)`` uint8 array (XLA's own streaming rate);
- ``u8 BNxBK/split``: a Pallas kernel whose programs sum ``(BK, BN)`` uint8 tiles of their K range into int32 registers
  (the int4 kernels' weight-tile loads: ``(K/2, N)`` bytes, a row of ``BN`` bytes per packed row);
- ``u32 ...``: the same bytes viewed as ``(K/2, N/4)`` uint32 words (four columns per element: 4-byte loads).

Each line: median µs per call over rotating buffers (> 2x L2) and the bytes read per second. The loop's loads feed
no dot, so Triton does not pipeline them (plain 16-byte ``LDG`` in sm_90 code, no ``cp.async``): a lower bound on
what a Pallas kernel can read, not a ceiling. Not a kernel of the library; nothing in ``jaxquant`` uses it.

Usage::

    python benchmarks/stream_probe.py            # on a GPU
    python benchmarks/stream_probe.py --dry-run  # CPU: a 256x256 weight through the Pallas interpreter
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

# run from the repository root without installing: python benchmarks/stream_probe.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from benchmarks.kernels import L2_BYTES, time_per_call
from pallas_kernels._common import BlockConfig, compiler_params

__all__ = ["main", "stream_sum"]

#: (element dtype, BN elements, BK rows, split-K, warps, stages)
CASES = [
    ("uint8", 64, 64, 4, 4, 4),  # the int4 table row's weight tile (16x64x128: 64 packed rows of 64 bytes)
    ("uint8", 128, 64, 4, 4, 4),
    ("uint8", 256, 32, 4, 4, 4),
    ("uint8", 128, 64, 1, 4, 4),
    ("uint8", 512, 16, 4, 4, 4),
    ("uint8", 128, 128, 4, 4, 4),
    ("uint8", 128, 64, 4, 8, 3),
    ("uint32", 16, 64, 4, 4, 4),  # the same 64x64 bytes as words
    ("uint32", 32, 64, 4, 4, 4),
    ("uint32", 64, 32, 4, 4, 4),
    ("uint32", 128, 16, 4, 4, 4),
    ("uint32", 64, 64, 1, 4, 4),
    ("uint32", 128, 64, 4, 4, 4),
]


def _sum_kernel(w_ref, o_ref, *, bk: int, bn: int, steps: int):
    j, s = pl.program_id(0), pl.program_id(1)

    def body(t, acc):
        k0 = (s * steps + t) * bk
        return acc + w_ref[pl.ds(k0, bk), pl.ds(j * bn, bn)].astype(jnp.int32)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bk, bn), jnp.int32))
    o_ref[pl.ds(s, 1), pl.ds(j * bn, bn)] = jnp.sum(acc, axis=0, keepdims=True)


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def stream_sum(w: jax.Array, cfg: BlockConfig, interpret: bool = False) -> jax.Array:
    """``(split_k, N)`` int32 partial column sums of the integer array ``w`` (K, N): each program reads its
    ``(K / split_k, block_n)`` slice in ``(block_k, block_n)`` tiles (K and N must divide evenly)."""
    k, n = w.shape
    bk, bn, split = cfg.block_k, cfg.block_n, cfg.split_k
    if n % bn or k % (bk * split):
        raise ValueError(f"stream_sum: ({k}, {n}) does not divide into {split} x ({bk}, {bn}) tiles")
    kernel = functools.partial(_sum_kernel, bk=bk, bn=bn, steps=k // (bk * split))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split, n), jnp.int32),
        grid=(n // bn, split),
        compiler_params=compiler_params(cfg),
        interpret=interpret,
        name="stream_sum",
    )(w)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU: a 256x256 weight through the Pallas interpreter")
    p.add_argument("--k", type=int, default=8192, help="K of the int4 weight (packed rows: K / 2)")
    p.add_argument("--n", type=int, default=8192)
    a = p.parse_args(argv)
    if a.k < 2 or a.n < 4 or a.k % 2 or a.n % 4:
        p.error("--k must be even and positive, --n a positive multiple of 4 (the uint32 view)")
    k, n = (256, 256) if a.dry_run else (a.k, a.n)
    rows, nbytes = k // 2, k // 2 * n
    nb = 2 if a.dry_run else max(2, min(16, 2 * L2_BYTES // nbytes + 2))
    key = jax.random.PRNGKey(0)
    ws = [
        jax.random.randint(jax.random.fold_in(key, b), (rows, n), 0, 256, jnp.int32).astype(jnp.uint8)
        for b in range(nb)
    ]
    words = [jax.lax.bitcast_convert_type(w.reshape(rows, n // 4, 4), jnp.uint32) for w in ws]
    calls, trials = (2, 1) if a.dry_run else (10, 5)
    # the column sums the kernels must reproduce, compared modulo 2**32 (word sums wrap in int32)
    want = {
        d: np.asarray(jnp.sum(src[0].astype(jnp.int32), axis=0), np.int64)
        for d, src in (("uint8", ws), ("uint32", words))
    }
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}: {nbytes / 1e6:.1f} MB packed int4 weight "
          f"(K={k}, N={n}), {nb} rotating buffers")  # fmt: skip
    f_xla = jax.jit(lambda wl: [jnp.sum(w.astype(jnp.int32), axis=0) for w in wl])
    t = time_per_call(f_xla, (ws,), calls, trials) / nb
    print(f"xla column sum: {1e6 * t:.1f} us, {nbytes / t / 1e12:.2f} TB/s", flush=True)
    for dt, bn, bk, split, warps, stages in CASES:
        src = ws if dt == "uint8" else words
        if a.dry_run:
            bn, bk, split = min(bn, src[0].shape[1]), min(bk, rows // 2), min(split, 2)
        cfg = BlockConfig(block_m=1, block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=stages)
        name = f"{dt} {bn}x{bk}/{split} w{warps} s{stages}"
        try:
            f = jax.jit(lambda wl, cfg=cfg: [stream_sum(w, cfg, a.dry_run) for w in wl])
            got = np.asarray(f(src[:1])[0], np.int64).sum(axis=0)
            ok = bool(np.all((got - want[dt]) % 2**32 == 0))
            t = time_per_call(f, (src,), calls, trials) / nb
            print(f"{name}: {1e6 * t:.1f} us, {nbytes / t / 1e12:.2f} TB/s{'' if ok else '  WRONG SUM'}", flush=True)
        except Exception as e:  # one failing config must not hide the others
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
