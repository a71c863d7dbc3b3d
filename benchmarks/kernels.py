"""Kernel benchmark: fused Pallas kernels vs ``jnp.dot`` bf16 and vs jaxquant's XLA dequant path.

For each kernel and shape ``(M, K, N)`` it prints the median time per matmul, the speed-up over a bf16
``jnp.dot`` with bf16 weights measured in the same process, the speed-up over jaxquant's own XLA path
(``qdot`` with kernels off: dequantize + dot, or the scheme's ``_qdot``), and the fraction of the device's
copy bandwidth the kernel achieves (fewest bytes it must move, each input read once and the output written
once, over time, over a device-to-device copy's bytes read + written per second, measured in the same run).

Timing: inputs rotate over ``B`` independent buffer sets (together > 2x the L2 cache, so no weight is read
from cache), one jitted call runs the matmul once per set, and calls are issued back to back and synchronized
at the end, so host dispatch overlaps device work; the median over several trials is reported per matmul.
Everything is warmed up (compiled and run once) first.

Usage::

    python benchmarks/kernels.py                          # every kernel, the issue's shapes (defaults below)
    python benchmarks/kernels.py --kernels int4_g128,nf4 --m 1,16 --kn 8192x8192
    python benchmarks/kernels.py --cpu-interpret          # tiny shapes, Pallas interpreter (a dry run on CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

# run from the repository root without installing: python benchmarks/kernels.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant.ops import explain_qdot, kernel_mode

__all__ = ["SPECS", "KernelSpec", "main", "measure_ceilings", "run_case"]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """A benchmarked kernel: how to build its weight (a jaxquant scheme) and its activations."""

    name: str
    scheme: Callable[[], jq.Scheme]
    description: str
    activations: str = "normal"  # "normal" or "outliers" (a few large feature dims, for LLM.int8)
    # an explicit kernel call replacing qdot (for kernels with their own activation quantization), or None
    direct: str | None = None


def _specs() -> dict[str, KernelSpec]:
    s = [
        KernelSpec("int4_g128", lambda: jq.IntScheme(bits=4, group_size=128), "W4A16 int4 sym g128"),
        KernelSpec(
            "int4_g128_asym",
            lambda: jq.IntScheme(bits=4, group_size=128, symmetric=False),
            "W4A16 int4 asym (zero points) g128",
        ),
        KernelSpec(
            "int4_g128_nk",
            lambda: jq.IntScheme(bits=4, group_size=128, layout="nk"),
            "W4A16 int4 sym g128, codes stored K-major (N, K/2)",
        ),
        KernelSpec(
            "int4_g128_nk_s32",
            lambda: jq.IntScheme(bits=4, group_size=128, layout="nk", scale_dtype="float32"),
            "W4A16 int4 sym g128, K-major codes, float32 scales (4-byte scale loads: pipelined in K-major tiles)",
        ),
        KernelSpec("int8_w8a16", lambda: jq.IntScheme(bits=8), "W8A16 int8 per-channel"),
        KernelSpec(
            "int8_w8a16_nk",
            lambda: jq.IntScheme(bits=8, layout="nk"),
            "W8A16 int8 per-channel, codes stored K-major (N, K)",
        ),
        KernelSpec("int3_g128", lambda: jq.IntScheme(bits=3, group_size=128), "W3A16 int3 sym g128"),
        KernelSpec(
            "int3_g128_asym",
            lambda: jq.IntScheme(bits=3, group_size=128, symmetric=False),
            "W3A16 int3 asym g128 (GPTQ's 3-bit scheme)",
        ),
        # 5 and 6 bits: the automatic mixed-bits search's other dense widths (asymmetric, as it quantizes)
        KernelSpec(
            "int5_g128_asym",
            lambda: jq.IntScheme(bits=5, group_size=128, symmetric=False),
            "W5A16 int5 asym g128",
        ),
        KernelSpec(
            "int6_g128_asym",
            lambda: jq.IntScheme(bits=6, group_size=128, symmetric=False),
            "W6A16 int6 asym g128",
        ),
        KernelSpec("nf4", lambda: jq.NF4Scheme(block_size=64), "NF4 b64 (bitsandbytes layout)"),
        KernelSpec(
            "int8_outlier",
            lambda: jq.LLMInt8Scheme(threshold=6.0),
            "LLM.int8 (int8 x int8 + bf16 outlier dims)",
            activations="outliers",
        ),
        KernelSpec(
            "int8_outlier_nk",
            lambda: jq.LLMInt8Scheme(threshold=6.0, layout="nk"),
            "LLM.int8, weight stored K-major (N, K)",
            activations="outliers",
        ),
        KernelSpec("fp8_w8a16", lambda: jq.FP8Scheme(fmt="e4m3", granularity="channel"), "fp8 e4m3 weight-only"),
        KernelSpec(
            "fp8_w8a16_nk",
            lambda: jq.FP8Scheme(fmt="e4m3", granularity="channel", layout="nk"),
            "fp8 e4m3 weight-only, weight stored K-major (N, K)",
        ),
        KernelSpec(
            "fp8_w8a8",
            lambda: jq.FP8Scheme(fmt="e4m3", granularity="channel"),
            "fp8 e4m3 W8A8, dynamic per-row act quant fused",
            direct="fp8_w8a8",
        ),
        KernelSpec(
            "fp8_w8a8_nk",
            lambda: jq.FP8Scheme(fmt="e4m3", granularity="channel", layout="nk"),
            "fp8 e4m3 W8A8, weight stored K-major (N, K)",
            direct="fp8_w8a8",
        ),
        KernelSpec("ternary", lambda: jq.TernaryScheme(granularity="channel"), "ternary (W1.58) weight-only"),
        KernelSpec(
            "ternary_w158a8",
            lambda: jq.TernaryScheme(granularity="channel"),
            "ternary W1.58A8, int8 per-token act quant fused",
            direct="ternary_a8",
        ),
    ]
    return {k.name: k for k in s}


SPECS = _specs()

L2_BYTES = 50 * 2**20
#: rows with at least this M also time ``jaxquant.ops.qdot_dequant_dot`` (integer and NF4 schemes; 16 in CPU dry runs)
DEQUANT_DOT_MIN_M = 256


# -------------------------------------------------------------------------------------------------
# timing
# -------------------------------------------------------------------------------------------------
def time_per_call(fn: Callable, args: tuple, calls: int = 10, trials: int = 5) -> float:
    """Median seconds per ``fn(*args)`` call: warm-up, then ``trials`` x ``calls`` back-to-back calls."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(trials):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples)


def measure_ceilings(interpret: bool = False) -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written per second) and bf16 8192^3 matmul rate."""
    n = 2**20 if interpret else 2**28  # uint32 elements: 1 GiB on a GPU
    a = jnp.arange(n, dtype=jnp.uint32)
    copy = jax.jit(lambda v: v + jnp.uint32(1))
    t = time_per_call(copy, (a,), calls=3 if interpret else 20)
    out = {"copy_bytes_per_s": 2 * 4 * n / t, "copy_time_s": t}
    d = 256 if interpret else 8192
    key = jax.random.PRNGKey(0)
    xa = jax.random.normal(key, (d, d), jnp.bfloat16)
    wa = jax.random.normal(jax.random.fold_in(key, 1), (d, d), jnp.bfloat16)
    mm = jax.jit(lambda p, q: jnp.dot(p, q))
    t = time_per_call(mm, (xa, wa), calls=2 if interpret else 10)
    out["bf16_flops_per_s"] = 2 * d**3 / t
    return out


# -------------------------------------------------------------------------------------------------
# one case
# -------------------------------------------------------------------------------------------------
def _activations(kind: str, key, m: int, k: int) -> jax.Array:
    x = jax.random.normal(key, (m, k), jnp.float32)
    if kind == "outliers":  # ~0.1% of feature dims carry magnitudes ~20 (LLM.int8's emergent outliers)
        cols = max(1, k // 1024)
        x = x.at[:, :cols].multiply(20.0)
    return x.astype(jnp.bfloat16)


def _buffers(bytes_per_set: int, est_s: float, interpret: bool) -> int:
    """How many independent input sets to rotate: > 2x L2 in total, >= ~0.15 ms of work per call (host dispatch
    of the next call overlaps it), at most 12 (compile time) and 6 GB."""
    if interpret:
        return 2
    need_cache = math.ceil(2 * L2_BYTES / max(bytes_per_set, 1)) + 1
    need_time = math.ceil(1.5e-4 / max(est_s, 1e-7))
    cap = max(2, int(6e9 // max(bytes_per_set, 1)))
    return int(max(2, min(max(need_cache, need_time), cap, 12)))


def _direct_fn(spec: KernelSpec, interpret: bool) -> Callable[[jax.Array, Any], jax.Array]:
    from jaxquant import ops

    fn = getattr(ops, f"qdot_{spec.direct}", None)
    if fn is None:
        raise NotImplementedError(f"jaxquant.ops.qdot_{spec.direct} is not implemented")
    return fn


def run_case(
    spec: KernelSpec, m: int, k: int, n: int, ceilings: dict[str, float] | None, interpret: bool = False
) -> dict[str, Any]:
    """Time one kernel at one shape; returns a result row (times in seconds; errors as strings)."""
    row: dict[str, Any] = {"kernel": spec.name, "m": m, "k": k, "n": n, "desc": spec.description}
    key = jax.random.PRNGKey(m * 7919 + k * 31 + n)
    scheme = spec.scheme()
    w0 = jax.random.normal(key, (k, n), jnp.float32) * 0.02
    q0 = jq.quantize(w0, scheme)
    x0 = _activations(spec.activations, jax.random.fold_in(key, 1), m, k)
    qbytes = q0.nbytes
    io_bytes = qbytes + 2 * m * k + 2 * m * n
    est = max(io_bytes / 3e12, 2 * m * k * n / 6e14)
    nb = _buffers(max(qbytes, 2 * k * n), est, interpret)
    row["buffers"] = nb
    qs, xs, ws = [], [], []
    for b in range(nb):
        wb = w0 if b == 0 else jnp.roll(w0, b, axis=1) * (1.0 + 0.01 * b)
        qs.append(q0 if b == 0 else jq.quantize(wb, scheme))
        xs.append(x0 if b == 0 else jnp.roll(x0, b, axis=0))
        ws.append(wb.astype(jnp.bfloat16))
    del w0

    mode = "interpret" if interpret else "on"
    if spec.direct is None:
        with kernel_mode(mode):
            row["path"] = explain_qdot(x0, q0)
        op_kernel = jq.qdot
    else:
        op_kernel = _direct_fn(spec, interpret)
        row["path"] = f"direct {spec.direct}"

    def many(op):
        return jax.jit(lambda xl, ql: [op(xi, qi) for xi, qi in zip(xl, ql)])

    t0 = time.perf_counter()
    with kernel_mode(mode):
        f_kernel = many(op_kernel)
        y_kernel = f_kernel(xs[:1], qs[:1])[0]  # traced now, under the kernel mode
        jax.block_until_ready(y_kernel)
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    with kernel_mode("off"):  # jaxquant's own XLA path for the same function
        f_xla = many(op_kernel)
        y_xla = f_xla(xs[:1], qs[:1])[0]
    f_bf16 = jax.jit(lambda xl, wl: [jnp.dot(xi, wi) for xi, wi in zip(xl, wl)])

    # correctness spot check against the XLA path on the same inputs
    yk, yx = np.asarray(y_kernel, np.float64), np.asarray(y_xla, np.float64)
    row["rel_err_vs_xla"] = float(np.linalg.norm(yk - yx) / max(np.linalg.norm(yx), 1e-30))
    row["finite"] = bool(np.isfinite(yk).all())

    calls = 2 if interpret else 10
    trials = 1 if interpret else 5
    with kernel_mode(mode):
        row["t_kernel"] = time_per_call(f_kernel, (xs, qs), calls, trials) / nb
    with kernel_mode("off"):
        row["t_xla"] = time_per_call(f_xla, (xs, qs), calls, trials) / nb
    row["t_bf16"] = time_per_call(f_bf16, (xs, ws), calls, trials) / nb
    has_dequant_kernel = getattr(scheme, "kind", None) in ("int", "nf4")
    if spec.direct is None and has_dequant_kernel and m >= (16 if interpret else DEQUANT_DOT_MIN_M):
        # the XLA path with a Pallas dequantization kernel (same weights, same dot): the large-M alternative
        from jaxquant.ops import qdot_dequant_dot

        try:
            with kernel_mode(mode):
                f_dd = many(qdot_dequant_dot)
                y_dd = f_dd(xs[:1], qs[:1])[0]
                row["t_dequant_dot"] = time_per_call(f_dd, (xs, qs), calls, trials) / nb
            row["dequant_dot_bit_identical"] = bool(np.array_equal(np.asarray(y_dd, np.float64), yx))
        except Exception as e:  # reported in the note column
            row["dequant_dot_error"] = f"{type(e).__name__}: {str(e)[:120]}"
    row["bytes"] = io_bytes
    row["speedup_vs_bf16"] = row["t_bf16"] / row["t_kernel"]
    row["speedup_vs_xla"] = row["t_xla"] / row["t_kernel"]
    if ceilings and ceilings.get("copy_bytes_per_s"):
        row["frac_copy_bw"] = io_bytes / row["t_kernel"] / ceilings["copy_bytes_per_s"]
    return row


# -------------------------------------------------------------------------------------------------
# table
# -------------------------------------------------------------------------------------------------
def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of result rows (errors shown in the last column)."""
    head = (
        "| kernel | M | K | N | kernel µs | bf16 jnp.dot µs | XLA path µs | × vs bf16 | × vs XLA | "
        "% copy BW | rel err vs XLA | note |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['kernel']} | {r.get('m', '')} | {r.get('k', '')} | {r.get('n', '')} | – | – | – | – | – | – | – "
                f"| FAILED: {r['error'][:160]} |"
            )
            continue
        frac = f"{100 * r['frac_copy_bw']:.0f}%" if "frac_copy_bw" in r else "–"
        note = "" if r.get("finite", True) else "NON-FINITE OUTPUT"
        if not r.get("path", "").startswith(("kernel", "direct")):
            note = (note + " " + r.get("path", "")).strip()
        if "t_dequant_dot" in r:
            same = "bit-identical to XLA" if r.get("dequant_dot_bit_identical") else "DIFFERS from XLA"
            note = (
                f"{note} deq-kernel+dot {1e6 * r['t_dequant_dot']:.1f} µs "
                f"({r['t_bf16'] / r['t_dequant_dot']:.2f}x bf16, {same})"
            ).strip()
        elif "dequant_dot_error" in r:
            note = f"{note} deq-kernel+dot FAILED: {r['dequant_dot_error']}".strip()
        lines.append(
            f"| {r['kernel']} | {r['m']} | {r['k']} | {r['n']} | {1e6 * r['t_kernel']:.1f} | "
            f"{1e6 * r['t_bf16']:.1f} | {1e6 * r['t_xla']:.1f} | {r['speedup_vs_bf16']:.2f} | "
            f"{r['speedup_vs_xla']:.2f} | {frac} | {r['rel_err_vs_xla']:.1e} | {note} |"
        )
    return head + "\n".join(lines) + "\n"


def _parse_kn(s: str) -> list[tuple[int, int]]:
    """``"8192x8192,4096x14336"`` -> ``[(8192, 8192), (4096, 14336)]``; ValueError naming the bad part."""
    out = []
    for part in s.split(","):
        try:
            a, b = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"{part!r} is not KxN (two positive integers, e.g. 8192x8192)") from None
        if a < 1 or b < 1:
            raise ValueError(f"{part!r}: K and N must be positive")
        out.append((a, b))
    return out


def _parse_m(s: str) -> list[int]:
    """``"1,16,256"`` -> ``[1, 16, 256]``; ValueError naming the bad part."""
    out = []
    for part in s.split(","):
        try:
            m = int(part)
        except ValueError:
            raise ValueError(f"{part!r} is not an M value (a positive integer)") from None
        if m < 1:
            raise ValueError(f"M must be positive, not {m}")
        out.append(m)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default="all", help=f"comma list of {sorted(SPECS)} or 'all'")
    p.add_argument("--m", default="1,4,16,64,256,4096", help="comma list of M (rows of the activations)")
    p.add_argument("--kn", default="8192x8192,4096x14336,14336x4096", help="comma list of KxN")
    p.add_argument("--json", default=None, help="append result rows (JSON lines) to this file, one per case")
    p.add_argument("--ceilings", default=None, help="JSON file with measured ceilings (else measured here)")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new cases after this many seconds")
    p.add_argument("--skip", default="", help="';'-separated case keys kernel:M:K:N to leave out")
    p.add_argument("--marker", default=None, help="file that names the case being run (for a supervisor)")
    p.add_argument(
        "--cpu-interpret",
        "--dry-run",
        action="store_true",
        dest="interpret",
        help="tiny shapes through the Pallas interpreter (CPU dry run of every code path)",
    )
    a = p.parse_args(argv)
    t_start = time.time()
    names = sorted(SPECS) if a.kernels == "all" else [s for s in a.kernels.split(",") if s]
    for nm in names:
        if nm not in SPECS:
            p.error(f"unknown kernel {nm!r}; choose from {sorted(SPECS)}")
    if a.interpret:
        ms, kns = [1, 16], [(256, 256)]
    else:
        try:
            ms, kns = _parse_m(a.m), _parse_kn(a.kn)
        except ValueError as e:
            p.error(str(e))
    if a.ceilings and os.path.exists(a.ceilings):
        with open(a.ceilings) as f:
            ceilings = json.load(f)
    else:
        ceilings = measure_ceilings(a.interpret)
    print(f"# devices: {jax.devices()}  jax {jax.__version__}  ceilings: {ceilings}", flush=True)
    rows = []
    skip = set(a.skip.split(";")) if a.skip else set()
    for nm in names:
        for k, n in kns:
            for m in ms:
                head = {"kernel": nm, "m": m, "k": k, "n": n, "key": f"{nm}:{m}:{k}:{n}"}
                if head["key"] in skip:
                    continue
                if a.marker:  # which case is running, for a supervisor to skip it if the process dies
                    with open(a.marker, "w") as f:
                        json.dump(head, f)
                if os.environ.get("JAXQUANT_BENCH_ABORT_ON") == head["key"]:  # to test crash recovery
                    os.abort()
                if time.time() - t_start > a.budget_s:
                    row = {**head, "error": "skipped: time budget"}
                else:
                    try:
                        row = {**head, **run_case(SPECS[nm], m, k, n, ceilings, a.interpret)}
                    except Exception as e:  # report and go on with the next case
                        row = {**head, "error": f"{type(e).__name__}: {e}"}
                        traceback.print_exc()
                rows.append(row)
                print(json.dumps(row), flush=True)
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print(format_table(rows))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
