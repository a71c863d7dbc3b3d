"""``jaxquant finetune``: QLoRA fine-tuning of a model with a quantized base (a :mod:`jaxquant.cli` plugin).

::

    jaxquant finetune --scheme nf4-dq --lora-rank 8 --steps 200 --lr 2e-4 --seq-len 256 --batch-size 4 --out DIR

Trains LoRA adapters on the calibration split (``--text-file``: its first half), prints the loss curve and the
evaluation perplexity before and after (first ``--eval-windows`` windows of the evaluation split), and the
weight memory. With ``--out DIR`` it saves the fine-tuned model (``jaxquant eval --model DIR --scheme fp32``
evaluates it), ``DIR/finetune.json`` (settings, losses, results) and ``DIR/loss_curve.png``.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
from pathlib import Path
from typing import Any

from jaxquant.cli import positive_arg as _positive
from jaxquant.files import atomic_write

__all__ = ["register"]


def _non_negative(name: str, kind: type = int):
    def conv(v: str):
        try:
            x = kind(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number >= 0, got {v!r}") from None
        if not (x >= 0 and math.isfinite(x)):
            raise argparse.ArgumentTypeError(f"{name} must be a number >= 0, got {v!r}")
        return x

    return conv


def register(sub: Any) -> None:
    """Add the ``finetune`` subcommand to the ``jaxquant`` parser."""
    f = sub.add_parser("finetune", help="QLoRA: train LoRA adapters over a quantized (NF4) base")
    f.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a .gguf file, HF or saved folder")
    f.add_argument("--text-file", default=None, help="train on the first half of this text, evaluate on the rest")
    f.add_argument("--scheme", default="nf4-dq", help="base SPEC, weight-only (nf4-dq default, nf4, int4-g64...)")
    f.add_argument("--lora-rank", type=_positive("--lora-rank"), default=8, help="adapter rank (8)")
    f.add_argument("--lora-alpha", type=_positive("--lora-alpha", float), default=16.0, help="adapter alpha (16)")
    f.add_argument(
        "--targets",
        default=r"layers/\d+/(attn|mlp)/\w+_proj",
        help="regex of the module paths that get adapters (default: every block linear)",
    )
    f.add_argument("--steps", type=_positive("--steps"), default=100, help="optimizer steps (100)")
    f.add_argument("--lr", type=_positive("--lr", float), default=2e-4, help="peak learning rate (2e-4)")
    f.add_argument("--weight-decay", type=_non_negative("--weight-decay", float), default=0.0, help="AdamW decay")
    f.add_argument("--warmup", type=_non_negative("--warmup"), default=10, help="linear warm-up steps (10)")
    f.add_argument("--seq-len", type=_positive("--seq-len"), default=256, help="training window length (256)")
    f.add_argument("--batch-size", type=_positive("--batch-size"), default=4, help="windows per step (4)")
    f.add_argument("--seed", type=int, default=0, help="adapter init and data order (0)")
    f.add_argument("--eval-windows", type=_non_negative("--eval-windows"), default=16, help="0 skips evaluation")
    f.add_argument("--eval-seq-len", type=_positive("--eval-seq-len"), default=512, help="evaluation window (512)")
    f.add_argument("--eval-batch-size", type=_positive("--eval-batch-size"), default=4, help="evaluation batch")
    f.add_argument("--out", default=None, help="save the model, finetune.json and loss_curve.png here")
    f.add_argument("--json", action="store_true", help="print one JSON object at the end")
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.set_defaults(_run=_cmd_finetune)


def _base_scheme(name: str):
    from jaxquant.specs import BLOCK_LINEARS, parse_spec

    spec = parse_spec(name)
    if spec.build is not None or spec.build_model is not None or len(spec.rules) != 1 or spec.rules[0][1] is None:
        raise ValueError(
            f"--scheme {name!r}: finetune needs a weight-only SPEC with one scheme for all block linears "
            "(nf4-dq, nf4, int4-g64, int8, fp8-e4m3, bf16 ...)"
        )
    pattern, scheme = spec.rules[0]
    if pattern != BLOCK_LINEARS:
        raise ValueError(f"--scheme {name!r} does not quantize the block linears; pick e.g. nf4-dq")
    if getattr(scheme, "_qdot", None) is not None:
        raise ValueError(
            f"--scheme {name!r} quantizes activations too (no gradient through their rounding); "
            "finetune needs a weight-only SPEC (nf4-dq, nf4, int4-g64 ...)"
        )
    return scheme


def _loss_plot(losses: list[float], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(1, len(losses) + 1)
    ax.plot(x, losses, linewidth=0.8, alpha=0.5, label="loss per step")
    k = max(1, len(losses) // 20)
    if len(losses) >= 2 * k and k > 1:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1 :], smooth, linewidth=2, label=f"moving mean ({k} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _curve(losses: list[float], points: int = 10) -> str:
    """A few (step, mean loss of the steps up to the next point) pairs, as one line."""
    n = len(losses)
    edges = sorted({round(i * n / points) for i in range(points + 1)})
    parts = []
    for a, b in itertools.pairwise(edges):
        if b > a:
            parts.append(f"{b}:{sum(losses[a:b]) / (b - a):.3f}")
    return " ".join(parts)


def _cmd_finetune(a: argparse.Namespace) -> None:
    from jaxquant.eval.harness import load
    from jaxquant.eval.memory import format_bytes, peak_rss_bytes
    from jaxquant.qlora import QLoRAConfig, finetune, qlora_model

    scheme = _base_scheme(a.scheme)  # fail fast, before loading anything
    out = Path(a.out) if a.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; it must be a folder")
    config = QLoRAConfig(
        scheme=scheme,
        rank=a.lora_rank,
        alpha=a.lora_alpha,
        targets=a.targets,
        steps=a.steps,
        lr=a.lr,
        weight_decay=a.weight_decay,
        warmup_steps=a.warmup,
        seq_len=a.seq_len,
        batch_size=a.batch_size,
        seed=a.seed,
    )
    loaded = load(a.model, a.text_file)
    qmodel = qlora_model(loaded.model, config)
    res = finetune(
        qmodel,
        loaded.calib_tokens,
        config,
        eval_tokens=loaded.eval_tokens if a.eval_windows else None,
        eval_seq_len=a.eval_seq_len,
        eval_windows=a.eval_windows or None,
        eval_batch_size=a.eval_batch_size,
        progress=not a.no_progress,
    )
    mem = res.memory
    spec_name = f"{a.scheme}+lora-r{a.lora_rank}"
    summary = {
        "scheme": a.scheme,
        "model": loaded.name,
        "settings": {k: v for k, v in vars(a).items() if not k.startswith("_") and k not in ("json", "no_progress")},
        **res.as_dict(),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if out is not None:
        from jaxquant.io.checkpoint import save_model

        save_model(qmodel, out, tokenizer=loaded.tokenizer, metadata={"spec": spec_name, "finetune": summary})
        atomic_write(out / "finetune.json", json.dumps(summary, indent=1).encode(), mode=0o644)
        atomic_write(
            out / "loss_curve.png", _loss_plot(list(res.losses), f"QLoRA {spec_name} on {loaded.name}"), mode=0o644
        )
    if a.json:
        print(json.dumps(summary))
        return
    n = len(res.losses)
    first = sum(res.losses[: max(1, n // 10)]) / max(1, n // 10)
    last = sum(res.losses[-max(1, n // 10) :]) / max(1, n // 10)
    print(f"QLoRA {spec_name} on {loaded.name}: {a.steps} steps x {a.batch_size} x {a.seq_len} tokens, lr {a.lr:g}")
    print(f"train loss (step:mean) {_curve(list(res.losses))}")
    print(f"train loss first 10% {first:.4f} -> last 10% {last:.4f}")
    if a.eval_windows:
        delta = 100 * (res.ppl_after / res.ppl_before - 1)
        print(
            f"eval ppl ({a.eval_windows} windows x {a.eval_seq_len}): before {res.ppl_before:.3f} -> after "
            f"{res.ppl_after:.3f} ({delta:+.1f}%)"
        )
    print(
        f"weights: base {format_bytes(mem.base_bytes)} + adapters {format_bytes(mem.adapter_bytes)} "
        f"({res.trainable_params:,} trainable) = {format_bytes(mem.weight_bytes)} "
        f"(float32: {format_bytes(mem.float_bytes)}); AdamW state {format_bytes(mem.optimizer_bytes)}"
    )
    print(
        f"time: {res.train_seconds:.1f} s training, {res.step_seconds:.2f} s/step; "
        f"peak host memory {peak_rss_bytes() / 2**30:.2f} GiB"
    )
    if out is not None:
        print(f"wrote {out} (model, finetune.json, loss_curve.png)")
