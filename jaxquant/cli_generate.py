"""``jaxquant generate``: text from a (quantized) model with the KV-cache decoder of :mod:`jaxquant.generate`.

Registered in :data:`jaxquant.cli._PLUGINS`::

    jaxquant generate --scheme int8 --prompt "The capital of France is" [--max-new-tokens 64]
    jaxquant generate --scheme nf4 --chat --prompt "Write a haiku about JAX." --temperature 0.7 --top-p 0.9
    jaxquant generate --scheme int4-g128 --kv-cache int8 --prompt "One" --prompt "Two prompts, one batch"

The text (prompt followed by its continuation) goes to stdout, one block per prompt; a timing line goes to
stderr. Several ``--prompt`` form one left-padded batch. Generation stops at the tokenizer's end-of-sequence
token (``--no-stop``: never). User errors are one line ``jaxquant: error: ...`` with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

__all__ = ["register"]


def _float_in(name: str, lo: float, hi: float, lo_open: bool):
    def conv(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {v!r}") from None
        ok = math.isfinite(x) and (x > lo if lo_open else x >= lo) and x <= hi
        if not ok:
            rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise argparse.ArgumentTypeError(f"{name} must be in {rng}, got {v!r}")
        return x

    return conv


def _int_at_least(name: str, lo: int):
    def conv(v: str) -> int:
        try:
            i = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= {lo}, got {v!r}") from None
        if i < lo:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= {lo}, got {v!r}")
        return i

    return conv


def register(subparsers: Any) -> None:
    """Add the ``generate`` subcommand to ``jaxquant``'s argparse subparsers."""
    g = subparsers.add_parser("generate", help="generate text with a quantized model (KV-cache decoding)")
    g.add_argument("--scheme", default="fp32", help="a SPEC, e.g. int8, int4-g128, nf4 (default fp32)")
    g.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    g.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a .gguf file or a model folder")
    g.add_argument(
        "--max-new-tokens", type=_int_at_least("--max-new-tokens", 1), default=64, help="tokens to generate (64)"
    )
    g.add_argument(
        "--temperature",
        type=_float_in("--temperature", 0.0, 100.0, False),
        default=0.0,
        help="0 = greedy (default); > 0 samples",
    )
    g.add_argument("--top-p", type=_float_in("--top-p", 0.0, 1.0, True), default=1.0, help="nucleus sampling (1.0)")
    g.add_argument("--top-k", type=_int_at_least("--top-k", 0), default=0, help="top-k sampling (0 = off)")
    g.add_argument("--seed", type=_int_at_least("--seed", 0), default=0, help="sampling seed (0)")
    g.add_argument("--kv-cache", choices=("none", "int8", "fp8"), default="none", help="KV-cache quantization")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a ChatML user turn (instruct models)")
    g.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-sequence token")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    g.set_defaults(_run=_cmd_generate)


def _load(model: str) -> tuple[Any, Any, str | None]:
    """``(model, tokenizer, saved SPEC or None)`` for a model name, file or folder."""
    from jaxquant.eval import assets
    from jaxquant.io.checkpoint import is_checkpoint
    from jaxquant.io.checkpoint import load_model as load_saved_model
    from jaxquant.models import load_model

    path = assets.model_path(model)
    saved_spec = None
    if is_checkpoint(path):
        m, tok, meta = load_saved_model(path)
        saved_spec = meta.get("spec") or "saved"
    else:
        m, tok = load_model(path)
    if tok is None:
        raise ValueError(f"{path}: no tokenizer found (an HF folder needs tokenizer.json)")
    return m, tok, saved_spec


def _chatml(tok: Any, prompt: str) -> str:
    if tok.token_to_id("<|im_start|>") is None or tok.token_to_id("<|im_end|>") is None:
        raise ValueError("--chat needs a ChatML tokenizer (<|im_start|>/<|im_end|> tokens); this model has none")
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def _stop_ids(tok: Any) -> list[int]:
    ids = [] if tok.eos_id is None else [int(tok.eos_id)]
    eot = tok.token_to_id("<|endoftext|>")
    if eot is not None and int(eot) not in ids:
        ids.append(int(eot))
    return ids


def _cmd_generate(a) -> None:
    from jaxquant.eval.harness import quantize_model
    from jaxquant.generate import generate
    from jaxquant.specs import parse_spec

    spec = parse_spec(a.scheme)  # fail fast, before loading anything
    if any(not p.strip() for p in a.prompt):
        raise ValueError("--prompt is empty")
    model, tok, saved_spec = _load(a.model)
    if saved_spec is not None and not spec.is_float:
        raise ValueError(f"{a.model} is already quantized ({saved_spec}); run it with --scheme fp32")
    texts = [_chatml(tok, p) if a.chat else p for p in a.prompt]
    prompts = [tok.encode(t) for t in texts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt encodes to no tokens")
    calib = None
    if spec.build is not None or getattr(spec, "build_model", None) is not None:  # calibrated / layer SPECs
        from jaxquant.eval import text
        from jaxquant.eval.perplexity import encode

        calib = encode(text.calib_text(), tok)
    t0 = time.perf_counter()
    qmodel, _ = quantize_model(model, spec, calib)
    tq = time.perf_counter() - t0
    stop = [] if a.no_stop else _stop_ids(tok)
    t0 = time.perf_counter()
    out = generate(
        qmodel,
        prompts,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        seed=a.seed,
        eos_id=stop,
        kv_quant=None if a.kv_cache == "none" else a.kv_cache,
    )
    tg = time.perf_counter() - t0
    rows = []
    for text_in, seq, done in zip(texts, out.sequences(), out.finished):
        shown = seq[:-1] if done else seq  # the stop token itself is not printed
        rows.append({"prompt": text_in, "text": tok.decode(shown), "tokens": seq, "stopped": bool(done)})
    n_new = int(out.lengths.sum())
    name = saved_spec if (saved_spec and spec.is_float) else spec.name
    if a.json:
        print(json.dumps({"scheme": name, "kv_cache": a.kv_cache, "seconds": tg, "results": rows}))
    else:
        for i, r in enumerate(rows):
            if i:
                print("\n" + "-" * 40)
            print(r["prompt"] + r["text"])
    print(
        f"[{name}, kv-cache {a.kv_cache}] {n_new} new tokens in {tg:.2f} s (compilation included); quantize {tq:.1f} s",
        file=sys.stderr,
    )
