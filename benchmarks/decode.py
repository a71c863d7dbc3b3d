"""Generation speed and memory per quantization scheme: prefill and decode tokens/s at several batch sizes.

For each scheme and batch size: weight storage, KV-cache size, the compiled program's memory (XLA's plan:
weights + cache + temporaries), prefill tokens/s and decode tokens/s of :func:`jaxquant.generate.generate_tokens`
(prefill + ``lax.while_loop`` decode, one compiled program, greedy, no early stop), with the bf16 baseline
measured in the same run. Every scheme runs the same code: QArray kernels through ``jaxquant.qdot`` (on a GPU
the fused Pallas kernels are picked automatically; the ``path`` column says which path layer 0's q_proj took).

Timing: one program per (scheme, batch) compiled ahead of time; ``t1`` = a run that stops after the first
token (prefill + first sample), ``tN`` = a run of ``1 + steps`` tokens; prefill tok/s = ``B * T / t1``,
decode tok/s = ``B * steps / (tN - t1)``; each time is the minimum of ``--repeats`` runs.

Usage (from the repository root)::

    python benchmarks/decode.py                                   # CPU: SmolLM2-135M, batches 1,8
    python benchmarks/decode.py --batches 1,8,32 --schemes fp32,bf16,int8
    python benchmarks/decode.py --kv-ppl                          # perplexity cost of the int8/fp8 KV cache
    python benchmarks/decode.py --device-suite --budget-s 200     # GPU: synthetic Llamas -> results/decode-<device>.md
    python benchmarks/decode.py --device-suite --dry-run          # CPU: the device suite on a tiny config

``--device-suite`` needs only jax, flax and numpy (plus this repository): the models are **synthetic Llamas
with random weights**, for speed only (memory-bound decoding does not depend on the weight values; their
output text is meaningless). It runs ``--plan`` groups ``size:batch`` in order, every scheme per group, and
skips whatever no longer fits ``--budget-s`` (a watchdog ends the process at ``budget + --grace-s`` with
the results so far written). Results are rewritten after every row to ``benchmarks/results/decode-<device>.md``
and ``.jsonl`` and copied into ``$OUT`` when that is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import shutil
import sys
import threading
import time
import traceback
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.provenance import git_commit  # noqa: E402
from jaxquant.eval.memory import device_memory_stats, tree_nbytes  # noqa: E402
from jaxquant.generate import _eos_array, _generate_jit, init_cache  # noqa: E402
from jaxquant.models.llama import Llama, LlamaConfig, model_params, with_params  # noqa: E402
from jaxquant.specs import parse_spec  # noqa: E402
from jaxquant.transform import quantize_params  # noqa: E402

#: schemes of the table; "fp32" and "bf16" are the float baselines (all parameters and activations in that
#: dtype), the others are SPECs (block linears quantized; embeddings, norms, head in the activation dtype)
CPU_SCHEMES = "fp32,bf16,int8,int4-g128,nf4,fp8-e4m3,llm-int8,ternary"
GPU_SCHEMES = "bf16,int4-g128,nf4,int8,fp8-e4m3,ternary,llm-int8"

#: synthetic Llama shapes (random weights; speed only)
SYNTHETIC: dict[str, tuple[str, LlamaConfig]] = {
    "tiny": (
        "tiny test config (dry runs)",
        LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=512),
    ),
    "1b": (
        "Llama-3.2-1B shapes (dim 2048, 16 layers, 32/8 heads, SwiGLU 8192), vocab 32000 untied: 1.10 B params",
        LlamaConfig(vocab_size=32000, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192),
    ),
    "8b-L8": (
        "Llama-3-8B layer shapes (dim 4096, 32/8 heads, SwiGLU 14336), 8 of its 32 layers, vocab 32000 untied: "
        "2.01 B params (per-layer decode cost as in the 8B model; full 8B tok/s is about a quarter)",
        LlamaConfig(vocab_size=32000, dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, hidden_dim=14336),
    ),
    "8b": (
        "Llama-3-8B shapes (dim 4096, 32 layers, 32/8 heads, SwiGLU 14336, vocab 128256 untied): 8.03 B params",
        LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336),
    ),
}

DEFAULT_PLAN = "8b-L8:1,8b-L8:32,1b:1,1b:32,8b-L8:8,1b:8"
MIB = 2**20


# -------------------------------------------------------------------------------------------------
# building the models
# -------------------------------------------------------------------------------------------------
def _spec_rules(name: str) -> tuple:
    spec = parse_spec(name)
    if spec.build is not None or getattr(spec, "build_model", None) is not None:
        raise ValueError(f"SPEC {name!r} is calibrated; the decode benchmark runs static SPECs only")
    if not spec.rules:
        raise ValueError(f"SPEC {name!r} quantizes nothing; use the fp32/bf16 baselines")
    return tuple(spec.rules)


def _act_dtype(scheme: str, default: str) -> str:
    return {"fp32": "float32", "bf16": "bfloat16"}.get(scheme, default)


def from_params(config: LlamaConfig, params: dict, scheme: str, act_dtype: str) -> Llama:
    """A model for ``scheme`` from float params (cast to the activation dtype; SPEC rules applied)."""
    dt = jnp.dtype(_act_dtype(scheme, act_dtype))
    cast = jax.tree.map(lambda a: jnp.asarray(a).astype(dt), params)
    if scheme not in ("fp32", "bf16"):
        cast = quantize_params(cast, list(_spec_rules(scheme)), strict=True)
    return with_params(config.replace(dtype=dt.name), cast)


def synthetic_model(config: LlamaConfig, scheme: str, act_dtype: str, seed: int = 0) -> Llama:
    """Random weights (normal, std 0.02; norm scales 1) generated and quantized one tensor at a time."""
    from jaxquant.models.llama import param_shapes, unflatten_params

    dt = jnp.dtype(_act_dtype(scheme, act_dtype))
    rules = None if scheme in ("fp32", "bf16") else list(_spec_rules(scheme))
    key = jax.random.key(seed)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def normal(k, shape, dtype):
        return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    flat: dict[str, Any] = {}
    for i, (path, shape) in enumerate(param_shapes(config).items()):
        if path.endswith("/scale"):
            flat[path] = jnp.ones(shape, dt)
            continue
        w = normal(jax.random.fold_in(key, i), tuple(shape), dt)
        if rules is not None and path.startswith("layers/"):
            w = quantize_params({path: w}, rules)[path]
        flat[path] = w
    return with_params(config.replace(dtype=dt.name), unflatten_params(flat))


# -------------------------------------------------------------------------------------------------
# one measurement
# -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    model: str
    scheme: str
    batch: int
    act_dtype: str = ""
    kv_cache: str = "none"
    weight_mib: float = math.nan
    kv_mib: float = math.nan
    xla_peak_mib: float = math.nan
    device_peak_mib: float = math.nan
    prefill_tps: float = math.nan
    decode_tps: float = math.nan
    ms_per_step: float = math.nan
    compile_s: float = math.nan
    seconds: float = math.nan
    path: str = ""
    status: str = "ok"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _call(compiled, fallback, args: tuple, static: dict) -> Any:
    """Run the AOT-compiled program (``compiled(*args[1:])``: the static graphdef is baked in)."""
    try:
        return compiled(*args[1:])
    except TypeError:  # an API difference between JAX versions: the jitted function (same cache) works too
        return fallback(*args, **static)


def _kernel_path(model: Llama, batch: int) -> str:
    from jaxquant.core.qarray import QArray
    from jaxquant.ops import explain_qdot

    w = model_params(model)["layers"][0]["attn"]["q_proj"]["kernel"]
    if not isinstance(w, QArray):
        return "float (XLA dot)"
    x = jax.ShapeDtypeStruct((batch, w.shape[0]), jnp.dtype(model.config.dtype))
    try:
        return explain_qdot(x, w)
    except Exception as e:  # informational only
        return f"? ({type(e).__name__})"


def measure(
    model: Llama,
    name: str,
    scheme: str,
    batch: int,
    prompt_len: int,
    steps: int,
    repeats: int,
    kv_cache: str | None,
    seed: int = 0,
    dequant_in_loop: bool = False,
) -> Row:
    """Compile and time one (model, batch) configuration."""
    t_start = time.perf_counter()
    c = model.config
    row = Row(model=name, scheme=scheme, batch=batch, act_dtype=c.dtype, kv_cache=kv_cache or "none")
    graphdef, state = nnx.split(model)
    row.weight_mib = tree_nbytes(state) / MIB
    row.kv_mib = init_cache_nbytes(c, batch, prompt_len + steps + 1, kv_cache) / MIB
    row.path = _kernel_path(model, batch)
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, c.vocab_size, (batch, prompt_len)), jnp.int32)
    pad = jnp.zeros((batch,), jnp.int32)
    static = dict(max_new_tokens=steps + 1, greedy=True, kv_quant=kv_cache, dequant_in_loop=dequant_in_loop)

    def args(n: int) -> tuple:
        return (
            graphdef,
            state,
            tokens,
            pad,
            jax.random.key(0),
            jnp.float32(0.0),
            jnp.float32(1.0),
            jnp.int32(0),
            _eos_array([]),
            jnp.int32(0),
            jnp.int32(n),
        )

    t0 = time.perf_counter()
    compiled = _generate_jit.lower(*args(1), **static).compile()
    row.compile_s = time.perf_counter() - t0
    try:
        ma = compiled.memory_analysis()
        row.xla_peak_mib = (
            ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes
        ) / MIB
    except Exception:
        pass

    def timed(n: int) -> float:
        a = args(n)
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            out = _call(compiled, _generate_jit, a, static)
            jax.block_until_ready(out)
            best = min(best, time.perf_counter() - t)
        n_done = int(np.asarray(out[1])[0])
        if n_done != n:
            raise RuntimeError(f"expected {n} tokens per row, got {n_done}")
        return best

    jax.block_until_ready(_call(compiled, _generate_jit, args(1), static))  # warm-up
    t1 = timed(1)
    tn = timed(steps + 1)
    row.prefill_tps = batch * prompt_len / t1
    dt = tn - t1
    row.decode_tps = batch * steps / dt if dt > 0 else math.nan
    row.ms_per_step = 1000 * dt / steps
    stats = device_memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        row.device_peak_mib = stats["peak_bytes_in_use"] / MIB
    row.seconds = time.perf_counter() - t_start
    return row


def init_cache_nbytes(config: LlamaConfig, batch: int, length: int, kv_cache: str | None) -> int:
    """Bytes of the KV cache (computed without allocating it)."""
    shapes = jax.eval_shape(lambda: init_cache(config, batch, length, kv_cache))
    return int(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(shapes)))


# -------------------------------------------------------------------------------------------------
# report
# -------------------------------------------------------------------------------------------------
def _fmt(x: float, nd: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{nd}f}"


def table(rows: list[Row]) -> str:
    """Markdown table; ``× bf16`` compares decode tok/s with the bf16 row of the same model and batch."""
    base = {(r.model, r.batch): r.decode_tps for r in rows if r.scheme == "bf16" and r.status == "ok"}
    head = (
        "| model | scheme | batch | act | KV | weight MiB | KV MiB | XLA peak MiB | prefill tok/s | decode tok/s "
        "| ms/step | × bf16 decode | compile s | path |\n"
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = [head]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.model} | {r.scheme} | {r.batch} | | | | | | | | | | | {r.status} |")
            continue
        b = base.get((r.model, r.batch))
        ratio = f"{r.decode_tps / b:.2f}×" if b and not math.isnan(r.decode_tps) else "–"
        act = {"float32": "fp32", "bfloat16": "bf16"}.get(r.act_dtype, r.act_dtype)
        lines.append(
            f"| {r.model} | {r.scheme} | {r.batch} | {act} | {r.kv_cache} | {_fmt(r.weight_mib)} | "
            f"{_fmt(r.kv_mib, 2)} | {_fmt(r.xla_peak_mib)} | {_fmt(r.prefill_tps)} | {_fmt(r.decode_tps)} | "
            f"{_fmt(r.ms_per_step, 2)} | {ratio} | {_fmt(r.compile_s)} | {r.path} |"
        )
    return "\n".join(lines)


class Report:
    """Collects rows and rewrites the markdown + jsonl files (and their copies in ``$OUT``) after each row."""

    def __init__(self, path: str | None, header: str, footer_lines: list[str] | None = None):
        self.path = path
        self.header = header
        self.rows: list[Row] = []
        self.notes: list[str] = list(footer_lines or [])
        self.lock = threading.Lock()

    def add(self, row: Row) -> None:
        with self.lock:
            self.rows.append(row)
        self.write()

    def note(self, text: str) -> None:
        with self.lock:
            self.notes.append(text)
        self.write()

    def text(self) -> str:
        body = table(self.rows)
        notes = "\n".join(f"- {n}" for n in self.notes)
        return f"{self.header}\n\n{body}\n\n{notes}\n"

    def write(self) -> None:
        if self.path is None:
            return
        with self.lock:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            md = self.text()
            jl = "".join(json.dumps(r.as_dict()) + "\n" for r in self.rows)
            stem = os.path.splitext(self.path)[0]
            for p, data in ((self.path, md), (stem + ".jsonl", jl)):
                tmp = p + ".tmp"
                with open(tmp, "w") as f:
                    f.write(data)
                os.replace(tmp, p)
                out = os.environ.get("OUT")
                if out and os.path.isdir(out):
                    shutil.copy(p, os.path.join(out, os.path.basename(p)))


def _device() -> tuple[str, str]:
    """``(file key, description)`` of the default device."""
    d = jax.devices()[0]
    if jax.default_backend() == "gpu":
        try:
            from pallas_kernels.tuning import device_key

            key = device_key(d.device_kind)
        except Exception:
            key = "".join(ch for ch in d.device_kind.lower() if ch.isalnum()) or "gpu"
        return key, f"{d.device_kind} ({jax.default_backend()})"
    import platform

    return jax.default_backend(), f"{platform.machine()} {os.cpu_count()} cpus ({jax.default_backend()})"


def _header(title: str, args, model_lines: list[str], commit: str) -> str:
    from jaxquant.ops import get_kernel_mode

    _, desc = _device()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# {title}",
        "",
        f"- date: {now}; commit: {commit}; jax {jax.__version__}; device: {desc}; kernel mode: {get_kernel_mode()}",
        f"- prompt {args.prompt_len} tokens, {args.steps} decode steps, greedy, no early stop; times: best of "
        f"{args.repeats}; KV cache: {args.kv_cache}; XLA-path dequantization: "
        + ("at every step (--dequant-in-loop)" if args.dequant_in_loop else "hoisted out of the decode loop by XLA"),
        *[f"- {m}" for m in model_lines],
        "- prefill tok/s = batch × prompt / t(first token); decode tok/s = batch × steps / (t(1 + steps tokens) − "
        "t(first token)); ms/step = one decode step of the whole batch",
        "- weight MiB: storage of all parameters (QArrays: packed codes + scales); KV MiB: the cache of "
        "prompt + steps + 1 slots; XLA peak MiB: the compiled program's arguments + outputs + temporaries "
        "(what the call needs resident)",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# modes
# -------------------------------------------------------------------------------------------------
def _run_rows(report: Report, jobs, deadline: float | None) -> None:
    """Run ``jobs`` (``(label, group, fn)``) in order, skipping those that would pass the budget.

    A job's time is estimated as the longest job of its group so far (else the longest job of any group).
    """
    durations: dict[str, float] = {}
    for label, group, fn in jobs:
        now = time.perf_counter()
        est = durations.get(group, max(durations.values(), default=0.0))
        if deadline is not None and now + est > deadline:
            r = fn(dry=True)
            r.status = f"skipped: budget (needs ~{est:.0f} s, {max(deadline - now, 0):.0f} s left)"
            report.add(r)
            print(f"skip {label}: budget", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            r = fn(dry=False)
        except Exception as e:
            r = fn(dry=True)
            msg = " ".join(str(e).split())[:300]
            r.status = f"error: {type(e).__name__}: {msg}"
            traceback.print_exc()
        durations[group] = max(durations.get(group, 0.0), time.perf_counter() - t0)
        report.add(r)
        print(table([r]).splitlines()[-1], flush=True)


def run_cpu(args) -> None:
    from jaxquant.eval import assets
    from jaxquant.models import load_model

    t0 = time.perf_counter()
    base, _ = load_model(assets.model_path(args.model))
    name = "SmolLM2-135M" if args.model == "smollm2-135m" else os.path.basename(str(args.model))
    params = model_params(base)
    c = base.config
    n_params = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params))
    schemes = [s for s in args.schemes.split(",") if s]
    batches = [int(b) for b in args.batches.split(",") if b]
    for s in schemes:
        if s not in ("fp32", "bf16"):
            _spec_rules(s)  # fail fast
    model_line = (
        f"model: {name} (real weights, {n_params / 1e6:.0f} M params: dim {c.dim}, {c.n_layers} layers, "
        f"{c.n_heads}/{c.n_kv_heads} heads, vocab {c.vocab_size}, tied head); quantized schemes use "
        f"{args.act_dtype} activations and keep embeddings/norms in {args.act_dtype}"
    )
    notes = [
        "CPU timings: XLA on a shared machine (other jobs were running): noisy, compare within one run only",
    ]
    report = Report(args.out, _header("Decode benchmark (CPU)", args, [model_line], args.commit or git_commit()), notes)
    print(report.header, flush=True)
    print(f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    for s in schemes:
        t = time.perf_counter()
        qm = from_params(c, params, s, args.act_dtype)
        tq = time.perf_counter() - t
        for b in batches:

            def fn(dry: bool, qm=qm, s=s, b=b) -> Row:
                if dry:
                    return Row(model=name, scheme=s, batch=b)
                return measure(
                    qm,
                    name,
                    s,
                    b,
                    args.prompt_len,
                    args.steps,
                    args.repeats,
                    _kv(args),
                    dequant_in_loop=args.dequant_in_loop,
                )

            _run_rows(report, [(f"{s} b{b}", "cpu", fn)], None)
        print(f"  ({s}: quantized in {tq:.1f} s)", flush=True)
        del qm
    print(f"\nwrote {args.out}" if args.out else "", flush=True)


def _process_age() -> float:
    """Seconds since this process started (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def _kv(args) -> str | None:
    return None if args.kv_cache == "none" else args.kv_cache


def run_device_suite(args) -> None:
    start = time.perf_counter() - _process_age()  # the budget counts from the process start (imports too)
    deadline = start + args.budget_s
    key, _ = _device()
    if args.dry_run:
        plan = [("tiny", b) for b in (1, 4)]
        key = f"{key}-dry-run"
    else:
        plan = []
        for item in args.plan.split(","):
            size, _, b = item.partition(":")
            if size not in SYNTHETIC or not b.isdigit():
                raise SystemExit(f"bad --plan item {item!r}: SIZE:BATCH with SIZE in {sorted(SYNTHETIC)}")
            plan.append((size, int(b)))
    schemes = [s for s in args.schemes.split(",") if s]
    for s in schemes:
        if s not in ("fp32", "bf16"):
            _spec_rules(s)  # fail fast
    if args.out:
        out = args.out
    elif args.dry_run:  # do not overwrite real results with a dry run
        import tempfile

        out = os.path.join(tempfile.mkdtemp(prefix="decode-dry-run-"), f"decode-{key}.md")
    else:
        out = os.path.join(ROOT, "benchmarks", "results", f"decode-{key}.md")
    sizes = list(dict.fromkeys(size for size, _ in plan))
    model_lines = [
        "models: **synthetic Llamas with random weights (normal, std 0.02), for speed and memory only**; "
        "quantized schemes: block linears quantized, embeddings/head/norms in bf16"
    ] + [f"{s}: {SYNTHETIC[s][0]}" for s in sizes]
    report = Report(out, _header(f"Decode benchmark ({key})", args, model_lines, args.commit or git_commit()))
    plan_text = ",".join(f"{size}:{b}" for size, b in plan)
    report.note(
        f"budget {args.budget_s:.0f} s from process start (watchdog at +{args.grace_s:.0f} s); plan {plan_text}"
    )
    print(report.header, flush=True)

    def watchdog() -> None:
        time.sleep(max(deadline + args.grace_s - time.perf_counter(), 0))
        report.note(f"stopped by the watchdog at {time.perf_counter() - start:.0f} s (a compile or run overran)")
        print("watchdog: budget exhausted, exiting", flush=True)
        os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()

    built: dict[tuple[str, str], Llama] = {}

    def get_model(size: str, scheme: str) -> Llama:
        if (size, scheme) not in built:
            if any(k[0] != size for k in built) or SYNTHETIC[size][1].num_params() > 3e9:
                built.clear()  # keep one size resident; big models one scheme at a time
            built[(size, scheme)] = synthetic_model(SYNTHETIC[size][1], scheme, args.act_dtype)
        return built[(size, scheme)]

    jobs = []
    for size, b in plan:
        for s in schemes:

            def fn(dry: bool, size=size, s=s, b=b) -> Row:
                if dry:
                    return Row(model=size, scheme=s, batch=b)
                m = get_model(size, s)
                return measure(
                    m,
                    size,
                    s,
                    b,
                    args.prompt_len,
                    args.steps,
                    args.repeats,
                    _kv(args),
                    dequant_in_loop=args.dequant_in_loop,
                )

            jobs.append((f"{size} {s} b{b}", f"{size}:{b}", fn))
    _run_rows(report, jobs, deadline)
    stats = device_memory_stats()
    if stats:
        report.note(
            f"device memory: peak_bytes_in_use {stats.get('peak_bytes_in_use', 0) / MIB:,.0f} MiB over the whole "
            f"process (all schemes), bytes_limit {stats.get('bytes_limit', 0) / MIB:,.0f} MiB"
        )
    report.note(f"total wall time {time.perf_counter() - start:.0f} s")
    print(f"\nwrote {out}", flush=True)


def run_kv_ppl(args) -> None:
    """Perplexity of SmolLM2 with a float, int8 and fp8 KV cache (the generation path's attention)."""
    from jaxquant.eval.harness import load
    from jaxquant.eval.perplexity import perplexity
    from jaxquant.generate import _cached_forward_jit

    loaded = load(args.model)
    schemes = [s for s in args.schemes.split(",") if s]
    params = model_params(loaded.model)
    print(f"| weights | KV cache | ppl ({args.max_windows} windows x 512) | Δ vs float cache |", flush=True)
    print("|---|---|---:|---:|", flush=True)
    for s in schemes:
        qm = from_params(loaded.model.config, params, s, args.act_dtype)
        graphdef, state = nnx.split(qm)
        base = None
        for kv in (None, "int8", "fp8"):

            def fn(state, tokens, kv=kv, graphdef=graphdef):
                return _cached_forward_jit(
                    graphdef, state, tokens, jnp.zeros((tokens.shape[0],), jnp.int32), kv_quant=kv
                )

            r = perplexity(
                fn, tokens=loaded.eval_tokens, params=state, seq_len=512, max_windows=args.max_windows, progress=False
            )
            base = r.ppl if base is None else base
            delta = "–" if kv is None else f"{100 * (r.ppl / base - 1):+.2f}%"
            print(f"| {s} | {kv or 'float'} | {r.ppl:.3f} | {delta} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device-suite", action="store_true", help="synthetic Llamas on the default device (GPU)")
    p.add_argument("--dry-run", action="store_true", help="with --device-suite: tiny config, CPU, a few seconds")
    p.add_argument("--kv-ppl", action="store_true", help="perplexity of float/int8/fp8 KV caches (SmolLM2)")
    p.add_argument("--model", default="smollm2-135m", help="CPU mode: smollm2-135m or a .gguf / HF folder")
    p.add_argument("--schemes", default=None, help=f"comma-separated (CPU: {CPU_SCHEMES}; GPU: {GPU_SCHEMES})")
    p.add_argument("--batches", default="1,8", help="CPU mode batch sizes (1,8)")
    p.add_argument("--plan", default=DEFAULT_PLAN, help=f"device suite SIZE:BATCH groups in order ({DEFAULT_PLAN})")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (CPU 64, GPU 128)")
    p.add_argument("--steps", type=int, default=None, help="decode steps timed (CPU 32, GPU 32)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement, best kept (CPU 2, GPU 3)")
    p.add_argument("--kv-cache", choices=("none", "int8", "fp8"), default="none", help="KV-cache quantization")
    p.add_argument(
        "--dequant-in-loop",
        action="store_true",
        help="XLA path: dequantize the weights at every decode step (default: XLA hoists it out of the loop)",
    )
    p.add_argument("--act-dtype", default=None, help="activations of quantized schemes (CPU float32, GPU bfloat16)")
    p.add_argument("--budget-s", type=float, default=200.0, help="device suite: wall-clock budget in seconds")
    p.add_argument("--grace-s", type=float, default=30.0, help="device suite: watchdog exit at budget + grace")
    p.add_argument("--max-windows", type=int, default=16, help="--kv-ppl: windows of 512 tokens")
    p.add_argument("--commit", default=None, help="commit to print (default: git rev-parse, if git works)")
    p.add_argument("--out", default=None, help="markdown file to write (jsonl next to it)")
    args = p.parse_args(argv)
    gpu = args.device_suite and not args.dry_run
    if args.act_dtype is None:
        args.act_dtype = "bfloat16" if gpu or args.device_suite else "float32"
    if args.schemes is None:
        args.schemes = GPU_SCHEMES if args.device_suite else CPU_SCHEMES
    if args.prompt_len is None:
        args.prompt_len = 128 if gpu else (16 if args.dry_run else 64)
    if args.steps is None:
        args.steps = 8 if args.dry_run else 32
    if args.repeats is None:
        args.repeats = 3 if gpu else (1 if args.dry_run else 2)
    if args.kv_ppl:
        if args.schemes == CPU_SCHEMES:
            args.schemes = "fp32,int8"
        run_kv_ppl(args)
    elif args.device_suite:
        if gpu and jax.default_backend() != "gpu":
            print(f"warning: --device-suite on backend {jax.default_backend()!r} (no GPU)", file=sys.stderr)
        run_device_suite(args)
    else:
        if args.out is None:
            key, _ = _device()
            args.out = os.path.join(ROOT, "benchmarks", "results", f"decode-{key}.md")
        run_cpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
