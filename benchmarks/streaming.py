"""Streaming quantization: wall time and peak RSS versus checkpoint size (synthetic Llama checkpoints).

    python benchmarks/streaming.py [--layers 8,32,128] [--gptq-layers 8,32] [--dim 1024] [--hidden 2816]
        [--vocab 32000] [--dir /tmp] [--calib-samples 16] [--calib-seq-len 256] [--out benchmarks/results/streaming]

For each layer count a random bfloat16 Llama checkpoint (``dim``/``hidden``, ``--head-dim`` 64, ``--kv-heads``
4, sharded safetensors of <= 1 GiB) is generated block by block into ``--dir`` (never whole in memory),
quantized with ``jaxquant.io.streaming.stream_quantize`` in a *fresh child process* per scheme (so each peak RSS is that
run's alone: ``VmHWM`` of the child), then deleted. Schemes: RTN ``int4-g128`` at every size, GPTQ
``gptq-int4-g128`` (the SPEC's recipe: act-order, static groups, true-sequential, first token x20; the runs in
``benchmarks/results/streaming*.md`` had the clip search on, the SPEC default then; random calibration tokens,
``--calib-samples`` x ``--calib-seq-len``) at the ``--gptq-layers`` sizes.

Prints a markdown table and writes ``OUT.md`` and ``OUT.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(src: str, out: str, scheme: str, samples: int, seq_len: int) -> None:
    import numpy as np

    from jaxquant.io.streaming import peak_rss_bytes, stream_quantize

    base = peak_rss_bytes()  # the interpreter + jax + jaxquant imported, nothing quantized yet
    calib, options = None, {}
    if scheme.startswith("gptq"):
        from jaxquant.io.streaming import HFSource

        vocab = HFSource(src).config.vocab_size
        calib = np.random.default_rng(0).integers(0, vocab, samples * seq_len * 4)
        options = {"calib_samples": samples, "calib_seq_len": seq_len}
    r = stream_quantize(src, out, scheme, calib_tokens=calib, options=options, progress=True)
    ls = sorted(r.layer_seconds)
    import jax

    from jaxquant.eval.memory import device_memory_stats

    dev = device_memory_stats() or {}
    print(
        json.dumps(
            {
                "scheme": scheme,
                "seconds": r.seconds,
                "peak_rss_bytes": r.peak_rss_bytes,
                "rss_after_imports_bytes": base,
                "source_bytes": r.source_bytes,
                "output_bytes": r.output_bytes,
                "n_layers": r.n_layers,
                "median_block_seconds": statistics.median(ls),
                "first_block_seconds": r.layer_seconds[0],
                "block_seconds": list(r.layer_seconds),
                "device": str(jax.devices()[0].device_kind),
                "device_peak_bytes": dev.get("peak_bytes_in_use"),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="8,32,128")
    ap.add_argument("--gptq-layers", default="8,32")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/streaming")
    ap.add_argument("--verbose", action="store_true", help="show the children's progress bars")
    ap.add_argument("--child", nargs=5, metavar=("SRC", "OUT", "SCHEME", "SAMPLES", "SEQ"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        src, out, scheme, samples, seq = a.child
        _child(src, out, scheme, int(samples), int(seq))
        return

    from jaxquant.io.streaming import synthetic_checkpoint
    from jaxquant.models import LlamaConfig

    layers = sorted({int(x) for x in a.layers.split(",") if x} | {int(x) for x in a.gptq_layers.split(",") if x})
    gptq_at = {int(x) for x in a.gptq_layers.split(",") if x}
    rtn_at = {int(x) for x in a.layers.split(",") if x}
    rows = []
    machine = f"{platform.machine()}, {os.cpu_count()} cpus, {platform.python_version()}"
    print(f"machine: {machine}", flush=True)
    for n in layers:
        work = Path(tempfile.mkdtemp(prefix="jq-stream-", dir=a.dir))
        try:
            cfg = LlamaConfig(
                vocab_size=a.vocab,
                dim=a.dim,
                n_layers=n,
                n_heads=a.dim // 64,
                n_kv_heads=a.kv_heads,
                hidden_dim=a.hidden,
            )
            t0 = time.perf_counter()
            nbytes = synthetic_checkpoint(work / "src", cfg, dtype="bfloat16")
            gen = time.perf_counter() - t0
            print(f"{n} layers: {nbytes / 2**30:.2f} GiB bf16 checkpoint generated in {gen:.1f} s", flush=True)
            schemes = (["int4-g128"] if n in rtn_at else []) + (["gptq-int4-g128"] if n in gptq_at else [])
            for scheme in schemes:
                out = work / f"out-{scheme}"
                cmd = [sys.executable, __file__, "--child", str(work / "src"), str(out), scheme]
                cmd += [str(a.calib_samples), str(a.calib_seq_len)]
                p = subprocess.run(
                    cmd, stdout=subprocess.PIPE, stderr=None if a.verbose else subprocess.PIPE, text=True
                )
                if p.returncode != 0:
                    raise SystemExit(f"{scheme} at {n} layers failed:\n{(p.stderr or '')[-3000:]}")
                r = json.loads(p.stdout.strip().splitlines()[-1])
                r.update(layers=n, dim=a.dim, hidden=a.hidden, vocab=a.vocab, machine=machine)
                if scheme.startswith("gptq"):
                    r["calib"] = f"{a.calib_samples}x{a.calib_seq_len}"
                rows.append(r)
                print(
                    f"  {scheme}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB "
                    f"(after imports {r['rss_after_imports_bytes'] / 2**30:.2f}), "
                    f"median block {r['median_block_seconds']:.2f} s",
                    flush=True,
                )
                shutil.rmtree(out, ignore_errors=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    head = (
        "| scheme | layers | checkpoint (bf16) | output | wall time | median s/block | peak RSS | "
        "RSS after imports | checkpoint / peak RSS |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        gib = 2**30
        lines.append(
            f"| {r['scheme']} | {r['layers']} | {r['source_bytes'] / gib:.2f} GiB | {r['output_bytes'] / gib:.2f} GiB "
            f"| {r['seconds']:.1f} s | {r['median_block_seconds']:.2f} | {r['peak_rss_bytes'] / gib:.2f} GiB | "
            f"{r['rss_after_imports_bytes'] / gib:.2f} GiB | {r['source_bytes'] / r['peak_rss_bytes']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join(sys.argv)
    out.with_suffix(".md").write_text(f"`{cmd}` on {machine}\n\n{table}\n")
    with open(out.with_suffix(".jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
