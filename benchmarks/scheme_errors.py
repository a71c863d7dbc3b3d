"""Bits per weight and relative Frobenius error of every basic scheme on one Gaussian matrix.

    python benchmarks/scheme_errors.py [--size 4096] [--seed 0]

Prints a markdown table: scheme, bits/weight (storage incl. scales/zeros), ||W - W_hat||_F / ||W||_F, seconds
to quantize (jit-compiled, first call included).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp

import jaxquant as jq

SCHEMES = [
    ("bf16", jq.CastScheme("bfloat16")),
    ("int8 per-channel", jq.IntScheme(8)),
    ("int8 per-tensor", jq.IntScheme(8, granularity="tensor")),
    ("fp8 e4m3 per-channel", jq.FP8Scheme("e4m3", "channel")),
    ("fp8 e5m2 per-channel", jq.FP8Scheme("e5m2", "channel")),
    ("llm.int8 weights", jq.LLMInt8Scheme()),
    ("int4 g32 minmax (Q4_1)", jq.IntScheme(4, 32, symmetric=False, range="minmax")),
    ("int4 g64 asym", jq.IntScheme(4, 64, symmetric=False)),
    ("int4 g128 asym", jq.IntScheme(4, 128, symmetric=False)),
    ("int4 g128 sym", jq.IntScheme(4, 128)),
    ("int4 per-channel sym", jq.IntScheme(4)),
    ("nf4 b64", jq.NF4Scheme()),
    ("nf4 b64 double-quant", jq.NF4Scheme(double_quant=True)),
    ("int3 g128 asym", jq.IntScheme(3, 128, symmetric=False)),
    ("int3 g128 sym", jq.IntScheme(3, 128)),
    ("int2 g64 asym", jq.IntScheme(2, 64, symmetric=False)),
    ("ternary per-tensor 2-bit", jq.TernaryScheme()),
    ("ternary per-tensor base-3", jq.TernaryScheme(packing="base3")),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    w = jax.random.normal(jax.random.key(a.seed), (a.size, a.size), jnp.float32)
    norm = float(jnp.linalg.norm(w))
    print(
        f"W ~ N(0,1), {a.size}x{a.size} float32; {platform.machine()}, "
        f"{jax.devices()[0].platform}, jax {jax.__version__}"
    )
    print("| scheme | bits/weight | rel. Frobenius error | quantize s |")
    print("|---|---:|---:|---:|")
    for name, s in SCHEMES:
        t0 = time.perf_counter()
        q = jq.quantize(w, s)
        jax.block_until_ready(q)
        dt = time.perf_counter() - t0
        err = float(jnp.linalg.norm(w - jq.dequantize(q))) / norm
        print(f"| {name} | {q.bits_per_weight:.4f} | {err:.5f} | {dt:.2f} |")


if __name__ == "__main__":
    main()
