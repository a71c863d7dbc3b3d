"""QAT fine-tuning of SmolLM2-135M from its pretrained weights, compared with RTN (and optionally GPTQ).

    python benchmarks/smollm2_qat.py [--scheme int4-g128] [--steps 100] [--lsq] [--lr 2e-5]
        [--seq-len 256] [--batch-size 4] [--max-windows 16] [--gptq] [--out benchmarks/results/smollm2_qat.json]

Every linear layer of the transformer blocks goes through :func:`jaxquant.qat.fake_quantize_params` with the
symmetric int scheme (``int{bits}-g{group}``; embeddings, norms and the tied head stay float) inside the loss,
and the float latent weights (plus, with ``--lsq``, LSQ step sizes started at the RTN scales) are trained with
AdamW on the calibration split (next-token loss, ``--seq-len`` windows). At step 0 the fake-quantized model *is*
the RTN model (QAT forward == dequantize(quantize(w))), so the "before" row is RTN. After training, the weights are
exported to real packed QArrays (:meth:`jaxquant.train.Trainer.export`) and evaluated exactly like
``jaxquant eval`` (first ``--max-windows`` windows of 512 tokens of the evaluation split). ``--gptq`` adds the
GPTQ row of the same format (``jaxquant eval --scheme gptq-int4-g128``). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax

import jaxquant as jq
from jaxquant.eval.harness import LoadedModel, evaluate, load
from jaxquant.train import TrainConfig, Trainer


def _scheme(spec: str) -> jq.IntScheme:
    m = re.fullmatch(r"int([2-8])-g(\d+)", spec)
    if not m:
        raise SystemExit(f"error: --scheme must look like int4-g128 (symmetric int, grouped), got {spec!r}")
    return jq.IntScheme(int(m.group(1)), int(m.group(2)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", default="int4-g128")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lsq", action="store_true", help="also learn the step sizes (LSQ)")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--gptq", action="store_true", help="also evaluate GPTQ at the same format")
    ap.add_argument("--out", default="benchmarks/results/smollm2_qat.json")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    scheme = _scheme(args.scheme)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    loaded = load("smollm2-135m")
    rows = []

    def ev(name: str, spec: str, model=None) -> None:
        lm = loaded if model is None else LoadedModel(name, model, loaded.tokenizer, loaded.eval_tokens, 0.0)
        r = evaluate(lm, spec, max_windows=args.max_windows, progress=args.progress)
        rows.append({"row": name, "ppl": r.ppl, "bits_per_weight": r.bits_per_weight, "seconds": r.seconds})
        log(f"{name}: ppl {r.ppl:.3f} ({r.bits_per_weight:.3f} bpw, {r.seconds:.0f} s)")

    ev("fp32", "fp32")
    ev(f"RTN {args.scheme}", args.scheme)
    if args.gptq:
        ev(f"GPTQ {args.scheme}", f"gptq-{args.scheme}")
    cfg = TrainConfig(
        loaded.model.config,
        mode="qat",
        qat_scheme=scheme,
        lsq=args.lsq,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        weight_decay=0.0,
        warmup_steps=min(10, args.steps // 10),
    )
    trainer = Trainer(cfg, loaded.calib_tokens, model=loaded.model)
    t = time.perf_counter()
    trainer.run(progress=args.progress, log_every=max(args.steps // 10, 1))
    train_s = time.perf_counter() - t
    losses = [v for _, v in trainer.history]
    last = sum(losses[-10:]) / len(losses[-10:])
    log(f"QAT: {args.steps} steps in {train_s:.0f} s; loss {losses[0]:.3f} -> {last:.3f} (mean of the last 10)")
    label = f"QAT{'+LSQ' if args.lsq else ''} {args.scheme}, {args.steps} steps"
    ev(label, "fp32", trainer.export())
    rows[-1]["train_seconds"] = train_s
    wall = time.perf_counter() - t0

    print(f"| model | bpw | ppl (first {args.max_windows} x 512 eval tokens) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} |")
    budget = f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens"
    print(f"\nQAT training {train_s:.0f} s ({budget}); wall {wall:.0f} s")
    print(
        f"load average {os.getloadavg()[0]:.1f}; JAX {jax.__version__} {jax.default_backend()}, {os.cpu_count()} cores"
    )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "rows": rows,
            "settings": vars(args),
            "wall_seconds": wall,
            "losses": losses,
            "command": " ".join(sys.argv),
        }
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, out)


if __name__ == "__main__":
    main()
