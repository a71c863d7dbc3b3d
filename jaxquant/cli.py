"""The ``jaxquant`` command: ``eval``, ``schemes``, ``demo``.

Every user error (unknown SPEC, missing/corrupt model, text too short, unreachable registry) ends with one
line ``jaxquant: error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxquant.files import atomic_write

__all__ = ["DEMO_SPECS", "main", "positive_arg"]

#: the schemes ``jaxquant demo`` evaluates, in table order
DEMO_SPECS = (
    "fp32",
    "bf16",
    "int8",
    "fp8-e4m3",
    "llm-int8",
    "w8a8-tensor",
    "int4-g32-minmax",
    "int4-g64-asym",
    "int4-g128-asym",
    "int4-g128",
    "nf4",
    "nf4-dq",
    "int3-g128-asym",
    "int3-g128",
    "ternary",
)


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def positive_arg(name: str, kind: type = int):
    """argparse ``type=`` converter accepting only positive finite numbers of ``kind`` (int or float)."""

    def conv(v: str):
        try:
            x = kind(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive {kind.__name__}, got {v!r}") from None
        if not (x > 0 and math.isfinite(x)):
            raise argparse.ArgumentTypeError(f"{name} must be a positive {kind.__name__}, got {v!r}")
        return x

    return conv


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxquant", description="Quantize LLMs in JAX and measure what it costs.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default) or a .gguf file / HF folder")
        sp.add_argument("--text-file", default=None, help="evaluate on this plain-text file (its second half)")
        sp.add_argument("--seq-len", type=positive_arg("--seq-len"), default=512, help="window length in tokens")
        sp.add_argument("--batch-size", type=positive_arg("--batch-size"), default=4, help="windows per forward call")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="perplexity, bits/weight and size of one quantization SPEC")
    e.add_argument("--scheme", required=True, help="a SPEC, e.g. int4-g128 (see `jaxquant schemes`)")
    e.add_argument("--max-windows", type=positive_arg("--max-windows"), default=None, help="only the first N windows")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e.add_argument("--mesh", default=None, help="run sharded on a device mesh, e.g. model=8 or data=2,model=4")
    common(e)

    sub.add_parser("schemes", help="list the scheme SPECs")

    d = sub.add_parser("demo", help="evaluate the float model and every demo scheme; table + plot")
    d.add_argument("--max-windows", type=positive_arg("--max-windows"), default=16, help="windows per scheme (16)")
    d.add_argument("--out", default="jaxquant-demo", help="folder for results.json and quantization_map.png")
    d.add_argument("--schemes", default=",".join(DEMO_SPECS), help="comma-separated SPECs to evaluate")
    common(d)
    for mod in _plugins():
        mod.register(sub)
    return p


#: modules adding subcommands: each has ``register(subparsers)``, whose parsers ``set_defaults(_run=fn)`` with
#: ``fn(args) -> None`` raising ValueError (or CliError) for user errors
_PLUGINS: tuple[str, ...] = ("jaxquant.cli_formats", "jaxquant.cli_generate", "jaxquant.cli_layers", "jaxquant.cli_ptq")


def _plugins() -> list:
    import importlib

    return [importlib.import_module(m) for m in _PLUGINS]


def _cmd_schemes() -> None:
    from jaxquant.specs import list_specs, parse_spec

    print("SPEC                 what it quantizes (default target: all linear layers of the blocks)")
    for name in list_specs():
        print(f"{name:<20} {parse_spec(name).description}")
    print("\nany int{bits}[-g{group}][-asym|-minmax][-tensor] with bits 2..8 is accepted too")


def _row(r, base_ppl: float | None) -> str:
    delta = "" if base_ppl is None else f"{100 * (r.ppl / base_ppl - 1):+.1f}%"
    return (
        f"{r.scheme:<18} {r.bits_per_weight:>6.3f} {r.weight_bytes / 2**20:>10.1f} {r.ppl:>10.3f} {delta:>9} "
        f"{r.seconds + r.quantize_seconds:>8.1f}"
    )


_HEAD = f"{'scheme':<18} {'bpw':>6} {'weight MiB':>10} {'ppl':>10} {'Δ vs fp32':>9} {'seconds':>8}"


def _cmd_eval(a) -> None:
    from jaxquant.eval.harness import evaluate, load
    from jaxquant.specs import parse_spec

    spec = parse_spec(a.scheme)  # fail fast, before loading anything
    mesh = None
    if a.mesh is not None:
        from jaxquant.cli_ptq import _mesh

        mesh = _mesh(a.mesh)
    loaded = load(a.model, a.text_file)
    r = evaluate(
        loaded,
        spec,
        seq_len=a.seq_len,
        max_windows=a.max_windows,
        batch_size=a.batch_size,
        progress=not a.no_progress,
        mesh=mesh,
    )
    if a.json:
        d = r.as_dict()
        print(
            json.dumps(
                {k: d[k] for k in ("scheme", "model", "ppl", "bits_per_weight", "weight_bytes", "tokens", "seconds")}
            )
        )
        return
    print(_HEAD)
    print(_row(r, None))
    print(
        f"model {r.model}: {r.tokens} tokens, quantize {r.quantize_seconds:.1f} s, "
        f"peak host memory {r.peak_rss_bytes / 2**30:.2f} GiB"
    )


def _plot(results, base_ppl: float, path: Path, ymax: float = 1000.0) -> None:
    """Perplexity vs bits/weight, log-log; points above ``ymax`` are drawn at the top edge as off-scale."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    markers = "osD^vP*Xh<>p"
    for i, r in enumerate(results):
        off = r.ppl > ymax
        y = ymax if off else r.ppl
        label = f"{r.scheme}: {r.ppl:.4g}" + (" (off scale)" if off else "")
        ax.scatter(
            r.bits_per_weight, y, s=60 if off else 40, marker="^" if off else markers[i % len(markers)], label=label
        )
    ax.axhline(base_ppl, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylim(base_ppl * 0.9, ymax * 1.3)
    ax.set_xlabel("bits per weight of the quantized tensors (scales, zeros included)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"Quantization map: perplexity vs size (dashed: fp32 = {base_ppl:.2f})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def _cmd_demo(a) -> None:
    import platform

    import jax

    from jaxquant.eval.harness import evaluate, load
    from jaxquant.specs import parse_spec

    names = [s.strip() for s in a.schemes.split(",") if s.strip()]
    if not names:
        raise CliError("--schemes is empty")
    specs = [parse_spec(n) for n in names]
    loaded = load(a.model, a.text_file)
    print(
        f"model {loaded.name} loaded in {loaded.load_seconds:.1f} s; eval stream {len(loaded.eval_tokens)} tokens; "
        f"{a.max_windows} windows x {a.seq_len} tokens per scheme",
        flush=True,
    )
    results = []
    base = None
    if specs[0].name != "fp32":
        base = evaluate(loaded, "fp32", seq_len=a.seq_len, max_windows=a.max_windows, batch_size=a.batch_size,
                        progress=not a.no_progress).ppl  # fmt: skip
    print(_HEAD, flush=True)
    for spec in specs:
        r = evaluate(
            loaded,
            spec,
            seq_len=a.seq_len,
            max_windows=a.max_windows,
            batch_size=a.batch_size,
            progress=not a.no_progress,
        )
        if spec.name == "fp32" and base is None:
            base = r.ppl
        results.append(r)
        print(_row(r, base), flush=True)
    out = Path(a.out)
    meta = {
        "model": loaded.name,
        "seq_len": a.seq_len,
        "max_windows": a.max_windows,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {jax.devices()[0].platform}, jax {jax.__version__}",
        "results": [r.as_dict() for r in results],
    }
    atomic_write(out / "results.json", json.dumps(meta, indent=2).encode())
    _plot(results, base, out / "quantization_map.png")
    print(f"wrote {out / 'results.json'} and {out / 'quantization_map.png'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxquant`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    from jaxquant.eval.assets import AssetError

    try:
        if args.cmd == "schemes":
            _cmd_schemes()
        elif args.cmd == "eval":
            _cmd_eval(args)
        elif args.cmd == "demo":
            _cmd_demo(args)
        else:
            args._run(args)
    except AssetError as e:  # several lines on purpose: what to download and where to put it
        print(f"jaxquant: error: {e}", file=sys.stderr)
        return 2
    except (CliError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"jaxquant: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxquant: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
