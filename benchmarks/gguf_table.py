"""Perplexity and bits/weight of llama.cpp's recipes (q8_0 ... q2_k) on SmolLM2-135M, quantized by jaxquant.

    python benchmarks/gguf_table.py --max-windows 16 [--recipes q8_0,q4_k_m] [--out benchmarks/results/gguf_table.md]

Each recipe quantizes every tensor ``llama-quantize`` would (block linears and the tied token embedding) with
llama.cpp's per-tensor choices and shape fallbacks (see ``jaxquant.formats.gguf_recipes``). Columns:

* ``bpw (all)``: storage bits per weight over every quantized tensor, embedding included (what a GGUF file's
  size reflects);
* ``bpw (linears)``: over the block linears only, comparable with the RTN/GPTQ/AWQ SPECs (which keep the
  embedding float);
* ``types``: how many tensors got each block type.

Perplexity as ``jaxquant eval`` (512-token windows of the evaluation split). The table (markdown) is printed
and written atomically to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import math
import os
import platform
import sys
import tempfile
import time

DEFAULT = ("fp32", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q4_0", "q3_k_m", "q2_k")


def _linear_bpw(recipe: str, config) -> tuple[float, float, dict[str, int]]:
    from jaxquant.formats.gguf_blocks import GGUF_TYPES
    from jaxquant.formats.gguf_recipes import recipe_types
    from jaxquant.models.llama import param_shapes

    shapes = param_shapes(config)
    types = recipe_types(recipe, config)
    bits = {p: (GGUF_TYPES[t].bits_per_weight if t in GGUF_TYPES else 16.0) for p, t in types.items()}
    lin = [p for p in types if p.startswith("layers/")]
    n_lin = sum(math.prod(shapes[p]) for p in lin)
    n_all = sum(math.prod(shapes[p]) for p in types)
    bpw_lin = sum(bits[p] * math.prod(shapes[p]) for p in lin) / n_lin
    bpw_all = sum(bits[p] * math.prod(shapes[p]) for p in types) / n_all
    return bpw_all, bpw_lin, dict(collections.Counter(types.values()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--recipes", default=",".join(DEFAULT))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gguf_table.md"))
    a = ap.parse_args(argv)

    import jax

    from jaxquant.eval.harness import evaluate, load

    names = [s.strip() for s in a.recipes.split(",") if s.strip()]
    t0 = time.time()
    loaded = load(a.model)
    config = loaded.model.config
    rows = []
    base = None
    head = "| recipe | bpw (all) | bpw (linears) | ppl | Δ vs fp32 | types | seconds |"
    print(head)
    print("|---|---:|---:|---:|---:|---|---:|", flush=True)
    lines = []
    for name in names:
        r = evaluate(loaded, name, max_windows=a.max_windows, progress=False)
        if name == "fp32":
            base = r.ppl
            bpw_all = bpw_lin = 32.0
            types = {"F32": "all"}
        else:
            bpw_all, bpw_lin, types = _linear_bpw(name, config)
        delta = "–" if base is None or name == "fp32" else f"{100 * (r.ppl / base - 1):+.1f}%"
        tstr = ", ".join(f"{k}×{v}" for k, v in sorted(types.items()))
        line = (
            f"| {name} | {bpw_all:.3f} | {bpw_lin:.3f} | {r.ppl:.3f} | {delta} | {tstr} | "
            f"{r.seconds + r.quantize_seconds:.1f} |"
        )
        print(line, flush=True)
        lines.append(line)
        rows.append(r)
    dev = jax.devices()[0].platform
    meta = (
        f"`python benchmarks/gguf_table.py --max-windows {a.max_windows}` on {platform.machine()} "
        f"({os.cpu_count()} cpus, {dev}, jax {jax.__version__}), {datetime.date.today()}; "
        f"{rows[0].tokens if rows else 0} tokens per row; {time.time() - t0:.0f} s in all."
    )
    print(meta)
    text = "\n".join(
        ["# GGUF recipes on SmolLM2-135M", "", meta, "", head, "|---|---:|---:|---:|---:|---|---:|", *lines]
    )
    out = os.path.abspath(a.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), prefix=".gguf_table.")
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
