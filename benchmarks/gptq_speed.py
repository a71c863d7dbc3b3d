"""Per-layer GPTQ speed: the quantize call alone (Hessian given), like the peer numbers in FINDINGS.md.

    python benchmarks/gptq_speed.py [--reps 5] [--tokens 8192] [--act-order] [--sizes 1536x576,4096x4096]

A size ``OUTxIN`` is a PyTorch ``Linear`` weight of shape (out, in), i.e. our (K, N) = (IN, OUT) kernel; the
peers (GPTQModel 7.7: 1536x576 0.104 s, 4096x4096 3.66 s; llm-compressor 0.14: 0.091 s, 3.22 s) were timed
at 4-bit g128 symmetric, 8192 calibration tokens, 2 threads, on this project's 2-core CPU. Prints, per size,
the compile time (first call) and the best / median wall time of the compiled call over ``--reps`` runs, with
the process CPU time beside it: when other jobs share the CPU, wall time inflates (JAX's thread pool spins
while it waits for a core) and CPU time is the steadier number.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant.algorithms.gptq_core import gptq


def _problem(k: int, n: int, tokens: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, k), dtype=np.float32)
    x *= rng.uniform(0.2, 3.0, k).astype(np.float32)  # uneven channel scales, as in real activations
    h = jnp.asarray(x.T @ x / tokens)
    w = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32) * 0.02)
    return w, h


def bench(out_f: int, in_f: int, *, tokens: int, reps: int, act_order: bool, scheme: jq.IntScheme) -> dict:
    """Time ``gptq`` on one (in_f, out_f) kernel; returns compile seconds and per-rep (wall, cpu) seconds."""
    w, h = _problem(in_f, out_f, tokens)

    def call():
        return jax.block_until_ready(gptq(w, h, scheme, act_order=act_order, static_groups=act_order))

    t0 = time.perf_counter()
    call()
    compile_s = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"compile": compile_s, "walls": walls, "cpus": cpus}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--sizes", default="1536x576,576x1536,4096x4096", help="comma-separated OUTxIN")
    ap.add_argument("--act-order", action="store_true", help="act-order with static groups")
    a = ap.parse_args()
    scheme = jq.IntScheme(bits=4, group_size=128, symmetric=True)
    print(
        f"GPTQ int4 g128 sym, {a.tokens} calibration tokens, act_order={a.act_order}; "
        f"{platform.machine()} {os.cpu_count()} cpus, jax {jax.__version__} {jax.default_backend()}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'layer (out x in)':<18} {'compile s':>9} {'best s':>8} {'median s':>9} {'cpu s (median)':>15}")
    for size in a.sizes.split(","):
        out_f, in_f = (int(v) for v in size.lower().split("x"))
        r = bench(out_f, in_f, tokens=a.tokens, reps=a.reps, act_order=a.act_order, scheme=scheme)
        print(
            f"{size:<18} {r['compile']:>9.2f} {min(r['walls']):>8.3f} {statistics.median(r['walls']):>9.3f} "
            f"{statistics.median(r['cpus']):>15.3f}",
            flush=True,
        )
    print("peers (same CPU, 2 threads): GPTQModel 7.7 1536x576 0.104 s, 4096x4096 3.66 s; llm-compressor 0.091 / 3.22")


if __name__ == "__main__":
    main()
