"""The README's calibrated-PTQ table: RTN vs GPTQ vs AWQ on SmolLM2-135M (ppl, Δ%, bits/weight, seconds).

    python benchmarks/ptq_table.py [--max-windows 16] [--out benchmarks/results/ptq_table.json] [--rows ...]

Every row is ``jaxquant eval --scheme SPEC --max-windows 16`` (first 16 evaluation windows of 512 tokens);
"quantize s" is the time to quantize the whole model (calibration passes included for GPTQ/AWQ), "eval s"
the perplexity run. Prints a markdown table (paste it into the README) and writes the rows as JSON, atomically.
Calibrated rows take minutes each on a 2-core CPU; timings depend on what else runs on the machine (the load
average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax

from jaxquant.files import atomic_write

#: (SPEC, label) in table order; blank SPEC = a separator row
ROWS: tuple[tuple[str, str], ...] = (
    ("fp32", "fp32"),
    ("int4-g128", "RTN int4 g128 sym"),
    ("gptq-int4-g128", "GPTQ int4 g128 sym"),
    ("int4-g128-asym", "RTN int4 g128 asym"),
    ("gptq-int4-g128-asym", "GPTQ int4 g128 asym"),
    ("awq-int4-g128-asym", "AWQ int4 g128 asym"),
    ("int4-g64-asym", "RTN int4 g64 asym"),
    ("gptq-int4-g64-asym", "GPTQ int4 g64 asym"),
    ("int3-g128-asym", "RTN int3 g128 asym"),
    ("gptq-int3-g128-asym", "GPTQ int3 g128 asym"),
    ("awq-int3-g128-asym", "AWQ int3 g128 asym"),
    ("w8a8", "W8A8 int8 (per-channel W, per-token x)"),
    ("smoothquant-int8-w8a8", "SmoothQuant + W8A8 int8"),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/ptq_table.json")
    ap.add_argument("--rows", default=None, help="comma-separated SPECs (default: the README table)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--calib-samples", type=int, default=None, help="calibration windows of every calibrated row")
    ap.add_argument("--clip-search", action="store_true", help="GPTQ rows: static groups from a clipping search")
    a = ap.parse_args()

    from jaxquant.eval.harness import evaluate, load
    from jaxquant.specs import parse_spec

    labels = dict(ROWS)
    specs = [s.strip() for s in a.rows.split(",")] if a.rows else [s for s, _ in ROWS]
    if "fp32" not in specs:
        specs.insert(0, "fp32")
    t_all = time.perf_counter()
    loaded = load("smollm2-135m")
    machine = f"{platform.machine()}, {os.cpu_count()} cpus, jax {jax.__version__} {jax.default_backend()}"
    print(f"{machine}; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    base = None
    head = "| method | SPEC | bpw | ppl | Δ vs fp32 | quantize s | eval s |\n|---|---|---:|---:|---:|---:|---:|"
    print(head, flush=True)
    for spec in specs:
        sp = parse_spec(spec)
        opts = {}
        if sp.build is not None and a.calib_samples:
            opts["calib_samples"] = a.calib_samples
        if spec.startswith("gptq-") and a.clip_search:
            opts["clip_search"] = True
        r = evaluate(loaded, sp, max_windows=a.max_windows, progress=a.progress, options=opts or None)
        if spec == "fp32":
            base = r.ppl
        delta = "–" if spec == "fp32" else f"{100 * (r.ppl / base - 1):+.1f}%"
        row = {
            **r.as_dict(),
            "label": labels.get(spec, spec),
            "delta_pct": None if spec == "fp32" else 100 * (r.ppl / base - 1),
        }
        row["load_average"] = os.getloadavg()[0]
        results.append(row)
        print(
            f"| {row['label']} | `{spec}` | {r.bits_per_weight:.3f} | {r.ppl:.3f} | {delta} | "
            f"{r.quantize_seconds:.1f} | {r.seconds:.1f} |",
            flush=True,
        )
    meta = {
        "machine": machine,
        "max_windows": a.max_windows,
        "calib_samples": a.calib_samples,
        "clip_search": a.clip_search,
        "seq_len": 512,
        "total_seconds": time.perf_counter() - t_all,
        "results": results,
    }
    atomic_write(Path(a.out), json.dumps(meta, indent=2))
    print(f"wrote {a.out} ({meta['total_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
