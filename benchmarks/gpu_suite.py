"""One command for a lent GPU: correctness checks of every kernel on the device, then the kernel benchmark.

Writes ``benchmarks/results/<device>.md`` (date, commit, JAX version, device, ceilings, correctness table,
benchmark table) and ``<device>.jsonl`` (raw rows); when ``$OUT`` is set (the device tool's return folder) the
same files are copied there. Every section runs in its own subprocess with a timeout, so a kernel that fails
to compile, crashes the process or hangs costs only its own section; the suite keeps a total time budget and
skips (and reports) what no longer fits.

Usage (from the repository root, nothing to install beyond jax; PYTHONPATH=. is set by the script itself)::

    python benchmarks/gpu_suite.py                      # ~5 minutes on an H100
    python benchmarks/gpu_suite.py --budget-s 240 --tune
    python benchmarks/gpu_suite.py --dry-run            # CPU: tiny shapes through the Pallas interpreter
    python benchmarks/gpu_suite.py --quick              # ~1-2 min: benchmarks/gpu_quick.py (GEMV + dispatch)

Sections: ``env`` (devices, versions), ``ceilings`` (copy bandwidth, bf16 matmul rate), ``check`` (each kernel
vs the XLA path and float64 NumPy on ragged shapes, M=1, both activation dtypes, run twice to expose races),
``bench:<kernel>`` (benchmarks/kernels.py), optionally ``tune`` (a few block configs of the int4 kernel) and,
with ``--tune-variants``, ``tune_kernels`` (fp8 W8A8 at M=K=N=8192, LLM.int8 at M=4096, ternary, W1.58A8, NF4 and
int8 W8A16 variants: ``TUNE_KERNEL_CONFIGS``), and ``trace`` after the benchmark (``--trace-budget-s``, default 40;
0 skips it): one call of each main kernel at ``--trace-m`` under the profiler, the device kernels it launches and
their times (``benchmarks/device_trace.py``). ``--wall-s`` bounds the whole run (a device's per-call limit): section
timeouts are clipped so that the report is written in time, and it is rewritten after every section. The report
ends with the ``pallas_kernels/tuning.py`` changes its measurements support (``benchmarks/propose_tuning.py``:
limits, dequant-dot starts, faster table rows, each with its evidence), to read before pasting.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.provenance import git_commit  # noqa: E402

# (kernel, M values, KxN values, seconds budget): the five main kernels first, at the shapes their goals name
# M = 64 (32 for NF4, 128 for int4): the inferred dispatch limits of session 10 (pallas_kernels/tuning.py LIMITS)
PLAN = [
    ("int4_g128", "1,16,128,256,4096", "4096x4096,8192x8192", 70),  # M >= 256 also times qdot_dequant_dot
    # int4 codes stored K-major (session 12): the split dot reads its weight tiles by ldmatrix, not byte by byte; right
    # after the (K, N) rows, so that a short run still compares the two
    ("int4_g128_nk", "1,16,128", "8192x8192", 20),
    ("nf4", "1,16,32,4096", "8192x8192", 32),  # M=4096 also times qdot_dequant_dot
    # the 8-bit schemes in the layout their tensor-core dots read (K-major, converted once at quantization time)
    ("int8_outlier_nk", "1,16,4096", "8192x8192", 25),
    ("fp8_w8a8_nk", "1,16,64,8192", "8192x8192", 27),
    ("ternary_w158a8", "1,16,64,4096", "8192x8192", 27),
    ("int8_outlier", "1,16", "8192x8192", 12),  # (K, N) storage, as measured in session 2
    ("fp8_w8a8", "1,16", "8192x8192", 12),
    ("int4_g128_asym", "1,16", "8192x8192", 12),
    ("int8_w8a16", "1,16,64", "8192x8192", 17),
    ("fp8_w8a16", "1,16,64", "8192x8192", 17),
    ("ternary", "1,16,64", "8192x8192", 17),
    # dense widths: the GEMV (M <= 8) and the chunk dot (M = 16, 64); asym: GPTQ's 3-bit scheme
    ("int3_g128_asym", "1,4,8,16,64", "8192x8192", 14),
    ("int6_g128_asym", "1,4,16", "8192x8192", 10),  # the same kernels, 6 words per chunk
]


# -------------------------------------------------------------------------------------------------
# sections (each runs in a child process: python benchmarks/gpu_suite.py --section NAME --result FILE)
# -------------------------------------------------------------------------------------------------
def section_env(args) -> dict[str, Any]:
    import jax

    d = jax.devices()[0]
    from pallas_kernels.tuning import device_key

    return {
        "jax": jax.__version__,
        "python": sys.version.split()[0],
        "backend": jax.default_backend(),
        "device_kind": d.device_kind,
        "device_key": device_key(d.device_kind) if jax.default_backend() == "gpu" else "cpu-dry-run",
        "num_devices": len(jax.devices()),
        "core_count": getattr(d, "core_count", None),
    }


def section_ceilings(args) -> dict[str, Any]:
    from benchmarks.kernels import measure_ceilings

    return measure_ceilings(interpret=args.dry_run)


def _check_cases(dry: bool):
    """(M, K, N, activation dtype): M=1, ragged M/N, a large-M tile path, float16 once."""
    import jax.numpy as jnp

    if dry:
        return [(1, 256, 96, jnp.bfloat16), (5, 192, 80, jnp.float16)]
    return [(1, 512, 384, jnp.bfloat16), (5, 640, 320, jnp.float16), (300, 2048, 768, jnp.bfloat16)]


def section_check(args) -> dict[str, Any]:
    """Each kernel through ``jq.qdot`` (kernels forced on) vs the XLA path and float64 NumPy."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxquant as jq
    from benchmarks.kernels import SPECS, _activations, _direct_fn
    from jaxquant.ops import explain_qdot, kernel_mode

    # "on": kernels forced on the GPU, also above the tuned M limits (where "auto" now takes the XLA path)
    mode = "interpret" if args.dry_run else "on"
    rows = []
    names = [n for n in args.kernels.split(",") if n]
    for name in names:
        spec = SPECS[name]
        for m, k, n, dt in _check_cases(args.dry_run):
            row: dict[str, Any] = {"kernel": name, "m": m, "k": k, "n": n, "dtype": jnp.dtype(dt).name}
            row["key"] = f"{name}:{m}:{k}:{n}:{row['dtype']}"
            if row["key"] in _skips(args):
                continue
            _mark(args, row)
            t0 = time.time()
            try:
                key = jax.random.PRNGKey(m + 3 * k + 7 * n)
                w = jax.random.normal(key, (k, n), jnp.float32) * 0.05
                q = jq.quantize(w, spec.scheme())
                x = _activations(spec.activations, jax.random.fold_in(key, 2), m, k).astype(dt)
                op = jq.qdot if spec.direct is None else _direct_fn(spec, args.dry_run)
                with kernel_mode(mode):
                    row["path"] = explain_qdot(x, q) if spec.direct is None else f"direct {spec.direct}"
                    f = jax.jit(op)
                    y1 = np.asarray(f(x, q), np.float64)
                    y2 = np.asarray(f(x, q), np.float64)
                with kernel_mode("off"):  # the same function through XLA
                    yx = np.asarray(jax.jit(op)(x, q), np.float64)
                wd = np.asarray(jq.dequantize(q).astype(dt), np.float64)
                y64 = np.asarray(x, np.float64) @ wd
                nrm = max(np.linalg.norm(y64), 1e-30)
                row["rel_err_vs_f64"] = float(np.linalg.norm(y1 - y64) / nrm)
                row["rel_err_vs_xla"] = float(np.linalg.norm(y1 - yx) / max(np.linalg.norm(yx), 1e-30))
                row["xla_rel_err_vs_f64"] = float(np.linalg.norm(yx - y64) / nrm)
                row["deterministic"] = bool(np.array_equal(y1, y2))
                row["finite"] = bool(np.isfinite(y1).all())
                # kernel and XLA path compute the same function (bf16/f16 output, summation order differ):
                # <= 1e-2; vs float64 x @ dequant(W): 1e-2 for weight-only kernels, 6e-2 where the
                # activations are quantized too (LLM.int8, W8A8, W1.58A8)
                quant_act = spec.direct is not None or spec.activations != "normal"
                row["ok"] = bool(
                    row["finite"]
                    and row["deterministic"]
                    and row["rel_err_vs_xla"] <= 1e-2
                    and row["rel_err_vs_f64"] <= (6e-2 if quant_act else 1e-2)
                    and row["path"].startswith(("kernel", "direct"))
                )
            except Exception as e:
                row["ok"] = False
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                traceback.print_exc()
            row["seconds"] = round(time.time() - t0, 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
            _write_partial(args.result, {"rows": rows})
    return {"rows": rows}


def section_bench(args) -> dict[str, Any]:
    from benchmarks import kernels as kb

    rows_file = args.result + ".rows"
    argv = [
        "--kernels",
        args.kernels,
        "--json",
        rows_file,
        "--budget-s",
        str(args.budget_s),
        "--m",
        args.m,
        "--kn",
        args.kn,
    ]
    if args.ceilings:
        argv += ["--ceilings", args.ceilings]
    if args.skip:
        argv += ["--skip", args.skip]
    if args.marker:
        argv += ["--marker", args.marker]
    if args.dry_run:
        argv.append("--cpu-interpret")
    kb.main(argv)
    return {"rows": _read_rows(rows_file)}


#: variants timed by ``--tune-variants`` on the best measured tiles (H100, 8192^2, M=1: 34.1-35.6 us); static K-loop
#: instructions per trip for sm_90 (16x64x128, split 4, 4 warps, 3 stages, float32 scales; compiled on the CPU):
#: interleave 654, split 416, split+postscale 301, strided+postscale 349, interleave+postscale 502. All 30
#: candidates compile for sm_90 at K=N=8192, M=1 and 16 (88-129 registers, no spills).
TUNE_VARIANTS = ("interleave", "split", "split+postscale", "strided+postscale", "interleave+postscale")
TUNE_VARIANT_TILES = (
    (16, 64, 128, 4, 4, 3),
    (16, 64, 128, 8, 4, 3),
    (16, 128, 128, 8, 8, 3),
)
#: no split-K (the kernel writes the bf16 output itself: no XLA partial-sum pass, one launch): 32-wide N tiles give
#: 256 programs at N=8192 (sm_90 K loop per 4096 weights: split 265, split+postscale 199 instructions, 70-80
#: registers; 16-wide tiles were left out: 403 instructions per 2048 weights)
TUNE_NO_SPLIT_TILES = ((16, 32, 128, 1, 4, 3),)


def _tune_candidates(m: int, wide: bool = False, postscale: bool = False):
    """int4 g128 configs to time per M bucket; each was compiled for sm_90 with PyPI triton on the CPU first
    (some interleave/warp combinations abort Triton with "Illegal shared layout").

    ``wide`` (M <= 16 only): the 54-config grid block_n in {64, 128, 256} x split_k in {4, 8, 16} x warps in
    {4, 8} x stages in {3, 5} x {strided, interleave} (interleave only with block_n=64, or 128 with 8 warps),
    every one compiled for sm_90 at K=N=8192 with PyPI triton 3.9 on the CPU before the first GPU run.
    """
    import itertools

    from pallas_kernels._common import BlockConfig

    if postscale and m <= 16:  # the best measured tiles with every variant of TUNE_VARIANTS, most promising first
        t1, t2, t3 = TUNE_VARIANT_TILES
        (ns,) = TUNE_NO_SPLIT_TILES
        first = [
            (ns, "split+postscale"),
            (t1, "split+postscale"),
            (t1, "split"),
            (ns, "split"),
            (t2, "split+postscale"),
            (t3, "split+postscale"),
            (t1, "interleave"),
            (t2, "split"),
            (t3, "split"),
        ]
        rest = [(t, v) for t in TUNE_VARIANT_TILES for v in TUNE_VARIANTS if (t, v) not in first]
        return [BlockConfig(*t, v) for t, v in first + rest]
    if wide and m <= 16:
        grid = itertools.product((64, 128, 256), (4, 8, 16), (4, 8), (3, 5), ("strided", "interleave"))
        return [
            BlockConfig(16, bn, 128, s, w, st, v)
            for bn, s, w, st, v in grid
            if not (v == "interleave" and (bn == 256 or (bn == 128 and w == 4)))
        ]
    if m <= 16:
        return [
            BlockConfig(16, 64, 128, s, 4, st, v) for s in (2, 4, 8) for st in (3, 5) for v in ("strided", "interleave")
        ] + [BlockConfig(16, 128, 128, 4, 4, 4, "strided"), BlockConfig(16, 32, 128, 4, 4, 4, "strided")]
    if m <= 256:
        return [
            BlockConfig(64, 128, 64, 1, 4, 3, "strided"),
            BlockConfig(64, 128, 128, 1, 4, 3, "strided"),
            BlockConfig(64, 128, 64, 1, 8, 3, "interleave"),
            BlockConfig(64, 64, 128, 2, 4, 4, "strided"),
            BlockConfig(64, 64, 64, 1, 4, 3, "interleave"),
            BlockConfig(128, 128, 64, 1, 8, 3, "interleave"),
        ]
    return [
        BlockConfig(128, 128, 64, 1, 8, 3, "interleave"),
        BlockConfig(128, 128, 128, 1, 8, 3, "interleave"),
        BlockConfig(128, 128, 64, 1, 8, 4, "strided"),
        BlockConfig(64, 128, 64, 1, 8, 3, "interleave"),
        BlockConfig(64, 128, 64, 1, 4, 3, "strided"),
    ]


def section_tune(args) -> dict[str, Any]:
    """Time a few int4 g128 block configs per M; report the best (rows for pallas_kernels/tuning.py)."""
    import jax
    import jax.numpy as jnp

    import jaxquant as jq
    from benchmarks.kernels import time_per_call
    from pallas_kernels import int4_matmul as km
    from pallas_kernels import tuning

    t_start = time.time()
    rows = []
    ms = [1, 16] if args.dry_run else [int(v) for v in args.m.split(",")]
    k, n = (256, 256) if args.dry_run else (int(v) for v in args.tune_kn.split("x"))
    lay = km.IntLayout(bits=4, mode="sym", k=k, n=n, group_size=128)
    data: dict[int, tuple] = {}

    def inputs(m: int):
        if m not in data:
            key = jax.random.PRNGKey(m)
            nb = 2 if args.dry_run else max(3, min(24, (24 if m <= 256 else 3) * 4096 * 4096 // (k * n)))
            qs = [
                jq.quantize(jax.random.normal(jax.random.fold_in(key, b), (k, n)) * 0.02, jq.IntScheme(4, 128))
                for b in range(nb)
            ]
            xs = [jax.random.normal(jax.random.fold_in(key, 100 + b), (m, k), jnp.bfloat16) for b in range(nb)]
            data[m] = (nb, qs, xs, km.int_matmul_reference(xs[0], qs[0].data, qs[0].scale, None, lay))
        return data[m]

    if args.tune_postscale and all(m <= 16 for m in ms):  # candidate-major: each candidate at every M in turn
        cands = _tune_candidates(max(ms), postscale=True)
        cases = [(m, cfg) for cfg in cands for m in ms]
    else:
        cases = [(m, c) for m in ms for c in _tune_candidates(m, wide=args.tune_wide, postscale=args.tune_postscale)]
    done = measured_before(tuning.device_key(), "tune", f"{k}x{n}")
    cases = unmeasured_first(cases, [f"{m}|{cfg!r}" for m, cfg in cases], done)
    for m, cfg in cases:
        if time.time() - t_start > args.budget_s:
            break
        row = {"m": m, "k": k, "n": n, "config": repr(cfg), "key": f"{m}|{cfg!r}"}
        if row["key"] in _skips(args):
            continue
        nb, qs, xs, y_ref = inputs(m)
        _mark(args, row)
        try:
            f = jax.jit(
                lambda xl, ql, cfg=cfg, lay=lay: [
                    km.int_matmul(xi, qi.data, qi.scale, None, layout=lay, config=cfg, interpret=args.dry_run)
                    for xi, qi in zip(xl, ql)
                ]
            )
            row["t"] = time_per_call(f, (xs, qs), 2 if args.dry_run else 10, 1 if args.dry_run else 3) / nb
            y = f(xs[:1], qs[:1])[0].astype(jnp.float32)
            r = y_ref.astype(jnp.float32)
            row["rel_err_vs_xla"] = float(jnp.linalg.norm(y - r) / jnp.maximum(jnp.linalg.norm(r), 1e-30))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
        _write_partial(args.result, {"rows": rows})
    return {"rows": rows}


#: ``--tune-variants`` for the other kernels at M <= 16 (weights and activations of benchmarks/kernels.py): the
#: measured H100/H200 table row (variant "": strided activation loads) against ``split`` (one contiguous activation
#: tile through the software pipeline). sm_90 K loop per trip (benchmarks/kernel_sass.py, compiled on the CPU):
#: ternary W1.58A16 default 396 instructions with 16 exposed global loads and 8 barriers, split 324 with none;
#: W1.58A8 427 / 431, same loads; W1.58A8 ``split+ptx`` (int8 weights from an inline PTX program, 207
#: instructions; first run on real hardware here: adopt only if its rel. error vs the XLA path equals
#: ``split``'s, as in the interpreter). Also split with split-K 8, and a 32-wide tile without split-K (no XLA
#: partial-sum pass; 197 / 261 instructions per half-size trip). int8 W8A16 (2.5x above its memory floor on the
#: H100 with no exposed load in its loop): more programs (split-K 8), wider tiles, the unsplit tile; its
#: ``+postscale`` was left out (475 instructions vs 414, and the scale row load exposed). NF4: the measured table
#: rows (``select-gemv`` M <= 1, ``select`` M <= 64) against their ``-split`` forms (contiguous activation rows:
#: 11 instead of 67 exposed loads per step for the GEMV, 0 instead of 16 for the dot kernel) and the ``prmt``
#: lookup (inline PTX byte permutes; 964 / 745 instructions per trip vs 1432 / 1218 for select). ``prmt`` has
#: run only through its emulator on the CPU: its rel. error vs the XLA path here (equal to ``select``'s of the
#: same tile expected; 0 for the dot kernel) is its first check on real hardware; adopt it only then. Every
#: (kernel, config, M in {1, 16}) case compiled for sm_90 at K=N=8192 on the CPU; a GEMV is timed only at
#: M <= block_m. Each (tile, split, warps, stages, variant).
#: ``(benchmark kernel, BlockConfig fields[, M values])`` in run order, most useful first, until the section's budget
#: ends (cases a saved report of this device already timed at this shape run after the rest: ``measured_before``);
#: without M values: the ``--m`` values <= 16
TUNE_KERNEL_CONFIGS: tuple[tuple[str, tuple[Any, ...]], ...] = (
    # int4 codes stored K-major (IntScheme(layout="nk")): the (K, N) tile is read from shared memory byte by byte
    # (sm_90: 32 LDS.U8 per thread per trip), the K-major one by 2 ldmatrix; the H200 sweep's tiles, both forms
    ("int4_g128_nk", (16, 64, 128, 4, 4, 3, "split")),
    ("int4_g128_nk", (16, 128, 128, 8, 8, 3, "split+postscale")),
    ("int4_g128_nk", (16, 64, 128, 4, 4, 3, "split+postscale")),
    ("int4_g128_nk", (16, 128, 128, 8, 8, 3, "split")),
    # its GEMV: plain 16-byte loads straight into registers (no shared memory, no barrier; sm_90 6.0 / 8.5
    # instructions per weight with / without +postscale at 64x128 tiles: more than the dots, but no smem traffic)
    ("int4_g128_nk", (1, 64, 128, 8, 4, 4, "gemv+postscale")),
    ("int4_g128_nk", (1, 64, 128, 8, 4, 4, "gemv")),
    # K-major with float16 scales, the scale columns that dequantize the tile are 2-byte loads Triton does not
    # pipeline (sm_90: 2 exposed loads per trip, "split"); float32 scales are 4-byte ones it does (0 exposed)
    ("int4_g128_nk_s32", (16, 64, 128, 4, 4, 3, "split")),
    # the same question for 8-bit integer codes: the H200 table row's tile (K, N) took 46.8 / 49.9 us at M = 1 / 16
    # (h200-2026-11-28-rest), and fp8 W8A16 with this tile 45.7 us from (K, N) codes but 25.5 us from (N, K) ones
    ("int8_w8a16_nk", (16, 64, 128, 4, 4, 4, "strided")),
    # NF4, the widest gap to its goal (0.39x bf16 on the H200): the inline-PTX byte-permute lookups, never yet run on
    # a GPU (their rel. error vs the XLA path here is their first on-device check)
    ("nf4", (16, 64, 128, 4, 4, 4, "prmt16-split")),
    ("nf4", (16, 64, 128, 4, 4, 4, "prmt-split")),
    ("nf4", (1, 128, 64, 16, 4, 4, "prmt-split-gemv")),
    # the Mosaic GPU kernels (pallas_kernels/int_matmul_mosaic.py: TMA into a multi-buffered shared-memory pipeline)
    # on the same K-major codes: the GEMV at M = 1, the transposed wgmma dot (M padded to 16 / 64); their first
    # compile and run on a GPU
    ("int4_g128_nk", (1, 64, 128, 4, 4, 4, "mosaic-gemv+postscale")),
    ("int4_g128_nk", (16, 64, 128, 4, 4, 4, "mosaic-dot")),
    ("int4_g128_nk", (1, 64, 128, 8, 4, 6, "mosaic-gemv+postscale")),
    ("int4_g128_nk", (16, 64, 128, 8, 4, 6, "mosaic-dot")),
    ("int8_w8a16_nk", (1, 64, 128, 4, 4, 4, "mosaic-gemv+postscale")),
    ("int8_w8a16_nk", (16, 64, 128, 4, 4, 4, "mosaic-dot")),
    ("int4_g128_nk", (64, 64, 128, 4, 4, 4, "mosaic-dot", (64,))),
    # K-major 8-bit weights (layout="nk"): at M <= 16 the int8 / fp8 mma.sync reads the weight by ldmatrix instead of
    # byte by byte (sm_90 K loop of LLM.int8's 16x64x128 tile: 67 instructions per trip vs 198); at large M no
    # per-call transposed copy
    ("int8_outlier_nk", (16, 64, 128, 4, 4, 4, "")),
    ("int8_outlier_nk", (16, 64, 128, 8, 4, 4, "")),
    ("int8_outlier_nk", (16, 64, 128, 4, 4, 4, "prepass")),
    # no split-K (256 programs of 32 columns fill 132 SMs): no XLA sum after the kernel; with prepass two launches
    ("int8_outlier_nk", (16, 32, 128, 1, 4, 4, "prepass")),
    ("int8_outlier_nk", (16, 32, 128, 1, 4, 4, "")),
    ("fp8_w8a8_nk", (16, 64, 128, 4, 4, 4, "prequant")),  # 140 instructions per trip vs 611 (in-kernel act quant)
    ("fp8_w8a8_nk", (128, 128, 64, 1, 8, 4, "prequant", (8192,))),
    ("int8_outlier_nk", (128, 128, 64, 1, 8, 4, "kmajor", (4096,))),
    ("fp8_w8a16_nk", (16, 64, 128, 4, 4, 4, "")),
    # GEMVs at M=1 with exact integer weights and one scale multiply per step ("+postscale"; not bit-identical to
    # the XLA path): sm_90 int8 W8A16 4.7 thread instructions per weight and 1 conversion (6.6 and 2 for the
    # "gemv" form the H200 timed), below its memory floor; int3 g128 4.6 vs 7.6 for the heuristic's split-gemv
    ("int8_w8a16", (1, 128, 32, 16, 4, 4, "split-gemv+postscale")),
    ("int3_g128", (1, 128, 128, 16, 4, 4, "split-gemv+postscale")),
    ("int3_g128", (1, 128, 128, 16, 4, 4, "split-gemv")),
    # the dense GEMV for 4-8 rows: the session-9 config (4 warps, 256/BM columns; no spills, 4-8 barriers per trip)
    # against the one before (8 warps, 128 columns; 240 bytes of spills at BM=8, 32-64 barriers)
    ("int3_g128_asym", (4, 64, 128, 8, 4, 4, "split-gemv", (4,))),
    ("int3_g128_asym", (4, 128, 128, 16, 8, 4, "split-gemv", (4,))),
    ("int3_g128_asym", (8, 32, 128, 4, 4, 4, "split-gemv", (8,))),
    ("int3_g128_asym", (8, 128, 128, 16, 8, 4, "split-gemv", (8,))),
    # ternary GEMVs at M=1 (sm_90, 8192^2, static instructions per weight): W1.58A8 as an integer GEMV (inline PTX
    # code spreading + dp4a: 2.02, below the memory floor; 2.66 in one launch with the activation quantization
    # inside and no split-K), the float GEMVs (4.67 after the XLA pre-pass, 4.77 in one launch) and W1.58A16 with
    # exact t weights and the rounded scale per step (4.72 vs 7.61 for "split-gemv"). dp4a's first on-device
    # check: adopt only if its output equals the XLA path's (bit-identical in the interpreter)
    ("ternary_w158a8", (1, 128, 64, 16, 4, 4, "dp4a-gemv")),
    ("ternary_w158a8", (1, 32, 512, 1, 4, 4, "dp4a-gemv+xq")),
    ("ternary_w158a8", (1, 32, 512, 1, 4, 4, "split-gemv+xq")),
    ("ternary_w158a8", (1, 128, 64, 16, 4, 4, "split-gemv")),
    ("ternary", (1, 128, 64, 16, 4, 4, "split-gemv+postscale")),
    # first on-device checks of the inline-PTX variants (M <= 16)
    ("ternary_w158a8", (16, 64, 128, 4, 4, 4, "split+ptx")),
    # 128-byte weight rows per load: static sm_90 issue floor (CPU-compiled) 5.3 us at 8192^2 vs 6.7 for 16x64
    ("ternary_w158a8", (16, 128, 128, 4, 4, 4, "split+ptx")),
    ("ternary_w158a8", (16, 64, 128, 4, 4, 4, "split")),
    # LLM.int8 at M <= 16 with its activation split in one Pallas launch, and without (the measured tile)
    ("int8_outlier", (16, 64, 128, 4, 4, 4, "prepass")),
    ("int8_outlier", (16, 64, 128, 4, 4, 4, "")),
    # large M on the 8-bit tensor cores (goal shapes): fp8 W8A8 M=K=N=8192 with the activation quantization, fp8
    # wgmma; LLM.int8 at M=4096 (goal >= 1.0x bf16 at M >= 1024), the int8 dot from a K-major weight copy
    ("fp8_w8a8", (128, 256, 64, 1, 8, 3, "prequant", (8192,))),
    ("fp8_w8a8", (128, 128, 64, 1, 8, 4, "prequant", (8192,))),
    ("int8_outlier", (128, 128, 64, 1, 8, 4, "kmajor", (4096,))),  # 128x256 spills (two accumulators)
    ("int8_outlier", (128, 128, 128, 1, 8, 3, "kmajor", (4096,))),
    # int4 at M=4096 (goal >= 0.9x bf16): 256-row tiles dequantize each weight tile for twice the rows (sm_90 K
    # loop: 260 instructions per trip for 8 HGMMA vs 251 for 4 with the table's 128x128x64)
    ("int4_g128", (256, 128, 64, 1, 8, 3, "interleave", (4096,))),
    ("int4_g128", (256, 64, 64, 1, 8, 3, "interleave", (4096,))),
    ("fp8_w8a8", (128, 128, 64, 1, 8, 4, "prequant+promote", (8192,))),  # 128x256 spills (two accumulators)
    # W1.58A8 at M=4096 (routed to XLA on Hopper, 0.65x bf16 there): no exposed loads with split, fewer with +ptx
    ("ternary_w158a8", (128, 128, 128, 1, 8, 3, "split+ptx", (4096,))),
    ("ternary_w158a8", (128, 128, 128, 1, 8, 3, "split", (4096,))),
    # the rest of the small-M variants
    ("ternary_w158a8", (16, 32, 128, 1, 4, 3, "split+ptx")),
    ("ternary_w158a8", (16, 64, 128, 4, 4, 4, "")),
    ("nf4", (16, 64, 128, 4, 4, 4, "select-split")),
    ("nf4", (1, 128, 64, 16, 4, 4, "select-split-gemv")),
    ("ternary", (16, 64, 128, 4, 4, 4, "split")),
    ("int8_w8a16", (16, 64, 128, 8, 4, 4, "strided")),
    ("int8_w8a16", (16, 128, 128, 4, 8, 4, "strided")),
    ("ternary_w158a8", (16, 64, 128, 8, 4, 4, "split+ptx")),
    ("ternary_w158a8", (16, 32, 128, 1, 4, 3, "split")),
    ("ternary_w158a8", (16, 64, 128, 8, 4, 4, "split")),
    ("nf4", (1, 128, 64, 16, 4, 4, "select-gemv")),
    ("nf4", (16, 64, 128, 4, 4, 4, "select")),
    ("ternary", (16, 32, 128, 1, 4, 3, "split")),
    ("ternary", (16, 64, 128, 4, 4, 4, "")),
    ("ternary", (16, 64, 128, 8, 4, 4, "split")),
    ("int8_w8a16", (16, 32, 128, 1, 4, 3, "strided")),
    ("int8_w8a16", (16, 64, 128, 4, 4, 4, "strided")),
    # W1.58A8 in one launch (activation quantization in the kernel, no split-K): more instructions per trip
    ("ternary_w158a8", (16, 32, 128, 1, 4, 4, "split+ptx+xq")),
    ("ternary_w158a8", (16, 64, 128, 4, 4, 4, "split+ptx+xq")),
    ("int3_g128", (1, 128, 128, 16, 4, 4, "gemv")),  # 36 exposed activation loads per trip instead of 5
    # the dense chunk dot's alternatives to the heuristic's tiles (timed in the main plan at M = 16, 64; sm_90, 3-bit
    # g128 asym, 8192^2, CPU-compiled): 2 stages at M=16 (7.23 instructions per weight, 8 bytes of spills, vs 7.37)
    # and 64x128 at M=64 (7.01 vs 8.16 for 64x64; 162 KiB of shared memory; spills at 7 bits)
    ("int3_g128_asym", (16, 64, 512, 4, 4, 2, "", (16,))),
    ("int3_g128_asym", (64, 128, 512, 4, 4, 2, "", (64,))),
)


def tune_kernel_candidates() -> list[tuple[str, Any, tuple[int, ...] | None]]:
    """``(benchmark kernel name, BlockConfig, M values or None for the default)`` timed by ``tune_kernels``."""
    from pallas_kernels._common import BlockConfig

    return [(name, BlockConfig(*t[:7]), tuple(t[7]) if len(t) > 7 else None) for name, t in TUNE_KERNEL_CONFIGS]


def section_tune_kernels(args) -> dict[str, Any]:
    """Time each config of :data:`TUNE_KERNEL_CONFIGS` through ``jq.qdot`` (or the kernel's direct op), with the
    tuning table of this device replaced by that one config; report the error vs the XLA path too."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxquant as jq
    from benchmarks import kernels as kb
    from benchmarks.kernel_sass import TUNING_NAME
    from jaxquant.ops import explain_qdot, kernel_mode
    from pallas_kernels import tuning

    t_start = time.time()
    rows = []
    ms = [1, 16] if args.dry_run else [int(v) for v in args.m.split(",") if int(v) <= 16]
    k, n = (256, 256) if args.dry_run else (int(v) for v in args.tune_kn.split("x"))
    mode = "interpret" if args.dry_run else "on"
    dev = tuning.device_key()
    table = tuning.TABLE.setdefault(dev, {})
    cases = []
    for name, cfg, cfg_ms in tune_kernel_candidates():
        if cfg_ms is not None and args.dry_run:
            cfg_ms = tuple(min(v, 2 * cfg.block_m) for v in cfg_ms)  # interpret mode: small, two row blocks
        if args.dry_run and cfg.variant.startswith("mosaic"):  # no ragged K: the K shares must fit the small shape
            cfg = dataclasses.replace(cfg, split_k=max(1, min(cfg.split_k, k // (2 * cfg.block_k))))
        # a GEMV tile covers only its own block of rows
        cases += [(name, cfg, m) for m in cfg_ms or ms if not ("gemv" in cfg.variant and m > cfg.block_m)]
    done = measured_before(dev, "tune_kernels", f"{k}x{n}")
    cases = unmeasured_first(cases, [f"{name}|{m}|{cfg!r}" for name, cfg, m in cases], done)
    for name, cfg, m in cases:
        spec, tname = kb.SPECS[name], TUNING_NAME[name]
        op = jq.qdot if spec.direct is None else kb._direct_fn(spec, args.dry_run)
        if time.time() - t_start > args.budget_s:
            break
        row = {"kernel": name, "m": m, "k": k, "n": n, "config": repr(cfg), "key": f"{name}|{m}|{cfg!r}"}
        if row["key"] in _skips(args):
            continue
        _mark(args, row)
        key = jax.random.PRNGKey(m)
        nb = 2 if args.dry_run else (12 if m <= 256 else 3)  # large M: each input set is far beyond L2
        w = jax.random.normal(key, (k, n), jnp.float32) * 0.02
        qs = [jq.quantize(jnp.roll(w, b, axis=1), spec.scheme()) for b in range(nb)]
        xs = [kb._activations(spec.activations, jax.random.fold_in(key, 100 + b), m, k) for b in range(nb)]
        saved = table.get(tname)
        table[tname] = [(1 << 62, cfg)]
        try:
            jax.clear_caches()  # the config is read when qdot is traced
            with kernel_mode(mode):
                row["path"] = explain_qdot(xs[0], qs[0]) if spec.direct is None else spec.direct
                if spec.direct is None and repr(cfg) not in row["path"]:  # e.g. a tile that does not fit the shape
                    raise ValueError(f"qdot would not run this config here: {row['path']}")
                f = jax.jit(lambda xl, ql, op=op: [op(xi, qi) for xi, qi in zip(xl, ql)])
                y = np.asarray(f(xs[:1], qs[:1])[0], np.float64)
                row["t"] = kb.time_per_call(f, (xs, qs), 2 if args.dry_run else 10, 1 if args.dry_run else 3) / nb
            with kernel_mode("off"):
                r = np.asarray(jax.jit(op)(xs[0], qs[0]), np.float64)
            row["rel_err_vs_xla"] = float(np.linalg.norm(y - r) / max(np.linalg.norm(r), 1e-30))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            if saved is None:
                del table[tname]
            else:
                table[tname] = saved
        print(json.dumps(row), flush=True)
        rows.append(row)
        _write_partial(args.result, {"rows": rows})
    return {"rows": rows}


#: kernels traced by ``section_trace`` (with a bf16 ``jnp.dot`` of the same shape first)
TRACE_KERNELS = ("int4_g128", "int4_g128_nk", "nf4", "int8_outlier_nk", "fp8_w8a8_nk", "ternary_w158a8")


def section_trace(args) -> dict[str, Any]:
    """Per main kernel and M, the device kernels one ``qdot`` call launches (profiler trace, kernel mode "on",
    the device's current configs): the Pallas kernel's own time against the launches around it and the gaps."""
    import jax
    import jax.numpy as jnp

    import jaxquant as jq
    from benchmarks import kernels as kb
    from benchmarks.device_trace import trace_calls
    from jaxquant.ops import kernel_mode

    t_start = time.time()
    rows = []
    ms = [1, 16] if args.dry_run else [int(v) for v in args.trace_m.split(",")]
    k, n = (256, 256) if args.dry_run else (int(v) for v in args.tune_kn.split("x"))
    mode = "interpret" if args.dry_run else "on"
    calls = 3 if args.dry_run else 20
    for m in ms:
        for name in ("bf16", *TRACE_KERNELS):
            if time.time() - t_start > args.budget_s:
                break
            row: dict[str, Any] = {"kernel": name, "m": m, "k": k, "n": n, "calls": calls, "key": f"{name}|{m}"}
            if row["key"] in _skips(args):
                continue
            _mark(args, row)
            try:
                key = jax.random.PRNGKey(m)
                w = jax.random.normal(key, (k, n), jnp.float32) * 0.02
                if name == "bf16":
                    x = jax.random.normal(jax.random.fold_in(key, 1), (m, k), jnp.bfloat16)
                    res = trace_calls(jax.jit(jnp.dot), (x, w.astype(jnp.bfloat16)), calls)
                else:
                    spec = kb.SPECS[name]
                    q = jq.quantize(w, spec.scheme())
                    x = kb._activations(spec.activations, jax.random.fold_in(key, 1), m, k)
                    op = jq.qdot if spec.direct is None else kb._direct_fn(spec, args.dry_run)
                    jax.clear_caches()  # traced under this mode with the device's configs
                    with kernel_mode(mode):
                        res = trace_calls(jax.jit(op), (x, q), calls)
                row.update(res)
                row["kernels"] = res["kernels"][:8]
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
            _write_partial(args.result, {"rows": rows})
    return {"rows": rows}


def _trace_summary(rows: list[dict[str, Any]]) -> str:
    out = [
        "| kernel | M | wall µs / call | device busy µs | first-to-last µs | launches "
        "| kernels (µs per call; ×count) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['kernel']} | {r['m']} | – | – | – | – | {r['error'][:150]} |")
            continue
        ks = "; ".join(
            f"`{k['name'][:48]}` {k['us_per_call']:.1f}" + (f" ×{k['per_call']:g}" if k["per_call"] != 1 else "")
            for k in r.get("kernels", [])
        )
        launches = sum(k["per_call"] for k in r.get("kernels", []))
        out.append(
            f"| {r['kernel']} | {r['m']} | {r['wall_us']:.1f} | {r['busy_us']:.1f} | {r['span_us']:.1f} "
            f"| {launches:g} | {ks} |"
        )
    return "\n".join(out)


SECTIONS = {
    "env": section_env,
    "ceilings": section_ceilings,
    "check": section_check,
    "tune": section_tune,
    "tune_kernels": section_tune_kernels,
    "trace": section_trace,
}


RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


def measured_before(device: str, section: str, kn: str, results_dir: str = RESULTS_DIR) -> set[str]:
    """Row keys that a saved suite report of ``device`` timed without error in ``section`` (``"tune"`` or
    ``"tune_kernels"``) at ``kn`` (``"KxN"``), read from every ``*.json`` report in ``results_dir``.

    The sweeps time these after the configs this device has not timed yet (:func:`unmeasured_first`): a short
    device budget then buys new measurements before repeats. Unreadable files and reports of other devices or
    shapes are ignored.
    """
    keys: set[str] = set()
    if not os.path.isdir(results_dir):
        return keys
    for fname in sorted(os.listdir(results_dir)):
        if not fname.endswith(".json"):
            continue
        try:
            with open(os.path.join(results_dir, fname)) as f:
                report = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(report, dict) or (report.get("env") or {}).get("device_key") != device:
            continue
        if report.get("tune_kn") != kn:
            continue
        for row in (report.get(section) or {}).get("rows", []):
            if isinstance(row, dict) and "key" in row and "t" in row and "error" not in row:
                keys.add(row["key"])
    return keys


def unmeasured_first(cases: list[Any], keys: list[str], done: set[str]) -> list[Any]:
    """``cases`` (with their row ``keys``) reordered so that those whose key is not in ``done`` come first; the
    order within each part is kept."""
    if len(cases) != len(keys):
        raise ValueError(f"{len(cases)} cases but {len(keys)} keys")
    new = [c for c, k in zip(cases, keys) if k not in done]
    return new + [c for c, k in zip(cases, keys) if k in done]


def _skips(args) -> set[str]:
    return set(args.skip.split(";")) if args.skip else set()


def _mark(args, head: dict[str, Any]) -> None:
    """Record the case about to run, so that the supervisor can skip it if this process dies on it."""
    if args.marker:
        with open(args.marker, "w") as f:
            json.dump(head, f)


def _write_partial(path: str | None, obj: Any) -> None:
    if path:
        with open(path + ".partial", "w") as f:
            json.dump(obj, f)


def _read_rows(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


# -------------------------------------------------------------------------------------------------
# orchestration
# -------------------------------------------------------------------------------------------------
def _run_section(name: str, extra: list[str], timeout: float, tmp: str, dry: bool) -> dict[str, Any]:
    """Run one section in a child process; returns its result dict, or one with ``error``."""
    result = os.path.join(tmp, name.replace(":", "_") + ".json")
    cmd = [sys.executable, os.path.abspath(__file__), "--section", name, "--result", result, *extra]
    if dry:
        cmd.append("--dry-run")
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    t0 = time.time()
    print(f"\n=== section {name} (timeout {timeout:.0f} s) ===", flush=True)
    log_path = os.path.join(tmp, name.replace(":", "_") + ".log")
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, stdout=log, stderr=subprocess.STDOUT)
        rc = proc.returncode
        err = None if rc == 0 else f"exit status {rc}"
    except subprocess.TimeoutExpired:
        rc, err = None, f"timed out after {timeout:.0f} s"
    with open(log_path) as f:
        log_text = f.read()
    tail = "\n".join(ln for ln in log_text.splitlines()[-40:])
    print(tail, flush=True)
    out: dict[str, Any] = {}
    if os.path.exists(result):
        with open(result) as f:
            out = json.load(f)
    elif os.path.exists(result + ".partial"):
        with open(result + ".partial") as f:
            out = json.load(f)
    if name.startswith("bench:") and not out.get("rows"):
        out["rows"] = _read_rows(result + ".rows")
    if err:
        out["error"] = err
        out["log_tail"] = "\n".join(log_text.splitlines()[-25:])
    out["seconds"] = round(time.time() - t0, 1)
    print(f"=== section {name}: {'ok' if not err else err} in {out['seconds']} s ===", flush=True)
    return out


def _run_resilient(name: str, extra: list[str], timeout: float, tmp: str, dry: bool) -> dict[str, Any]:
    """Run a section that reports rows; if its process dies (an LLVM abort in a kernel compile, a crash), record
    the case it was on as failed and start it again without that case and the cases already done."""
    deadline = time.time() + timeout
    marker = os.path.join(tmp, name.replace(":", "_") + ".attempt")
    rows: list[dict[str, Any]] = []
    skip: list[str] = []
    out: dict[str, Any] = {}
    for attempt in range(4):
        remaining = deadline - time.time()
        if remaining < 10:
            break
        if os.path.exists(marker):
            os.remove(marker)
        args = [*extra, "--marker", marker] + (["--skip", ";".join(skip)] if skip else [])
        out = _run_section(name if attempt == 0 else f"{name}#retry{attempt}", args, remaining, tmp, dry)
        new = [r for r in out.get("rows", []) if r.get("key") not in skip]
        rows += new
        if "error" not in out or "timed out" in out["error"] or not os.path.exists(marker):
            break
        with open(marker) as f:
            head = json.load(f)
        if head.get("key") in skip:
            break
        rows.append({**head, "ok": False, "error": f"process died on this case ({out['error']})"})
        skip += [r["key"] for r in new if "key" in r] + [head["key"]]
        print(f"--- {name}: process died on {head.get('key')}; restarting without it", flush=True)
    out["rows"] = rows
    return out


def _check_table(rows: list[dict[str, Any]]) -> str:
    s = (
        "| kernel | M | K | N | dtype | ok | rel err vs f64 | rel err vs XLA | XLA vs f64 | deterministic | path |\n"
        "|---|---:|---:|---:|---|---|---:|---:|---:|---|---|\n"
    )
    for r in rows:
        if "error" in r:
            s += f"| {r['kernel']} | {r['m']} | {r['k']} | {r['n']} | {r['dtype']} | **FAIL** | – | – | – | – | "
            s += f"{r['error'][:150]} |\n"
            continue
        s += (
            f"| {r['kernel']} | {r['m']} | {r['k']} | {r['n']} | {r['dtype']} | "
            f"{'yes' if r['ok'] is True else ('fallback' if r['ok'] == 'fallback' else '**NO**')} | "
            f"{r['rel_err_vs_f64']:.1e} | {r['rel_err_vs_xla']:.1e} | {r['xla_rel_err_vs_f64']:.1e} | "
            f"{r['deterministic']} | {r.get('path', '')[:60]} |\n"
        )
    return s


def _tune_summary(rows: list[dict[str, Any]]) -> str:
    best: dict[int, dict[str, Any]] = {}
    for r in rows:
        if "t" in r and (r["m"] not in best or r["t"] < best[r["m"]]["t"]):
            best[r["m"]] = r
    s = "| M | K | N | config | µs | rel err vs XLA |\n|---:|---:|---:|---|---:|---:|\n"
    for r in rows:
        mark = " **best**" if best.get(r["m"]) is r else ""
        t = f"{1e6 * r['t']:.1f}" if "t" in r else r.get("error", "")[:100]
        e = f"{r['rel_err_vs_xla']:.1e}" if "rel_err_vs_xla" in r else "–"
        s += f"| {r['m']} | {r['k']} | {r['n']} | `{r['config']}`{mark} | {t} | {e} |\n"
    return s


def _tune_kernels_summary(rows: list[dict[str, Any]]) -> str:
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        key = (r.get("kernel", "?"), r.get("m", 0))
        if "t" in r and (key not in best or r["t"] < best[key]["t"]):
            best[key] = r
    s = "| kernel | M | K | N | config | µs | rel err vs XLA |\n|---|---:|---:|---:|---|---:|---:|\n"
    for r in rows:
        mark = " **best**" if best.get((r.get("kernel", "?"), r.get("m", 0))) is r else ""
        t = f"{1e6 * r['t']:.1f}" if "t" in r else r.get("error", "")[:100]
        e = f"{r['rel_err_vs_xla']:.1e}" if "rel_err_vs_xla" in r else "–"
        s += f"| {r.get('kernel', '?')} | {r['m']} | {r['k']} | {r['n']} | `{r['config']}`{mark} | {t} | {e} |\n"
    return s


#: seconds kept free at the end of ``--wall-s`` for writing the report
WALL_RESERVE_S = 20.0


def orchestrate(a) -> int:
    t_start = time.time()
    tmp = tempfile.mkdtemp(prefix="gpu_suite_")
    report: dict[str, Any] = {"started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    report["commit"] = git_commit(12)
    skipped: list[str] = []
    report["skipped"] = skipped

    def left() -> float:
        return a.budget_s - (time.time() - t_start)

    def wall(timeout: float) -> float:
        """``timeout`` clipped to what ``--wall-s`` leaves (minus the report's reserve)."""
        if a.wall_s is None:
            return timeout
        return min(timeout, a.wall_s - (time.time() - t_start) - WALL_RESERVE_S)

    def run(
        name: str, extra: list[str], timeout: float, resilient: bool = True, always: bool = False
    ) -> dict[str, Any] | None:
        """Run a section within ``--wall-s`` (``always``: at least 30 s, even past it); ``None`` if skipped."""
        t = min(timeout, max(30.0, wall(timeout))) if always else wall(timeout)
        if t < 15:
            skipped.append(f"{name}: --wall-s {a.wall_s:g} reached")
            return None
        res = (_run_resilient if resilient else _run_section)(name, extra, t, tmp, a.dry_run)
        report["total_seconds"] = round(time.time() - t_start, 1)
        _write_report(a, report, final=False)  # a run cut off later still leaves this much
        return res

    env = run("env", [], 120, resilient=False, always=True)  # the device: every report needs it
    report["env"] = env
    if "error" in env:
        print("environment check failed; stopping", flush=True)
    ceil = run("ceilings", [], min(90, max(30, left())), resilient=False) or {"error": "skipped"}
    report["ceilings"] = {k: v for k, v in ceil.items() if k not in ("seconds",)}
    ceil_file = os.path.join(tmp, "ceilings.json")
    if "copy_bytes_per_s" in ceil:
        with open(ceil_file, "w") as f:
            json.dump({k: v for k, v in ceil.items() if isinstance(v, float)}, f)
    if a.kernels:
        plan = [(k, a.m, a.kn, a.per_kernel_s) for k in a.kernels.split(",") if k]
    else:
        plan = PLAN
    if not a.skip_check:
        chk = run("check", ["--kernels", ",".join(p[0] for p in plan)], min(a.check_timeout_s, max(30, left())))
        if chk is not None:
            report["check"] = chk
    bench_rows: list[dict[str, Any]] = []
    report["sections"] = {}
    report["bench"] = bench_rows
    for name, ms, kns, budget in plan:
        remaining = wall(left())
        if remaining < 20:
            why = "suite time budget" if remaining == left() else f"--wall-s {a.wall_s:g}"
            bench_rows.append({"kernel": name, "error": f"skipped: {why}"})
            continue
        per = min(budget, remaining - 8)
        extra_args = ["--kernels", name, "--budget-s", str(per), "--m", ms, "--kn", kns]
        if os.path.exists(ceil_file):
            extra_args += ["--ceilings", ceil_file]
        res = run(f"bench:{name}", extra_args, per + 40)
        if res is None:
            bench_rows.append({"kernel": name, "error": "skipped: --wall-s"})
            continue
        report["sections"][name] = {k: v for k, v in res.items() if k != "rows"}
        rows = res.get("rows", [])
        if not rows and "error" in res:
            rows = [{"kernel": name, "error": res["error"]}]
        bench_rows += rows
    if a.trace_budget_s > 5:  # its own budget: where each main kernel's time goes
        tr_args = ["--budget-s", str(a.trace_budget_s), "--trace-m", a.trace_m, "--tune-kn", a.tune_kn]
        tr = run("trace", tr_args, a.trace_budget_s + 30)
        if tr is not None:
            report["trace"] = tr
    tune_s = a.tune_budget_s if a.tune_budget_s is not None else left() - 20
    if a.tune and tune_s > 5:  # by default only with the time left over
        tune_args = ["--budget-s", str(tune_s), "--m", a.tune_m, "--tune-kn", a.tune_kn]
        tune_args += (["--tune-wide"] if a.tune_wide else []) + (["--tune-variants"] if a.tune_postscale else [])
        tune = run("tune", tune_args, tune_s + 30)
        if tune is not None:
            report["tune"] = tune
            report["tune_kn"] = a.tune_kn
    # its own budget, like an explicit --tune-budget-s (left() is the benchmark's budget, spent by now); with
    # --wall-s the sweep gets what is left (its cases run most promising first)
    kernels_s = min(a.tune_kernels_budget_s, wall(a.tune_kernels_budget_s + 30) - 30)
    if a.tune and a.tune_postscale and kernels_s <= 5 and a.tune_kernels_budget_s > 5:
        skipped.append(f"tune_kernels: --wall-s {a.wall_s:g} reached")
    if a.tune and a.tune_postscale and kernels_s > 5:
        tk_args = ["--budget-s", str(kernels_s), "--m", a.tune_m, "--tune-kn", a.tune_kn]
        tk = run("tune_kernels", tk_args, kernels_s + 30)
        if tk is not None:
            report["tune_kernels"] = tk
            report["tune_kn"] = a.tune_kn
    report["total_seconds"] = round(time.time() - t_start, 1)
    _write_report(a, report)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _write_report(a, report: dict[str, Any], final: bool = True) -> None:
    """Write ``<device>.md`` / ``.json`` (and copy them to ``$OUT``); ``final=False``: an interim version written
    after each section (marked as such, not printed) so that a run cut off by the device's time limit still
    leaves its results."""
    from benchmarks.kernels import format_table

    env = report.get("env", {})
    dev = env.get("device_key") or "unknown-device"
    out_dir = a.out or (
        os.path.join(tempfile.gettempdir(), "gpu_suite_dry_run")
        if a.dry_run
        else os.path.join(ROOT, "benchmarks", "results")
    )
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, f"{dev}.md")
    ceil = report.get("ceilings", {})
    lines = [
        f"# Kernel results on {env.get('device_kind', '?')}",
        "",
        f"- date (UTC): {report['started']}",
        f"- commit: {report['commit']}",
        f"- JAX {env.get('jax', '?')}, Python {env.get('python', '?')}, backend {env.get('backend', '?')}",
        f"- written by `benchmarks/gpu_suite.py` in {report.get('total_seconds', '?')} s"
        + (" (**dry run: Pallas interpreter on CPU, timings meaningless**)" if a.dry_run else "")
        + ("" if final else " (**interim: the suite was still running**)"),
    ]
    if report.get("skipped"):
        lines.append(f"- skipped at the wall-clock limit: {'; '.join(report['skipped'])}")
    if "copy_bytes_per_s" in ceil:
        lines.append(
            f"- measured ceilings: device-to-device copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
            f"bf16 matmul 8192³ {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s"
        )
    elif "error" in ceil:
        lines.append(f"- ceilings: FAILED ({ceil['error']})")
    lines += [
        "",
        "Times are medians per matmul over rotating input sets (> 2x L2), warmed up; × columns are speed-ups "
        "(bf16 `jnp.dot` time / kernel time, XLA dequant path time / kernel time); % copy BW = fewest bytes "
        "(packed weights + scales + x + y) / time / copy bandwidth.",
        "",
        "## Benchmark",
        "",
        format_table(report.get("bench", [])),
    ]
    chk = report.get("check")
    if chk is not None:
        lines += ["## Correctness on the device", ""]
        if "error" in chk:
            lines += [f"check section: {chk['error']}", ""]
        lines += [_check_table(chk.get("rows", [])), ""]
    tr = report.get("trace")
    if tr:
        tr_rows = tr.get("rows", [])
        kn = (tr_rows[0]["k"], tr_rows[0]["n"]) if tr_rows and "k" in tr_rows[0] else ("?", "?")
        calls = tr_rows[0].get("calls", "?") if tr_rows else "?"
        lines += [
            f"## Device trace (K={kn[0]}, N={kn[1]}; one call's kernels, `benchmarks/device_trace.py`)",
            "",
            f"Kernel mode 'on' with this device's current configs; {calls} traced calls after warm-up; busy = sum "
            "of the kernels' device times per call, first-to-last = first kernel start to last kernel end of the "
            "calls / their number.",
            "",
            _trace_summary(tr_rows),
            "",
        ]
    tune = report.get("tune")
    if tune:
        kn = report.get("tune_kn", "4096x4096").split("x")
        title = f"## int4 g128 block-config sweep (K={kn[0]}, N={kn[1]})"
        lines += [title, "", _tune_summary(tune.get("rows", [])), ""]
    tk = report.get("tune_kernels")
    if tk:
        kn = report.get("tune_kn", "4096x4096").split("x")
        title = f"## Variant sweep of the other kernels (K={kn[0]}, N={kn[1]}; `TUNE_KERNEL_CONFIGS`)"
        lines += [title, "", _tune_kernels_summary(tk.get("rows", [])), ""]
    if report.get("bench") or tune or tk:
        from benchmarks.propose_tuning import format_proposals, propose

        try:
            proposals = format_proposals(propose(report, dev), dev)
        except Exception as e:  # the report must still be written
            proposals = f"(proposals failed: {type(e).__name__}: {e})"
        lines += ["## Proposed `pallas_kernels/tuning.py` changes (`benchmarks/propose_tuning.py`)", "",
                  "Limits: the last M the kernel beat the XLA path before it lost, over every measured scheme and "
                  "shape; rows: the fastest swept config where it beat the current one by > 3% (else why the current "
                  "one stays). Read before pasting.", "",
                  proposals, ""]  # fmt: skip
    failed = {k: v for k, v in report.get("sections", {}).items() if "error" in v}
    if failed:
        lines += ["## Section failures", ""]
        for k, v in failed.items():
            lines += [f"### {k}: {v['error']}", "", "```", v.get("log_tail", ""), "```", ""]
    text = "\n".join(lines) + "\n"
    from jaxquant.files import atomic_write

    atomic_write(md_path, text, mode=0o644)
    jsonl = os.path.join(out_dir, f"{dev}.json")
    atomic_write(jsonl, json.dumps(report, indent=1, default=str), mode=0o644)
    if final:
        print("\n" + text, flush=True)
        print(f"wrote {md_path} and {jsonl}", flush=True)
    out_env = os.environ.get("OUT")
    if out_env and os.path.isdir(out_env):
        for p in (md_path, jsonl):
            dst = os.path.join(out_env, os.path.basename(p))
            if os.path.abspath(dst) != os.path.abspath(p):  # --out $OUT already wrote them there
                shutil.copy(p, dst)
        if final:
            print(f"copied to {out_env}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dry-run",
        "--cpu-interpret",
        action="store_true",
        dest="dry_run",
        help="CPU dry run: tiny shapes through the Pallas interpreter, report to a temp folder",
    )
    p.add_argument("--budget-s", type=float, default=300.0, help="total time budget of the suite (seconds)")
    p.add_argument(
        "--wall-s",
        type=float,
        default=None,
        help="hard wall-clock limit of the whole run: section timeouts are clipped so that the report is written "
        f"{WALL_RESERVE_S:g} s before it (a device's per-call limit); the report is also rewritten after each section",
    )
    p.add_argument("--per-kernel-s", type=float, default=40.0, help="benchmark budget per kernel with --kernels")
    p.add_argument("--check-timeout-s", type=float, default=75.0)
    p.add_argument("--kernels", default="", help="comma list (default: the built-in plan: five main kernels, extras)")
    p.add_argument("--m", default="1,16,256,4096", help="M values with --kernels")
    p.add_argument("--kn", default="4096x4096,8192x8192", help="KxN values with --kernels")
    p.add_argument("--no-tune", dest="tune", action="store_false", help="skip the int4 config sweep")
    p.add_argument("--tune-m", default="1,16,256,4096", help="M values of the int4 config sweep")
    p.add_argument("--tune-kn", default="4096x4096", help="KxN of the int4 config sweep")
    p.add_argument("--tune-wide", action="store_true", help="sweep the wide 54-config grid (M <= 16)")
    p.add_argument(
        "--tune-variants",
        "--tune-postscale",
        dest="tune_postscale",
        action="store_true",
        help="time the best measured int4 tiles with each variant of TUNE_VARIANTS, then the other kernels' "
        "TUNE_KERNEL_CONFIGS (M <= 16; fp8 W8A8 at M=8192, LLM.int8 at M=4096)",
    )
    p.add_argument("--tune-budget-s", type=float, default=None, help="sweep budget (default: time left over)")
    p.add_argument(
        "--tune-kernels-budget-s",
        type=float,
        default=120.0,
        help="with --tune-variants: budget of the other kernels' variant sweep (TUNE_KERNEL_CONFIGS), after int4's",
    )
    p.add_argument(
        "--trace-budget-s", type=float, default=40.0, help="device-trace section budget (0: skip; after the benchmark)"
    )
    p.add_argument("--trace-m", default="1,16", help="M values of the device trace")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results; dry run: a temp folder)")
    # internal: run one section in this process
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ceilings", default=None, help=argparse.SUPPRESS)
    p.add_argument("--skip", default="", help=argparse.SUPPRESS)
    p.add_argument("--marker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="run benchmarks/gpu_quick.py instead (about 1-2 min)")
    a, rest = p.parse_known_args(argv)
    if a.quick:
        import gpu_quick

        return gpu_quick.main((["--dry-run"] if a.dry_run else []) + rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if a.section is None:
        from benchmarks.kernels import _parse_kn, _parse_m

        try:  # a typo should stop the run here, not in a section minutes into a device lease
            for m_list in (a.m, a.tune_m, a.trace_m):
                _parse_m(m_list)
            _parse_kn(a.kn)
            if len(_parse_kn(a.tune_kn)) != 1:
                raise ValueError(f"--tune-kn takes one KxN, not {a.tune_kn!r}")
        except ValueError as e:
            p.error(str(e))
        return orchestrate(a)
    section = a.section.split("#")[0]  # "#retryN" marks a restart after a crash
    if section.startswith("bench:"):
        res = section_bench(a)
    else:
        res = SECTIONS[section](a)
    with open(a.result, "w") as f:
        json.dump(res, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
