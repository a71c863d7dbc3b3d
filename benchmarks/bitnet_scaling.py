"""Float vs BitNet b1.58 vs ternary PTQ at several model sizes, same token budget: the README's scaling table.

    python benchmarks/bitnet_scaling.py [--sizes 0.5M,2M,8M] [--steps 200] [--batch-size 16] [--seq-len 128]
        [--lr-float 2e-3] [--lr-bitnet 4e-3] [--eval-windows 128] [--fp8-sizes 0.5M]
        [--out benchmarks/results/bitnet_scaling.json] [--plot benchmarks/results/bitnet_scaling.png]

For every size (a :data:`jaxquant.train.TINY_SIZES` preset, or ``DIMxLAYERSxHEADSxHIDDEN`` for anything larger,
e.g. on a GPU) it trains, from the same initialisation and on the same batches (the calibration split of the
Wikipedia text, as bytes):

* a float model (AdamW, warm-up + cosine decay, ``--lr-float``);
* a BitNet b1.58 model (every block linear a :class:`jaxquant.qat.BitLinearTrain`: SubLN, int8 per-token
  activations, absmean ternary weights, STE; the two-stage BitNet recipe with peak ``--lr-bitnet``), then
  exported to packed :class:`jaxquant.nn.BitLinear` layers (2 bits/weight) and evaluated in that form;

and evaluates the float model after two post-training quantizations of its block linears: ternary absmean
weights only (W1.58A16, :class:`jaxquant.TernaryScheme`), and the BitNet inference format W1.58A8
(:class:`jaxquant.nn.BitLinear` without the SubLN the float model never had). With ``--fp8-sizes`` it also
trains those sizes with fp8 linears (e4m3 forward, e5m2 gradients, delayed scaling) for the fp8-vs-float
comparison. Embeddings, norms and the (tied) output head stay float everywhere.

Perplexity is per byte (vocabulary 256) over the first ``--eval-windows`` windows of ``--seq-len`` bytes of
the evaluation split. Prints a markdown table, writes JSON (atomically) and a plot. Wall times depend on the
machine's load (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

import jaxquant as jq
from jaxquant.eval.text import calib_text, eval_text
from jaxquant.files import atomic_write
from jaxquant.models import LlamaConfig, model_params, with_params
from jaxquant.nn import BitLinear, quantize_model
from jaxquant.qat import BLOCK_LINEARS
from jaxquant.train import TINY_SIZES, ByteTokenizer, TrainConfig, Trainer, non_embedding_params, tiny_config

PTQ_RULES = [(BLOCK_LINEARS + "/kernel", jq.TernaryScheme())]


def model_config(size: str, seq_len: int) -> LlamaConfig:
    """A preset name or ``DIMxLAYERSxHEADSxHIDDEN``."""
    if size in TINY_SIZES:
        return tiny_config(size, max_seq_len=seq_len)
    try:
        dim, layers, heads, hidden = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise SystemExit(
            f"error: size {size!r} is neither a preset {sorted(TINY_SIZES)} nor DIMxLAYERSxHEADSxHIDDEN"
        ) from None
    kv = heads // 2 if heads % 2 == 0 else heads
    return LlamaConfig(256, dim, layers, heads, kv, hidden, tie_embeddings=True, max_seq_len=seq_len)


def eval_model(model: nnx.Module, windows: np.ndarray, batch_size: int = 8) -> float:
    """Per-byte perplexity of ``model`` on ``(n, T)`` windows (predictions 2..T)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, toks):
        logits = nnx.merge(graphdef, state)(toks)[:, :-1]
        logp = jax.nn.log_softmax(logits.astype(np.float32), axis=-1)
        return -np.float32(1.0) * jax.numpy.take_along_axis(logp, toks[:, 1:, None], axis=-1).sum()

    total = 0.0
    for i in range(0, len(windows), batch_size):
        total += float(nll(state, jax.numpy.asarray(windows[i : i + batch_size])))
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def run_size(size: str, args: argparse.Namespace, train: np.ndarray, windows: np.ndarray, log) -> dict[str, Any]:
    mc = model_config(size, args.seq_len)
    common = dict(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=args.warmup, seed=args.seed
    )
    row: dict[str, Any] = {"size": size, "non_embedding_params": non_embedding_params(mc), "params": mc.num_params()}
    row["config"] = {"dim": mc.dim, "n_layers": mc.n_layers, "n_heads": mc.n_heads, "hidden_dim": mc.hidden_dim}

    t = time.perf_counter()
    fl = Trainer(TrainConfig(mc, mode="float", lr=args.lr_float, weight_decay=0.1, **common), train)
    fl.run(progress=args.progress)
    row["float_train_s"] = time.perf_counter() - t
    row["float_final_loss"] = float(np.mean([v for _, v in fl.history[-10:]]))
    fmodel = fl.float_model()
    row["float_ppl"] = eval_model(fmodel, windows)
    log(f"{size}: float ppl {row['float_ppl']:.3f} ({row['float_train_s']:.0f} s)")

    qparams = jq.quantize_params(model_params(fmodel), PTQ_RULES, strict=True)
    row["ptq_ternary_ppl"] = eval_model(with_params(fmodel, qparams), windows)
    w8 = quantize_model(nnx.clone(fmodel), [(BLOCK_LINEARS, lambda m: BitLinear.from_linear(m))], strict=True)
    row["ptq_w158a8_ppl"] = eval_model(w8, windows)
    log(f"{size}: PTQ ternary W-only ppl {row['ptq_ternary_ppl']:.3f}, PTQ W1.58A8 ppl {row['ptq_w158a8_ppl']:.3f}")

    t = time.perf_counter()
    bn = Trainer(TrainConfig(mc, mode="bitnet", lr=args.lr_bitnet, weight_decay=0.1, **common), train)
    bn.run(progress=args.progress)
    row["bitnet_train_s"] = time.perf_counter() - t
    row["bitnet_final_loss"] = float(np.mean([v for _, v in bn.history[-10:]]))
    exported = bn.export()
    row["bitnet_ppl"] = eval_model(exported, windows)
    row["bitnet_qat_ppl"] = eval_model(bn.model(), windows)
    rep = jq.report(nnx.to_pure_dict(nnx.state(exported, nnx.Any(nnx.Param, jq.nn.QWeight)))["layers"])
    row["bitnet_block_bpw"] = rep.bits_per_weight
    row["ratio"] = row["bitnet_ppl"] / row["float_ppl"]
    qat = row["bitnet_qat_ppl"]
    log(f"{size}: BitNet ppl {row['bitnet_ppl']:.3f} (QAT forward {qat:.3f}), {rep.bits_per_weight:.3f} bpw")

    if size in args.fp8_sizes:
        t = time.perf_counter()
        f8 = Trainer(TrainConfig(mc, mode="fp8", lr=args.lr_float, weight_decay=0.1, **common), train)
        f8.run(progress=args.progress)
        row["fp8_train_s"] = time.perf_counter() - t
        row["fp8_ppl"] = eval_model(f8.model(), windows)
        row["fp8_vs_float_loss"] = math.log(row["fp8_ppl"]) / math.log(row["float_ppl"]) - 1.0
        log(f"{size}: fp8 ppl {row['fp8_ppl']:.3f} (eval loss {100 * row['fp8_vs_float_loss']:+.2f}% vs float)")
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| size | non-emb. params | float ppl | BitNet b1.58 ppl | BitNet / float | PTQ ternary (W-only) ppl "
        "| PTQ W1.58A8 ppl | BitNet bpw | train s (float / BitNet) |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['non_embedding_params'] / 1e6:.2f} M | {r['float_ppl']:.3f} | {r['bitnet_ppl']:.3f} "
            f"| {r['ratio']:.3f} | {r['ptq_ternary_ppl']:.1f} | {r['ptq_w158a8_ppl']:.1f} "
            f"| {r['bitnet_block_bpw']:.3f} "
            f"| {r['float_train_s']:.0f} / {r['bitnet_train_s']:.0f} |"
        )
    fp8 = [r for r in rows if "fp8_ppl" in r]
    if fp8:
        lines += [
            "",
            "| size | float eval loss | fp8 (e4m3/e5m2, delayed) eval loss | difference |",
            "|---|---|---|---|",
        ]
        for r in fp8:
            lf, l8 = math.log(r["float_ppl"]), math.log(r["fp8_ppl"])
            lines.append(f"| {r['size']} | {lf:.4f} | {l8:.4f} | {100 * (l8 / lf - 1):+.2f}% |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["non_embedding_params"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(n, [r["float_ppl"] for r in rows], "o-", label="float")
    ax.plot(n, [r["bitnet_ppl"] for r in rows], "s-", label="BitNet b1.58 (QAT, exported)")
    ax.plot(n, [r["ptq_ternary_ppl"] for r in rows], "x--", label="ternary PTQ of float (W-only)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("eval perplexity per byte")
    ax.set_title("same token budget per size")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5M,2M,8M")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--lr-float", type=float, default=2e-3)
    ap.add_argument("--lr-bitnet", type=float, default=4e-3)
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--fp8-sizes", default=None, help="sizes also trained in fp8 (default: the smallest; '' none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/bitnet_scaling.json")
    ap.add_argument("--plot", default="benchmarks/results/bitnet_scaling.png")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    args.fp8_sizes = sizes[:1] if args.fp8_sizes is None else [s for s in args.fp8_sizes.split(",") if s]
    for name in ("steps", "batch_size", "seq_len", "eval_windows"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    tok = ByteTokenizer()
    train, ev = tok.encode(calib_text()), tok.encode(eval_text())
    n = min(args.eval_windows, ev.size // args.seq_len)
    windows = ev[: n * args.seq_len].reshape(n, args.seq_len)
    budget = args.steps * args.batch_size * args.seq_len
    log(f"train {train.size:,} bytes, eval {n} x {args.seq_len} bytes; budget {budget:,} bytes per model")
    rows = [run_size(s, args, train, windows, log) for s in sizes]
    wall = time.perf_counter() - t0
    md = table(rows)
    print(md)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "plot", "progress")}
    meta = {
        "settings": settings,
        "token_budget_bytes": budget,
        "wall_seconds": wall,
        "load_average": os.getloadavg(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__} {jax.default_backend()}",
        "command": " ".join(sys.argv),
    }
    print(f"\nwall time {wall:.0f} s; load average {os.getloadavg()[0]:.1f}; {meta['machine']}")
    if args.out:
        atomic_write(Path(args.out), json.dumps({"rows": rows, **meta}, indent=1).encode())
    if args.plot:
        plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()
