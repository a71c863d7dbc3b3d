"""How fast does a Pallas-Triton K loop stream a packed weight: a ladder from a bare integer sum to the int4 kernel.

A diagnostic for the fused kernels' times on the H200 (``benchmarks/results/h200-2026-11-28.md``): at K = N = 8192
every int4 variant took 33-36 µs whatever its instruction count (4.8 to 11.6 per weight in sm_90 code), i.e. about
1 TB/s for a 33.5 MB weight, where a device copy moves 4 TB/s. This times, for that weight's bytes:

- ``xla``: XLA's column sum of the ``(K/2, N)`` uint8 array (XLA's own streaming rate);
- ``u8 BNxBK/split``: a Pallas kernel whose programs sum ``(BK, BN)`` uint8 tiles of their K range into int32 registers
  (the int4 kernels' weight-tile loads: ``(K/2, N)`` bytes, a row of ``BN`` bytes per packed row);
- ``u32 ...``: the same bytes viewed as ``(K/2, N/4)`` uint32 words (four columns per element: 4-byte loads).

The sum loop's loads feed no dot, so Triton does not pipeline them (plain 16-byte ``LDG`` in sm_90 code, no
``cp.async``): a lower bound on what a Pallas kernel can read, not a ceiling. The ladder's next rungs, on the same
bytes, bracket where the fused kernel's time goes:

- ``dot kn ...`` (:func:`stream_dot`): 16 bf16 activation rows times the bytes converted to bf16, one tensor-core
  dot per ``(BK, BN)`` tile. Feeding a dot, the tiles are software-pipelined through shared memory (``LDGSTS``)
  as in the int4 kernel; sm_90 code per trip of the 64x64-byte tile: 32 ``LDS.U8`` (each byte read from shared
  memory on its own) and 32 ``I2F.BF16.U16`` per thread, 8 ``HMMA`` (compiled on the CPU); ``nibbles``: each byte's
  two 4-bit codes into two dots (the int4 kernel's unpacking, without its scales);
- ``dot words ...``: the tile as ``(BK, BN/4)`` uint32 words, each byte a dot of its own (a column-permuted output,
  see :func:`word_columns`): 32-bit shared-memory reads instead of byte reads;
- ``dot nk ...``: the same bytes stored K-major (``(N, K/2)``, each column's bytes contiguous, as the 8-bit schemes'
  ``layout="nk"``): the dot's weight operand then holds consecutive K rows per thread, and the sm_90 code reads the
  tile with ``LDS.64`` (eight bytes) and ``LDSM`` instead of ``LDS.U8``, in 48-82 registers instead of 88-120 (CPU
  compile of these cases); the candidate storage for a faster int4 kernel;
- ``int4 kernel ...``: the library's int4 g128 kernel on the same bytes (as packed codes), M = 1 and 16, this
  device's table config and the H200 sweep's fastest, vs its XLA path.

Beside the ladder, ``mosaic`` rungs: the library's Mosaic GPU kernels (:mod:`pallas_kernels.int_matmul_mosaic`,
JAX's other Pallas GPU backend: TMA copies into a multi-buffered shared-memory pipeline instead of Triton's
``cp.async``) on the K-major copy of the same bytes, read as int8 codes with one scale per channel (K/2 rows) and as
the int4 g128 codes they are (the whole W4A16 product, against the ``int4`` rung): the GEMV at M = 1 and the
transposed wgmma dot at M = 16. Whether this backend streams the weight faster than Pallas-Triton decides where
the int4 kernels should go next.

And ``xla`` rungs (:func:`xla_s4_matmul`): no Pallas at all. The same codes as a ``jnp.int4`` array
(XLA's own packed 4-bit type), ``(K, N)`` or K-major ``(N, K)``, dequantized by a convert and a multiply with the
group (or channel) scales and fed to ``jnp.dot`` in one jitted function: whether XLA's GPU compiler fuses that
dequantization into its own GEMM (then it reads 4-bit weights at its bf16 dot's rate) or materializes the bf16
weight first (then it costs more than the bf16 dot). With ``bf16 dot`` of the same shape as the baseline, at M = 1
and 16.

Each line: median µs per call over rotating buffers (> 2x L2), the weight bytes read per second, and (dot and
kernel rungs) the relative error against float64 NumPy / the XLA path. Not a kernel of the library; nothing in
``jaxquant`` uses it.

Usage::

    python benchmarks/stream_probe.py                 # on a GPU: every rung
    python benchmarks/stream_probe.py --rungs dot,int4,mosaic,xla
    python benchmarks/stream_probe.py --dry-run       # CPU: a 256x256 weight through the Pallas interpreter
    python benchmarks/stream_probe.py --sass          # CPU: the dot rungs' static sm_90 profile
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any

# run from the repository root without installing: python benchmarks/stream_probe.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from benchmarks.kernels import L2_BYTES, time_per_call
from pallas_kernels._common import BlockConfig, compiler_params

__all__ = ["main", "stream_dot", "stream_sum", "to_int4", "xla_s4_matmul"]

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


#: the ladder's pipelined rungs: (form, nibbles, BN output columns, BK byte rows, split-K, warps, stages); 16 activation
#: rows. Forms: "kn" the (K, N) bytes as stored for the int4 kernel, "nk" the same weight stored K-major (N, K),
#: "words" (K, N/4) uint32 words whose four bytes feed four dots. ``nibbles``: each byte's two 4-bit codes feed two
#: dots (an int4 kernel without its scales)
DOT_CASES = [
    ("kn", False, 64, 64, 4, 4, 5),  # the int4 H200 table row's weight tile (16x64x128, split 4, 5 stages)
    ("kn", False, 128, 64, 8, 8, 3),  # the fastest swept int4 config's weight tile (16x128x128, split 8, 8 warps)
    ("kn", False, 128, 64, 8, 4, 4),
    ("kn", True, 64, 64, 4, 4, 5),
    ("kn", True, 128, 64, 8, 8, 3),
    ("words", False, 64, 64, 4, 4, 4),  # the same 64x64 bytes as 64x16 words
    ("words", False, 128, 64, 8, 4, 4),
    ("nk", False, 64, 64, 4, 4, 4),
    ("nk", False, 128, 64, 8, 4, 3),
    ("nk", True, 64, 64, 4, 4, 4),
    ("nk", True, 128, 64, 8, 4, 3),
    ("nk", True, 64, 128, 4, 4, 4),
    ("nk", True, 128, 128, 4, 8, 3),
]

#: the ``mosaic`` rungs: (bits, M, split-K, pipeline steps in flight); 64-row tiles, K steps of 128 rows (8 bits: 128
#: bytes; 4 bits: 64 bytes, one g128 group); M = 1: the GEMV, M = 16: the transposed wgmma dot
MOSAIC_CASES = [
    (8, 1, 4, 4),
    (8, 1, 2, 4),
    (8, 1, 8, 3),
    (4, 1, 4, 4),
    (4, 1, 8, 6),
    (4, 1, 2, 6),
    (4, 1, 1, 6),
    (4, 16, 4, 4),
    (4, 16, 8, 6),
    (8, 16, 4, 4),
]

#: the forms of :func:`stream_dot`
FORMS = ("kn", "nk", "words")


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


def _dot_kernel(x_ref, w_ref, o_ref, *, bk: int, bn: int, steps: int, form: str, nibbles: bool, kp: int):
    j, s = pl.program_id(0), pl.program_id(1)
    mx = x_ref.shape[0]
    width = bn // 4 if form == "words" else bn  # output columns per dot
    contract = (((1,), (1,)), ((), ())) if form == "nk" else (((1,), (0,)), ((), ()))

    def tiles(k0):  # (weight tile as bf16, activation column offset) pairs
        if form == "words":
            wt = w_ref[pl.ds(k0, bk), pl.ds(j * width, width)]
            return [
                ((jax.lax.shift_right_logical(wt, jnp.array(8 * q, wt.dtype)) & 0xFF).astype(jnp.int32), 0)
                for q in range(4)
            ]
        wt = w_ref[pl.ds(j * bn, bn), pl.ds(k0, bk)] if form == "nk" else w_ref[pl.ds(k0, bk), pl.ds(j * bn, bn)]
        if not nibbles:
            return [(wt, 0)]
        return [(wt & 0xF, 0), (jax.lax.shift_right_logical(wt, jnp.array(4, wt.dtype)), kp)]

    def body(t, accs):
        k0 = (s * steps + t) * bk
        out = []
        for acc, (wt, off) in zip(accs, tiles(k0)):
            xt = x_ref[:, pl.ds(off + k0, bk)]
            wb = wt.astype(jnp.bfloat16)
            out.append(acc + jax.lax.dot_general(xt, wb, contract, preferred_element_type=jnp.float32))
        return tuple(out)

    parts = 4 if form == "words" else (2 if nibbles else 1)
    accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros((mx, width), jnp.float32) for _ in range(parts)))
    if form == "words":
        for q, acc in enumerate(accs):
            o_ref[pl.ds(s * mx, mx), pl.ds(j * bn + q * width, width)] = acc
    else:
        o_ref[pl.ds(s * mx, mx), pl.ds(j * bn, bn)] = sum(accs[1:], accs[0])


@functools.partial(jax.jit, static_argnames=("cfg", "form", "nibbles", "interpret"))
def stream_dot(
    x: jax.Array, w: jax.Array, cfg: BlockConfig, form: str = "kn", nibbles: bool = False, interpret: bool = False
) -> jax.Array:
    """``(split_k * R, N)`` float32 partial products of bf16 activations ``x`` (R rows) with the bytes of ``w``, one
    ``(R, N)`` block per K split: the least a fused kernel does with its weight tiles (Triton pipelines the tile
    loads through shared memory because they feed a dot, then converts the bytes to bf16).

    ``form`` (of :data:`FORMS`) says how ``w`` holds a ``(Kp, N)`` byte matrix ``B``: ``"kn"`` ``(Kp, N)`` uint8;
    ``"nk"`` its transpose ``(N, Kp)`` uint8 (K-major: each column's bytes contiguous); ``"words"`` ``(Kp, N/4)``
    uint32, each word's byte ``q`` (little end first) feeding a separate dot, so that output column
    ``j * block_n + q * block_n / 4 + c`` of program ``j`` is the product with byte ``q`` of word column
    ``j * block_n / 4 + c`` (:func:`word_columns`). The result is ``x @ B`` (``x``: ``(R, Kp)``), or with
    ``nibbles`` ``x[:, :Kp] @ (B & 15) + x[:, Kp:] @ (B >> 4)`` (``x``: ``(R, 2 Kp)``; not for words). ``block_k``
    counts byte rows, ``block_n`` output columns; Kp and N must divide evenly."""
    if form not in FORMS:
        raise ValueError(f"stream_dot: form must be one of {FORMS}, got {form!r}")
    want = jnp.uint32 if form == "words" else jnp.uint8
    if w.dtype != want or w.ndim != 2 or x.ndim != 2:
        raise ValueError(f"stream_dot: form {form!r} needs 2-D {jnp.dtype(want).name} w, got {w.dtype}{w.shape}")
    if nibbles and form == "words":
        raise ValueError("stream_dot: nibbles are for byte forms only")
    kp, n = (w.shape[1], w.shape[0]) if form == "nk" else (w.shape[0], w.shape[1] * (4 if form == "words" else 1))
    if x.shape[1] != kp * (2 if nibbles else 1):
        raise ValueError(f"stream_dot: x {x.shape} does not match {kp} byte rows{' (two nibbles each)' * nibbles}")
    bk, bn, split = cfg.block_k, cfg.block_n, cfg.split_k
    if n % bn or kp % (bk * split) or (form == "words" and bn % 64):
        raise ValueError(f"stream_dot: ({kp}, {n}) does not divide into {split} x ({bk}, {bn}) tiles")
    kernel = functools.partial(_dot_kernel, bk=bk, bn=bn, steps=kp // (bk * split), form=form, nibbles=nibbles, kp=kp)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split * x.shape[0], n), jnp.float32),
        grid=(n // bn, split),
        compiler_params=compiler_params(cfg),
        interpret=interpret,
        name="stream_dot",
    )(x, w)


def word_columns(n: int, block_n: int) -> np.ndarray:
    """For :func:`stream_dot` over ``uint32`` words: the byte column of ``w`` behind each output column."""
    out = np.arange(n)
    j, r = out // block_n, out % block_n
    q, c = r // (block_n // 4), r % (block_n // 4)
    return 4 * (j * (block_n // 4) + c) + q


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU: a 256x256 weight through the Pallas interpreter")
    p.add_argument("--k", type=int, default=8192, help="K of the int4 weight (packed rows: K / 2)")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument(
        "--rungs",
        default="sum,dot,int4,mosaic,xla",
        help="comma-separated subset of: sum (unpipelined column sums), dot (pipelined dots on the bytes), int4 (the "
        "library's kernel), mosaic (the Mosaic GPU kernels on the K-major bytes), xla (XLA's dot on the codes as "
        "jnp.int4, no Pallas)",
    )
    p.add_argument("--out", help="also write the printed lines (with date, commit, device and command) to this file")
    p.add_argument(
        "--sass",
        action="store_true",
        help="no timing: print the rungs' static sm_90 profile (CPU only; needs PyPI triton, the dev extra)",
    )
    a = p.parse_args(argv)
    rungs = set(a.rungs.split(","))
    if not rungs or not rungs <= {"sum", "dot", "int4", "mosaic", "xla"}:
        p.error(f"--rungs takes a comma-separated subset of sum,dot,int4,mosaic,xla, got {a.rungs!r}")
    if a.k < 2 or a.n < 4 or a.k % 2 or a.n % 4:
        p.error("--k must be even and positive, --n a positive multiple of 4 (the uint32 view)")
    if a.sass:
        from pallas_kernels import _triton_tools as tt

        if not tt.triton_available():
            p.error("--sass needs PyPI triton (pip install -e '.[dev]')")
        print(sass_table(a.k, a.n))
        return 0
    if a.out:
        import datetime

        from benchmarks.provenance import git_commit

        _OUT["path"], _OUT["lines"] = a.out, []
        _OUT["head"] = (
            f"# Pallas-Triton streaming ladder on {jax.devices()[0].device_kind} (`benchmarks/stream_probe.py`)\n\n"
            f"- date (UTC): {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}\n"
            f"- commit: {git_commit()}; JAX {jax.__version__}\n"
            f"- command: `python benchmarks/stream_probe.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        )
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
    _emit(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}: {nbytes / 1e6:.1f} MB packed int4 weight "
          f"(K={k}, N={n}), {nb} rotating buffers")  # fmt: skip
    f_xla = jax.jit(lambda wl: [jnp.sum(w.astype(jnp.int32), axis=0) for w in wl])
    t = time_per_call(f_xla, (ws,), calls, trials) / nb
    _emit(f"xla column sum: {1e6 * t:.1f} us, {nbytes / t / 1e12:.2f} TB/s")
    for dt, bn, bk, split, warps, stages in CASES if "sum" in rungs else []:
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
            _emit(f"{name}: {1e6 * t:.1f} us, {nbytes / t / 1e12:.2f} TB/s{'' if ok else '  WRONG SUM'}")
        except Exception as e:  # one failing config must not hide the others
            _emit(f"{name}: FAILED {type(e).__name__}: {str(e)[:200]}")
    if "dot" in rungs:
        _dot_rungs(a.dry_run, ws, words, nbytes, calls, trials)
    if "int4" in rungs:
        _int4_rungs(a.dry_run, ws, nbytes, calls, trials)
    if "mosaic" in rungs:
        _mosaic_rungs(a.dry_run, ws, nbytes, calls, trials)
    if "xla" in rungs:
        _xla_rungs(ws, nbytes, calls, trials)
    return 0


def to_int4(packed: jax.Array, nk: bool = False) -> jax.Array:
    """The ``(K/2, N)`` uint8 storage of ``IntScheme(4)`` codes (row ``2r`` in the low nibble of byte ``r``, row
    ``2r + 1`` in the high one; symmetric offset 8) as the signed values ``c - 8`` in a ``jnp.int4`` array: ``(K, N)``,
    or ``(N, K)`` with ``nk``."""
    if packed.dtype != jnp.uint8 or packed.ndim != 2:
        raise ValueError(f"to_int4: expected a 2-D uint8 array, got {packed.dtype} {packed.shape}")
    from jaxquant.core.packing import unpack

    v = unpack(packed, 4, 2 * packed.shape[0]).astype(jnp.int8) - 8
    return (v.T if nk else v).astype(jnp.int4)


def xla_s4_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, nk: bool = False) -> jax.Array:
    """``x @ (w * s)`` written for XLA to fuse: ``w`` a ``jnp.int4`` array ``(K, N)`` (or ``(N, K)`` with ``nk``),
    ``scale`` ``(G, N)`` with ``G`` dividing ``K`` (``G = 1``: per channel) in the activation dtype. The dequantized
    weight ``convert(w) * broadcast(s)`` appears only as the dot's operand; the result is in ``x.dtype``."""
    g, n = scale.shape
    k = w.shape[1] if nk else w.shape[0]
    if w.dtype != jnp.int4 or (w.shape[0] if nk else w.shape[1]) != n or k % g or x.shape[-1] != k:
        raise ValueError(f"xla_s4_matmul: x {x.shape}, w {w.dtype} {w.shape} (nk={nk}), scale {scale.shape} do not fit")
    wf = w.astype(x.dtype)
    if nk:
        wd = (wf.reshape(n, g, k // g) * scale.T[:, :, None]).reshape(n, k)
        return jax.lax.dot_general(x, wd, (((1,), (1,)), ((), ())))
    wd = (wf.reshape(g, k // g, n) * scale[:, None, :]).reshape(k, n)
    return jnp.dot(x, wd)


def sass_table(k: int = 8192, n: int = 8192, arch: int = 90) -> str:
    """Markdown: the static sm_``arch`` profile of every :data:`DOT_CASES` rung (compiled on the CPU with PyPI
    triton, no GPU): K-loop instructions per trip and per weight, shared-memory loads per trip by kind,
    conversions, registers, resident blocks per SM and waves."""
    from pallas_kernels import _triton_tools as tt

    kp = k // 2
    out = [
        "| rung | BN x BK bytes, split, warps, stages | instr/trip | instr/weight | shared-memory loads per trip "
        "| conversions/trip | registers | blocks/SM (bound), waves |",
        "|---|---|---:|---:|---|---:|---:|---|",
    ]
    for form, nibbles, bn, bk, split, warps, stages in DOT_CASES:
        shape = {"kn": (kp, n), "nk": (n, kp), "words": (kp, n // 4)}[form]
        w = jax.ShapeDtypeStruct(shape, jnp.uint32 if form == "words" else jnp.uint8)
        x = jax.ShapeDtypeStruct((16, kp * (2 if nibbles else 1)), jnp.bfloat16)
        cfg = BlockConfig(16, bn, bk, split_k=split, num_warps=warps, num_stages=stages)
        fn = functools.partial(stream_dot, cfg=cfg, form=form, nibbles=nibbles)
        call = tt.triton_calls(tt.export_cuda(fn, x, w))[0]
        sass, cubin = tt.sass_and_report(tt.ir_text(call.ir), arch, call.num_warps, call.num_stages)
        prof = tt.k_loop_profile(sass, kp // (bk * split))
        blocks, bind = tt.occupancy(cubin.n_regs, cubin.shared_bytes or 0, warps, arch)
        weights = bk * bn * (2 if nibbles else 1)
        lds = ", ".join(f"{op} {c}" for op, c in prof.counts.items() if op.startswith("LDS"))
        conv = sum(prof.count(op) for op in ("I2F", "F2F", "I2I", "F2I"))
        waves = call.grid[0] * call.grid[1] / max(blocks * 132, 1)
        out.append(
            f"| {form}{' nibbles' if nibbles else ''} | {bn}x{bk}, {split}, {warps}, {stages} | {prof.instructions} "
            f"| {prof.instructions * 32 * warps / weights:.2f} | {lds} | {conv} | {cubin.n_regs} "
            f"| {blocks} ({bind}), {waves:.2f} |"
        )
    return "\n".join(out)


#: with ``--out``: the file the printed lines are also written to (rewritten after each line), and its header
_OUT: dict[str, Any] = {"path": None, "head": "", "lines": []}


def _emit(line: str) -> None:
    """Print one result line; with ``--out`` also rewrite the results file (atomically: a run cut short leaves
    every line printed so far)."""
    print(line, flush=True)
    if _OUT["path"]:
        from jaxquant.files import atomic_write

        _OUT["lines"].append(line)
        atomic_write(_OUT["path"], _OUT["head"] + "```\n" + "\n".join(_OUT["lines"]) + "\n```\n", mode=0o644)


def _report(name: str, t: float, nbytes: int, err: float, bound: float) -> None:
    flag = "" if err <= bound else f"  WRONG (rel err {err:.1e} > {bound:g})"
    _emit(f"{name}: {1e6 * t:.1f} us, {nbytes / t / 1e12:.2f} TB/s, rel err {err:.1e}{flag}")


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _dot_rungs(dry_run: bool, ws: list, words: list, nbytes: int, calls: int, trials: int) -> None:
    """The pipelined rungs: :func:`stream_dot` over the same bytes (and their K-major copy), 16 activation rows, vs
    float64 NumPy."""
    rows, n = ws[0].shape
    nk = [jnp.asarray(w.T) for w in ws]  # the K-major copy of the same bytes
    key = jax.random.PRNGKey(1)
    xs = [
        jax.random.normal(jax.random.fold_in(key, b), (16, 2 * rows), jnp.float32).astype(jnp.bfloat16)
        for b in range(len(ws))
    ]
    x64, b64 = np.asarray(xs[0], np.float64), np.asarray(ws[0], np.int64)
    want_bytes = x64[:, :rows] @ b64
    want_nibbles = x64[:, :rows] @ (b64 & 15) + x64[:, rows:] @ (b64 >> 4)
    for form, nibbles, bn, bk, split, warps, stages in DOT_CASES:
        src = {"kn": ws, "nk": nk, "words": words}[form]
        if dry_run:
            bn, bk, split = min(bn, 64 if form == "words" else n), min(bk, rows // 2), min(split, 2)
        cfg = BlockConfig(block_m=16, block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=stages)
        name = f"dot {form}{' nibbles' if nibbles else ''} {bn}x{bk}/{split} w{warps} s{stages}"
        xl = xs if nibbles else [x[:, :rows] for x in xs]
        try:
            f = jax.jit(
                lambda xl, wl, cfg=cfg, form=form, nib=nibbles: [
                    stream_dot(x, w, cfg, form, nib, dry_run) for x, w in zip(xl, wl)
                ]
            )
            got = np.asarray(f(xl[:1], src[:1])[0], np.float64).reshape(split, 16, n).sum(axis=0)
            want = want_nibbles if nibbles else want_bytes
            if form == "words":
                want = want[:, word_columns(n, bn)]
            t = time_per_call(f, (xl, src), calls, trials) / len(ws)
            _report(name, t, nbytes, _rel_err(got, want), 1e-5)
        except Exception as e:  # one failing config must not hide the others
            _emit(f"{name}: FAILED {type(e).__name__}: {str(e)[:200]}")


def _int_matmul_rung(name: str, layout, cfg, scale, xs: list, wl: list, dry_run: bool, nbytes: int, calls: int,
                     trials: int) -> None:  # fmt: skip
    """Time the library's ``int_matmul`` with ``cfg`` over the rotating ``(xs, wl)`` and report it against the XLA
    path (``int_matmul_reference``); a config the kernel refuses, or any failure, prints as FAILED."""
    from pallas_kernels import int4_matmul as km

    try:
        why = km.supported(layout, cfg, xs[0].dtype, xs[0].shape[0])
        if why:
            raise ValueError(why)

        def f(xl, wl):
            return [km.int_matmul(x, w, scale, None, layout=layout, config=cfg, interpret=dry_run)
                    for x, w in zip(xl, wl)]  # fmt: skip

        f = jax.jit(f)
        want = np.asarray(km.int_matmul_reference(xs[0], wl[0], scale, None, layout), np.float64)
        got = np.asarray(f(xs[:1], wl[:1])[0], np.float64)
        t = time_per_call(f, (xs, wl), calls, trials) / len(wl)
        _report(name, t, nbytes, _rel_err(got, want), 1e-2)
    except Exception as e:  # one failing config must not hide the others
        _emit(f"{name}: FAILED {type(e).__name__}: {str(e)[:200]}")


def _int4_rungs(dry_run: bool, ws: list, nbytes: int, calls: int, trials: int) -> None:
    """The top rung: the library's int4 g128 kernel on the same bytes (as packed codes), at M = 1 and 16, with this
    device's table config and the fastest config of the H200 sweep, vs its XLA path."""
    from pallas_kernels import int4_matmul as km
    from pallas_kernels import tuning

    rows, n = ws[0].shape
    k = 2 * rows
    group = 128 if k % 128 == 0 else None
    layout = km.IntLayout(bits=4, mode="sym", k=k, n=n, group_size=group)
    scale = jnp.full((k // 128 if group else 1, n), 0.01, jnp.bfloat16)
    best = BlockConfig(16, 128, 128, split_k=8, num_warps=8, num_stages=3, variant="split+postscale")
    for m in (1, 16):
        key = jax.random.fold_in(jax.random.PRNGKey(2), m)
        xs = [
            jax.random.normal(jax.random.fold_in(key, b), (m, k), jnp.float32).astype(jnp.bfloat16)
            for b in range(len(ws))
        ]
        for label, cfg in (("table", tuning.get_config("int4", m, k, n)), ("sweep-best", best)):
            if dry_run:
                cfg = BlockConfig(16, 64, 128, split_k=2, num_warps=4, num_stages=3, variant=cfg.variant)
            name = f"int4 kernel M={m} {label} {cfg.block_m}x{cfg.block_n}x{cfg.block_k}/{cfg.split_k} {cfg.variant}"
            _int_matmul_rung(name, layout, cfg, scale, xs, ws, dry_run, nbytes, calls, trials)


def _mosaic_rungs(dry_run: bool, ws: list, nbytes: int, calls: int, trials: int) -> None:
    """The Mosaic GPU kernels (``int_matmul`` variants ``mosaic-gemv+postscale`` at M = 1, ``mosaic-dot`` at
    M = 16) on the K-major copy of the same bytes, read as int8 codes (per-channel scales) and as int4 g128 codes, vs
    the XLA path."""
    from pallas_kernels import int4_matmul as km
    from pallas_kernels import int_matmul_mosaic as mosaic

    rows, n = ws[0].shape
    nk = [jnp.asarray(w.T) for w in ws]
    key = jax.random.PRNGKey(4)
    for bits, m, split, inflight in MOSAIC_CASES:
        k = 2 * rows if bits == 4 else rows
        group = 128 if bits == 4 else None
        if dry_run:
            split = max(1, min(split, k // 256))
        layout = km.IntLayout(bits=bits, mode="sym", k=k, n=n, group_size=group, nk=True)
        variant = mosaic.GEMV if m == 1 else mosaic.DOT
        cfg = BlockConfig(m, mosaic.BLOCK_N, 128, split_k=split, num_warps=4, num_stages=inflight, variant=variant)
        wl = nk if bits == 4 else [jax.lax.bitcast_convert_type(w, jnp.int8) for w in nk]
        scale = jax.random.uniform(jax.random.fold_in(key, bits), (k // group if group else 1, n), jnp.float32, 0.005,
                                   0.02).astype(jnp.bfloat16)  # fmt: skip
        xs = [
            jax.random.normal(jax.random.fold_in(key, 10 * bits + b), (m, k), jnp.float32).astype(jnp.bfloat16)
            for b in range(len(ws))
        ]
        kind = "gemv" if m == 1 else f"dot M={m}"
        name = f"mosaic {kind} nk {'int4 g128' if bits == 4 else 'int8 channel'} 64x128/{split} in-flight {inflight}"
        _int_matmul_rung(name, layout, cfg, scale, xs, wl, dry_run, nbytes, calls, trials)


def _xla_rungs(ws: list, nbytes: int, calls: int, trials: int) -> None:
    """No Pallas: the same codes as ``jnp.int4`` arrays through :func:`xla_s4_matmul` (``(K, N)`` and K-major, group
    128 and per channel), against a bf16 ``jnp.dot`` of the same shape, at M = 1 and 16, vs float64 NumPy."""
    rows, n = ws[0].shape
    k = 2 * rows
    key = jax.random.PRNGKey(3)
    groups = [g for g in (k // 128, 1) if g >= 1 and k % g == 0 and (g == 1 or k // g == 128)]
    scales = {g: jax.random.uniform(jax.random.fold_in(key, g), (g, n), jnp.float32, 0.005, 0.02) for g in groups}
    w4 = {nk: [jax.block_until_ready(to_int4(w, nk)) for w in ws] for nk in (False, True)}
    c64 = np.asarray(to_int4(ws[0]).astype(jnp.int8), np.float64)  # (K, N) values c - 8
    bf = [jax.random.normal(jax.random.fold_in(key, 100 + b), (k, n), jnp.bfloat16) for b in range(len(ws))]
    for m in (1, 16):
        xs = [
            jax.random.normal(jax.random.fold_in(key, 1000 * m + b), (m, k), jnp.float32).astype(jnp.bfloat16)
            for b in range(len(ws))
        ]
        x64 = np.asarray(xs[0], np.float64)
        f = jax.jit(lambda xl, wl: [jnp.dot(x, w) for x, w in zip(xl, wl)])
        try:
            got = np.asarray(f(xs[:1], bf[:1])[0], np.float64)
            t = time_per_call(f, (xs, bf), calls, trials) / len(ws)
            _report(
                f"xla bf16 dot M={m} (4x the bytes)",
                t,
                4 * nbytes,
                _rel_err(got, x64 @ np.asarray(bf[0], np.float64)),
                1e-2,
            )
        except Exception as e:  # one failing rung must not hide the others
            _emit(f"xla bf16 dot M={m}: FAILED {type(e).__name__}: {str(e)[:200]}")
        for nk in (False, True):
            for g in groups:
                s = scales[g].astype(jnp.bfloat16)
                s64 = np.repeat(np.asarray(s, np.float64), k // g, axis=0)
                want = x64 @ (c64 * s64)
                name = f"xla s4 {'nk' if nk else 'kn'} {'channel' if g == 1 else f'g{k // g}'} M={m}"
                try:
                    f = jax.jit(lambda xl, wl, s=s, nk=nk: [xla_s4_matmul(x, w, s, nk) for x, w in zip(xl, wl)])
                    got = np.asarray(f(xs[:1], w4[nk][:1])[0], np.float64)
                    t = time_per_call(f, (xs, w4[nk]), calls, trials) / len(ws)
                    _report(name, t, nbytes, _rel_err(got, want), 1e-2)
                except Exception as e:  # one failing rung must not hide the others
                    _emit(f"{name}: FAILED {type(e).__name__}: {str(e)[:200]}")


if __name__ == "__main__":
    sys.exit(main())
