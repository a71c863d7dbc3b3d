"""Mixed bit widths applied by GPTQ vs uniform GPTQ on SmolLM2-135M (companion of ``benchmarks/mixed_bits.py``).

    nice -n 10 python benchmarks/mixed_bits_gptq.py [--calib-samples 16] [--max-windows 8]
        [--targets 4.5,=gptq-int4-g128-asym] [--uniform gptq-int4-g128-asym] [--cache /tmp/mbcache]
        [--out benchmarks/results/mixed_bits_gptq]

Uniform rows are the ``gptq-*`` SPECs with ``calib_samples`` windows; mixed rows take the Fisher-proxy plan
(:func:`jaxquant.algorithms.mixed_model.model_costs`, cached like ``mixed_bits.py``) and apply it with true-sequential
GPTQ, each tensor with its own setting (:func:`jaxquant.algorithms.mixed_model.apply_plan`), on the same calibration
windows. Evaluation as ``jaxquant eval`` (first ``--max-windows`` windows of 512 tokens). Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import sys
import time
from pathlib import Path

import jax

from jaxquant.files import atomic_write

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.provenance import git_commit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--targets", default="4.5,=gptq-int4-g128-asym")
    ap.add_argument("--uniform", default="gptq-int4-g128-asym")
    ap.add_argument("--cache", default=None, help="prefix of the cost pickles written by mixed_bits.py --cache")
    ap.add_argument("--out", default="benchmarks/results/mixed_bits_gptq")
    a = ap.parse_args()

    from jaxquant.algorithms.mixed_bits import allocate
    from jaxquant.algorithms.mixed_model import MixedConfig, apply_plan, model_costs
    from jaxquant.eval.harness import evaluate, load
    from jaxquant.specs import Spec

    t_all = time.perf_counter()
    loaded = load("smollm2-135m")
    commit = git_commit()
    machine = f"{platform.machine()}, {os.cpu_count()} cpus, jax {jax.__version__} {jax.default_backend()}"
    print(f"{machine}; commit {commit}; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    opts = {"calib_samples": a.calib_samples, "progress": False}

    def ev(spec, options=None):
        return evaluate(loaded, spec, max_windows=a.max_windows, progress=False, options=options)

    base = ev("fp32").ppl
    rows = []
    ubpw = {}
    for name in [s.strip() for s in a.uniform.split(",") if s.strip()]:
        r = ev(name, opts)
        ubpw[name] = r.bits_per_weight
        rows.append({**r.as_dict(), "label": f"uniform `{name}`"})
        print(f"{name}: {r.bits_per_weight:.3f} bpw, ppl {r.ppl:.3f}, quantize {r.quantize_seconds:.0f} s", flush=True)
    cache = Path(f"{a.cache}.fisher.{a.calib_samples}.pkl") if a.cache else None
    if cache is not None and cache.exists():
        costs = pickle.loads(cache.read_bytes())
    else:
        costs = model_costs(loaded.model, loaded.calib_tokens, n_samples=a.calib_samples, progress=False)
    for t in [s.strip() for s in a.targets.split(",") if s.strip()]:
        target = ubpw[t[1:]] if t.startswith("=") else float(t)
        plan = allocate(costs, target, method="gptq")
        cfg = MixedConfig(target, method="gptq", n_samples=a.calib_samples)

        def build(model, calib, options, plan=plan, cfg=cfg):
            return apply_plan(model, plan, calib, cfg, progress=False)

        r = ev(Spec(f"mixed-{target:.4g}-gptq", "mixed gptq", build=build), {})
        assert abs(r.bits_per_weight - plan.bits_per_weight) < 1e-9
        rows.append({**r.as_dict(), "label": f"**mixed GPTQ** (target {t})", "histogram": plan.histogram()})
        print(f"mixed gptq {t}: {r.bits_per_weight:.3f} bpw, ppl {r.ppl:.3f}, quantize {r.quantize_seconds:.0f} s",
              flush=True)  # fmt: skip
    total = time.perf_counter() - t_all
    lines = [
        "# Mixed bit widths applied by GPTQ vs uniform GPTQ, SmolLM2-135M\n",
        f"`nice -n 10 python benchmarks/mixed_bits_gptq.py --calib-samples {a.calib_samples} --max-windows "
        f"{a.max_windows}` — {machine}, commit {commit}, {total / 60:.1f} min in all. fp32 ppl {base:.3f}.\n",
        "| scheme | bpw | ppl | Δ vs fp32 | quantize s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["bits_per_weight"]):
        lines.append(
            f"| {r['label']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {100 * (r['ppl'] / base - 1):+.1f}% | "
            f"{r['quantize_seconds']:.0f} |"
        )
    out = Path(a.out)
    atomic_write(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    meta = {"machine": machine, "commit": commit, "fp32_ppl": base, "total_seconds": total, "rows": rows}
    meta.update(calib_samples=a.calib_samples, max_windows=a.max_windows)
    atomic_write(out.with_suffix(".json"), json.dumps(meta, indent=1).encode())
    print("\n".join(lines[2:]))


if __name__ == "__main__":
    main()
