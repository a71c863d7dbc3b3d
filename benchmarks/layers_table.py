"""The issue-5 measurements on SmolLM2-135M: W8A8 (LLM.int8 and its baselines, fp8 dynamic/static/delayed),
4-bit weight-only (NF4 vs int4 RTN vs NF4 + double quant), ternary post-training, and a short QLoRA run.

One command (about 15-25 minutes on 2 CPU cores)::

    python benchmarks/layers_table.py                      # writes benchmarks/results/layers_table.json

Protocol: the first ``--max-windows`` (16) windows x ``--seq-len`` (512) tokens of the evaluation split
(:func:`jaxquant.eval.perplexity`), batches of 4. Every row is a SPEC evaluated by the harness
(:func:`jaxquant.eval.harness.evaluate`), except:

* ``llm-int8`` is also run as :class:`~jaxquant.nn.Int8OutlierLinear` layers with ``track_outliers=True``
  through :func:`~jaxquant.nn.stateful_perplexity` (same arithmetic, so the same perplexity) to count, per
  layer and per call (one call = one batch of 4 x 512 tokens), the fraction of input feature dims with
  ``max |x| > 6``;
* ``fp8-e4m3-w8a8-delayed`` runs through :func:`~jaxquant.nn.stateful_perplexity`, so the amax history (warmed
  on the calibration batches) keeps rolling over the evaluation batches, as in training/serving.

The QLoRA row fine-tunes adapters (rank 8, all block linears) over an NF4 + double-quant base on the
calibration split (``--qlora-steps`` x ``--qlora-batch-size`` x ``--qlora-seq-len`` tokens) and reports the
perplexity of the same evaluation windows before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from jaxquant.files import atomic_write

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.provenance import git_commit

ROOT = Path(__file__).resolve().parent.parent

#: (row label, SPEC)
ROWS = [
    ("fp32", "fp32"),
    ("LLM.int8 (threshold 6)", "llm-int8"),
    ("int8 absmax W8A8 (per tensor)", "int8-absmax-w8a8"),
    ("int8 vector-wise W8A8", "int8-vectorwise-w8a8"),
    ("fp8 e4m3 W8A8 dynamic (per tensor)", "fp8-e4m3-w8a8"),
    ("fp8 e4m3 W8A8 dynamic (per token)", "fp8-e4m3-w8a8-token"),
    ("fp8 e4m3 W8A8 static (calibrated)", "fp8-e4m3-w8a8-static"),
    ("fp8 e4m3 W8A8 delayed (history 16)", "fp8-e4m3-w8a8-delayed"),
    ("fp8 e5m2 W8A8 dynamic (per tensor)", "fp8-e5m2-w8a8"),
    ("NF4 (blocks of 64)", "nf4"),
    ("int4 RTN g64 sym", "int4-g64"),
    ("NF4 + double quant", "nf4-dq"),
    ("ternary PTQ (BitLinear)", "ternary-ptq"),
]


def _outlier_run(loaded: Any, args: argparse.Namespace) -> tuple[float, dict[str, Any]]:
    """LLM.int8 as tracked layers: ``(ppl, outlier summary)``."""
    from jaxquant.nn import Int8OutlierLinear, quantize_model, stateful_perplexity

    model = quantize_model(
        nnx.clone(loaded.model),
        [(r"layers/\d+/(attn|mlp)/\w+_proj", lambda m: Int8OutlierLinear.from_linear(m, track_outliers=True))],
        strict=True,
    )
    res = stateful_perplexity(
        model, loaded.eval_tokens, seq_len=args.seq_len, max_windows=args.max_windows, batch_size=4, progress=False
    )
    per_layer = {}
    for path, m in nnx.iter_graph(model):
        if isinstance(m, Int8OutlierLinear):
            per_layer["/".join(map(str, path))] = (m.outlier_fraction_mean, float(m.outlier_fraction_max[...]))
    means = np.array([v[0] for v in per_layer.values()])
    by_kind: dict[str, list[float]] = {}
    for p, (mean, _) in per_layer.items():
        by_kind.setdefault(p.rsplit("/", 1)[1], []).append(mean)
    worst = max(per_layer, key=lambda p: per_layer[p][0])
    summary = {
        "mean_over_layers": float(means.mean()),
        "max_over_layers": float(means.max()),
        "max_single_call": float(max(v[1] for v in per_layer.values())),
        "worst_layer": worst,
        "layers_with_any_outlier": int(np.sum(means > 0)),
        "n_layers": len(means),
        "by_projection_mean": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())},
        "by_projection_max": {k: float(np.max(v)) for k, v in sorted(by_kind.items())},
        "per_layer": {k: {"mean": v[0], "max": v[1]} for k, v in per_layer.items()},
    }
    return res.ppl, summary


def _delayed_run(loaded: Any, args: argparse.Namespace) -> tuple[float, float]:
    """``(ppl with the history rolling, seconds)`` for fp8-e4m3-w8a8-delayed."""
    from jaxquant.eval.harness import quantize_model as harness_quantize
    from jaxquant.nn import stateful_perplexity
    from jaxquant.specs import parse_spec

    t0 = time.perf_counter()
    qmodel, _ = harness_quantize(loaded.model, parse_spec("fp8-e4m3-w8a8-delayed"), loaded.calib_tokens)
    res = stateful_perplexity(
        qmodel, loaded.eval_tokens, seq_len=args.seq_len, max_windows=args.max_windows, batch_size=4, progress=False
    )
    return res.ppl, time.perf_counter() - t0


def _qlora(loaded: Any, args: argparse.Namespace) -> dict[str, Any]:
    from jaxquant.qlora import QLoRAConfig, finetune, qlora_model

    cfg = QLoRAConfig(
        rank=8,
        steps=args.qlora_steps,
        lr=args.qlora_lr,
        seq_len=args.qlora_seq_len,
        batch_size=args.qlora_batch_size,
        warmup_steps=10,
    )
    t0 = time.perf_counter()
    q = qlora_model(loaded.model, cfg)
    res = finetune(
        q,
        loaded.calib_tokens,
        cfg,
        eval_tokens=loaded.eval_tokens,
        eval_seq_len=args.seq_len,
        eval_windows=args.max_windows,
        progress=not args.no_progress,
    )
    d = res.as_dict()
    d["settings"] = {k: str(v) if k == "scheme" else v for k, v in dataclasses.asdict(cfg).items()}
    d["seconds_total"] = time.perf_counter() - t0
    return d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rows", default="all", help="comma-separated SPECs of ROWS to run (default: all)")
    p.add_argument("--qlora-steps", type=int, default=100, help="0 skips the QLoRA run")
    p.add_argument("--qlora-seq-len", type=int, default=256)
    p.add_argument("--qlora-batch-size", type=int, default=1)
    p.add_argument("--qlora-lr", type=float, default=1e-3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "layers_table.json"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import jax

    from jaxquant.eval.harness import evaluate, load

    t_all = time.perf_counter()
    loaded = load()
    _ = loaded.calib_tokens
    machine = f"{platform.machine()} {os.cpu_count()} cpus, {jax.devices()[0].platform}, jax {jax.__version__}"
    print(f"# {machine}, commit {git_commit()}, {args.max_windows} windows x {args.seq_len} tokens", flush=True)
    wanted = None if args.rows == "all" else {s.strip() for s in args.rows.split(",")}
    rows: list[dict[str, Any]] = []
    base = None
    extra: dict[str, Any] = {}
    print(f"| {'scheme':<36} | {'SPEC':<22} | {'bpw':>6} | {'ppl':>9} | {'Δ vs fp32':>9} | {'s':>6} |", flush=True)
    print(f"|{'-' * 38}|{'-' * 24}|{'-' * 8}|{'-' * 11}|{'-' * 11}|{'-' * 8}|", flush=True)
    for label, spec in ROWS:
        if wanted is not None and spec not in wanted and spec != "fp32":
            continue
        r = evaluate(loaded, spec, seq_len=args.seq_len, max_windows=args.max_windows, batch_size=4, progress=False)
        row = {"label": label, "spec": spec, **r.as_dict(), "wall_seconds": r.seconds + r.quantize_seconds}
        if spec == "fp32":
            base = r.ppl
        if spec == "fp8-e4m3-w8a8-delayed":
            row["ppl_frozen_history"] = r.ppl  # the harness's pure per-batch calls: history as warmed
            row["ppl"], row["wall_seconds"] = _delayed_run(loaded, args)
        if spec == "llm-int8":
            ppl_tracked, extra["llm_int8_outliers"] = _outlier_run(loaded, args)
            row["ppl_tracked_layers"] = ppl_tracked
        rows.append(row)
        ratio = None if base is None or spec == "fp32" else row["ppl"] / base
        delta = "" if ratio is None else ("collapse" if ratio > 100 else f"{100 * (ratio - 1):+.1f}%")
        ppl = f"{row['ppl']:.3f}" if row["ppl"] < 1e4 else f"{row['ppl']:.3g}"
        print(
            f"| {label:<36} | {spec:<22} | {row['bits_per_weight']:>6.3f} | {ppl:>9} | {delta:>9} | "
            f"{row['wall_seconds']:>6.1f} |",
            flush=True,
        )
    if "llm_int8_outliers" in extra:
        o = extra["llm_int8_outliers"]
        pct = {k: f"{100 * o[k]:.2f}%" for k in ("mean_over_layers", "max_over_layers", "max_single_call")}
        print(f"\nLLM.int8 outlier feature dims (|x| > 6; one call = a batch of 4 windows x {args.seq_len} tokens):")
        print(
            f"  mean over the {o['n_layers']} layers {pct['mean_over_layers']}, max layer {pct['max_over_layers']} "
            f"({o['worst_layer']}), max single call {pct['max_single_call']}; "
            f"layers with any: {o['layers_with_any_outlier']}"
        )
        kinds = o["by_projection_mean"]
        per = [f"{k} {100 * v:.2f}/{100 * o['by_projection_max'][k]:.2f}%" for k, v in kinds.items()]
        print("  by projection (mean / max layer): " + ", ".join(per), flush=True)
    if args.qlora_steps > 0:
        q = _qlora(loaded, args)
        extra["qlora"] = q
        n = len(q["losses"])
        k = max(1, n // 10)
        mem = {key: v / 2**20 for key, v in q["memory"].items()}
        first, last = np.mean(q["losses"][:k]), np.mean(q["losses"][-k:])
        change = 100 * (q["ppl_after"] / q["ppl_before"] - 1)
        print(
            f"\nQLoRA nf4-dq + LoRA r8 (all block linears), {n} steps x {args.qlora_batch_size} x {args.qlora_seq_len}"
        )
        print(f"  tokens, lr {args.qlora_lr:g}: train loss first {k} steps {first:.3f} -> last {k} steps {last:.3f}")
        print(f"  eval ppl {q['ppl_before']:.3f} -> {q['ppl_after']:.3f} ({change:+.1f}%)")
        print(
            f"  weights: base {mem['base_bytes']:.1f} MiB + adapters {mem['adapter_bytes']:.2f} MiB = "
            f"{mem['weight_bytes']:.1f} MiB (float32 {mem['float_bytes']:.1f} MiB); "
            f"AdamW state {mem['optimizer_bytes']:.2f} MiB"
        )
        print(f"  {q['step_seconds']:.2f} s/step, {q['seconds_total']:.0f} s in all", flush=True)
    meta = {
        "machine": machine,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "max_windows": args.max_windows,
        "seq_len": args.seq_len,
        "rows": rows,
        **extra,
        "seconds_total": time.perf_counter() - t_all,
    }
    atomic_write(Path(args.out), json.dumps(meta, indent=1), mode=0o644)
    print(f"\nwrote {args.out} ({meta['seconds_total']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
