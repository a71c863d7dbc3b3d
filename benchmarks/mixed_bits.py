"""Mixed bit widths vs uniform RTN on SmolLM2-135M: the README's table and ppl-vs-bpw curve.

    nice -n 10 python benchmarks/mixed_bits.py [--calib-samples 16] [--max-windows 16] [--targets 3.0,...]
        [--hessian-targets 3.5,...] [--proxies fisher,hessian] [--uniform int3-g128-asym,...]
        [--cache /tmp/mbcache] [--out benchmarks/results/mixed_bits]

For each sensitivity proxy, one calibration pass over ``--calib-samples`` windows of 512 tokens of the calibration
split gives every block linear's error and real bytes for the 18 candidate settings (int{2,3,4,5,6,8} x
g{128,64,32}, zero points): ``fisher`` = sum F dW^2 with the empirical diagonal Fisher (one backward pass per
window), ``hessian`` = tr(dW^T H dW) (one forward pass; position 0 weighted x20 as in the GPTQ recipe). For each
target bits/weight the allocator (:func:`jaxquant.algorithms.mixed_bits.allocate`) picks the plan, which is
applied by RTN and evaluated like any SPEC (``jaxquant eval``: first ``--max-windows`` windows of 512 tokens of
the evaluation split). A target ``=SPEC`` means "the bits/weight of that uniform SPEC" (equal-size comparisons).
Writes OUT.md (table), OUT.json (rows + plans) and OUT.png (the curve), atomically.
"""

from __future__ import annotations

import argparse
import io
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

DEFAULT_UNIFORM = (
    "int3-g128-asym",
    "int3-g64-asym",
    "int4-g128-asym",
    "int4-g64-asym",
    "int5-g128-asym",
    "int6-g128-asym",
)
DEFAULT_TARGETS = "3.0,=int3-g128-asym,3.5,4.0,=int4-g128-asym,4.5,5.0,6.0"


def _plot(uniform: list[dict], mixed: list[dict], base: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for proxy in sorted({r["proxy"] for r in mixed}):
        m = sorted((r for r in mixed if r["proxy"] == proxy), key=lambda r: r["bits_per_weight"])
        ax.plot([r["bits_per_weight"] for r in m], [r["ppl"] for r in m], "o-", label=f"mixed RTN ({proxy} proxy)")
    for r in uniform:
        ax.scatter(r["bits_per_weight"], r["ppl"], marker="s", color="k")
        ax.annotate(
            r["scheme"], (r["bits_per_weight"], r["ppl"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    ax.scatter([], [], marker="s", color="k", label="uniform RTN")
    ax.axhline(base, color="gray", linestyle="--", linewidth=1, label=f"fp32 {base:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight of the block linears (scales, zeros included)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("SmolLM2-135M: mixed bit widths vs uniform RTN")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--targets", default=DEFAULT_TARGETS)
    ap.add_argument("--uniform", default=",".join(DEFAULT_UNIFORM))
    ap.add_argument("--out", default="benchmarks/results/mixed_bits")
    ap.add_argument("--proxies", default="fisher,hessian", help="sensitivity proxies to compare (fisher, hessian)")
    ap.add_argument("--hessian-targets", default="3.5,=int4-g128-asym,4.5", help="targets of the hessian proxy")
    ap.add_argument("--cache", default=None, help="pickle of the costs (reused when it exists)")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args()

    from jaxquant.algorithms.mixed_bits import allocate
    from jaxquant.algorithms.mixed_model import model_costs
    from jaxquant.eval.harness import evaluate, load
    from jaxquant.specs import Spec, parse_spec

    t_all = time.perf_counter()
    loaded = load("smollm2-135m")
    commit = git_commit()
    machine = f"{platform.machine()}, {os.cpu_count()} cpus, jax {jax.__version__} {jax.default_backend()}"
    print(f"{machine}; commit {commit}; load average at start {os.getloadavg()[0]:.1f}", flush=True)

    def ev(spec):
        return evaluate(loaded, spec, max_windows=a.max_windows, progress=a.progress)

    base = ev("fp32")
    print(f"fp32 ppl {base.ppl:.3f}", flush=True)
    uniform = []
    for name in [s.strip() for s in a.uniform.split(",") if s.strip()]:
        r = ev(parse_spec(name))
        uniform.append({**r.as_dict(), "delta_pct": 100 * (r.ppl / base.ppl - 1)})
        print(f"uniform {name}: {r.bits_per_weight:.3f} bpw, ppl {r.ppl:.3f}", flush=True)
    ubpw = {r["scheme"]: r["bits_per_weight"] for r in uniform}
    mixed = []
    cost_s = {}
    for proxy in [p.strip() for p in a.proxies.split(",") if p.strip()]:
        cache = Path(f"{a.cache}.{proxy}.{a.calib_samples}.pkl") if a.cache else None
        t0 = time.perf_counter()
        if cache is not None and cache.exists():
            costs = pickle.loads(cache.read_bytes())
        else:
            costs = model_costs(
                loaded.model, loaded.calib_tokens, n_samples=a.calib_samples, proxy=proxy, progress=a.progress
            )
            if cache is not None:
                atomic_write(cache, pickle.dumps(costs))
        cost_s[proxy] = time.perf_counter() - t0
        print(f"{proxy}: {len(costs)} tensors x {len(costs[0].settings)} settings in {cost_s[proxy]:.0f} s", flush=True)
        targets = a.hessian_targets if proxy == "hessian" else a.targets
        for t in [s.strip() for s in targets.split(",") if s.strip()]:
            if t.startswith("="):
                target, label = ubpw[t[1:]], f"= {t[1:]}"
            else:
                target, label = float(t), t
            t1 = time.perf_counter()
            plan = allocate(costs, target)
            alloc_s = time.perf_counter() - t1
            spec = Spec(f"mixed-{target:.4g}-{proxy}", "mixed", rules=tuple(plan.rules()))
            r = ev(spec)
            assert abs(r.bits_per_weight - plan.bits_per_weight) < 1e-9 and r.bits_per_weight <= target
            mixed.append(
                {
                    **r.as_dict(),
                    "proxy": proxy,
                    "target": target,
                    "label": label,
                    "alloc_seconds": alloc_s,
                    "histogram": plan.histogram(),
                    "delta_pct": 100 * (r.ppl / base.ppl - 1),
                    "plan": plan.to_json(),
                }
            )
            hist = ", ".join(f"{k} x{v}" for k, v in plan.histogram().items())
            print(f"mixed/{proxy} {label}: {r.bits_per_weight:.3f} bpw, ppl {r.ppl:.3f} "
                  f"(allocated in {alloc_s:.1f} s; {hist})", flush=True)  # fmt: skip
    total = time.perf_counter() - t_all
    lines = [
        "# Mixed bit widths vs uniform RTN, SmolLM2-135M\n",
        f"`nice -n 10 python benchmarks/mixed_bits.py --calib-samples {a.calib_samples} --max-windows {a.max_windows}`"
        f" — {machine}, commit {commit}, {total / 60:.1f} min in all. Eval: first {a.max_windows} windows x 512 tokens"
        f" of the evaluation split; sensitivities from {a.calib_samples} x 512 calibration tokens"
        f" ({', '.join(f'{k} {v:.0f} s' for k, v in cost_s.items())})."
        " bpw over the block linears (tied embedding/head float in every row).\n",
        f"fp32: ppl {base.ppl:.3f}\n",
        "| scheme | bpw | ppl | Δ vs fp32 | settings chosen (tensors) |",
        "|---|---:|---:|---:|---|",
    ]
    rows = [(r["bits_per_weight"], f"uniform RTN `{r['scheme']}`", r, "all 210") for r in uniform]
    for r in mixed:
        hist = ", ".join(f"{k} ×{v}" for k, v in r["histogram"].items())
        rows.append((r["bits_per_weight"], f"**mixed/{r['proxy']}** (target {r['label']})", r, hist))
    for _, label, r, hist in sorted(rows, key=lambda x: x[0]):
        lines.append(f"| {label} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {r['delta_pct']:+.1f}% | {hist} |")
    out = Path(a.out)
    atomic_write(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    meta = {
        "machine": machine,
        "commit": commit,
        "calib_samples": a.calib_samples,
        "max_windows": a.max_windows,
        "fp32_ppl": base.ppl,
        "sensitivity_seconds": cost_s,
        "total_seconds": total,
        "uniform": uniform,
        "mixed": mixed,
    }
    atomic_write(out.with_suffix(".json"), json.dumps(meta, indent=1).encode())
    _plot(uniform, mixed, base.ppl, out.with_suffix(".png"))
    print("\n".join(lines[3:]))
    print(f"wrote {out}.md/.json/.png ({total:.0f} s in all)")


if __name__ == "__main__":
    main()
