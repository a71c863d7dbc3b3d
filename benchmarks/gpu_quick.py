"""Quick GPU re-check (about 1-2 minutes): the small-M GEMV kernels and the dispatch limits.

1. correctness on the device of the new code paths (forced configs, independent of the tuning table): int4 /
   int8 / 2-bit-ternary / fp8 GEMV, NF4 ``select-gemv`` and ``select``; each against jaxquant's XLA path and a
   float64 product, run twice (determinism);
2. timing at ``K = N = 8192``, ``M`` in {1, 16}: ``qdot`` as dispatched ("auto" mode: the tuning table or
   heuristic), the GEMV config forced (int4 also at M=16 as two 8-row blocks), bf16 ``jnp.dot`` and the XLA
   dequant path, all in the same process; weights rotate over enough copies to defeat the L2 cache;
3. dispatch at ``M = 4096``: ``qdot`` must take the XLA path there on measured devices.

Writes ``benchmarks/results/<device>-quick.md`` after every row (a crash keeps what was measured) and copies it
to ``$OUT`` when set. Usage, from the repository root::

    python benchmarks/gpu_quick.py              # on the GPU (~1-2 min)
    python benchmarks/gpu_quick.py --dry-run    # CPU: tiny shapes through the Pallas interpreter (timings meaningless)
    python benchmarks/gpu_suite.py --quick      # the same
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxquant as jq  # noqa: E402
from jaxquant import ops  # noqa: E402
from pallas_kernels import tuning  # noqa: E402

L2_BYTES = 60 * 2**20
_GET_CONFIG = (
    tuning.get_config
)  # unpatched (forced_config replaces tuning.get_config while tracing)  # H100 50 MB, H200 60 MB (upper bound)

# name -> (scheme factory, tuning kernel name, qdot entry point ("qdot", "fp8_w8a8", "ternary_a8"))
SPECS: dict[str, tuple[Callable[[], Any], str, str]] = {
    "int4_g128": (lambda: jq.IntScheme(bits=4, group_size=128), "int4", "qdot"),
    "int4_g128_asym": (lambda: jq.IntScheme(bits=4, group_size=128, symmetric=False), "int4", "qdot"),
    "int8_w8a16": (lambda: jq.IntScheme(bits=8), "int8w", "qdot"),
    "nf4": (lambda: jq.NF4Scheme(block_size=64), "nf4", "qdot"),
    "nf4_dq": (lambda: jq.NF4Scheme(block_size=64, double_quant=True), "nf4", "qdot"),
    "fp8_w8a16": (lambda: jq.FP8Scheme(fmt="e4m3", granularity="channel"), "fp8_w8a16", "qdot"),
    "fp8_w8a8": (lambda: jq.FP8Scheme(fmt="e4m3", granularity="channel"), "fp8_w8a8", "fp8_w8a8"),
    "ternary": (lambda: jq.TernaryScheme(granularity="channel"), "ternary", "qdot"),
    "ternary_w158a8": (lambda: jq.TernaryScheme(granularity="channel"), "ternary_a8", "ternary_a8"),
}


def _entry(spec: str) -> Callable:
    kind = SPECS[spec][2]
    return jq.qdot if kind == "qdot" else getattr(ops, f"qdot_{kind}")


def gemv_cfg(kernel: str, m: int, k: int, n: int):
    """The kernel's GEMV config (``tuning.gemv_config``; M > 8: 8-row blocks)."""
    return tuning.gemv_config(kernel, min(m, 8), k, n)


@contextlib.contextmanager
def forced_config(pick: Callable[[str, int, int, int], Any] | None):
    """Make ``tuning.get_config`` return ``pick(kernel, m, k, n)`` (traced calls only see it at trace time)."""
    if pick is None:
        yield
        return
    orig = tuning.get_config

    def patched(kernel, m, k, n, device=None):
        cfg = pick(kernel, m, k, n)
        return cfg if cfg is not None else orig(kernel, m, k, n, device)

    tuning.get_config = patched
    try:
        yield
    finally:
        tuning.get_config = orig


def time_per_call(fn: Callable, args: tuple, calls: int, trials: int) -> float:
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(trials):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / calls)
    return float(np.median(samples))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


class Report:
    """Markdown report rewritten after every row."""

    def __init__(self, path: str, head: list[str]):
        self.path, self.head = path, head
        self.sections: dict[str, list[str]] = {}
        self.notes: list[str] = []

    def add(self, section: str, header: str, line: str) -> None:
        rows = self.sections.setdefault(section, [header])
        rows.append(line)
        self.write()

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.write()

    def write(self) -> None:
        parts = list(self.head)
        for name, rows in self.sections.items():
            parts += ["", f"## {name}", "", *rows]
        if self.notes:
            parts += ["", "## Notes", "", *[f"- {n}" for n in self.notes]]
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "w") as f:
            f.write("\n".join(parts) + "\n")
        out = os.environ.get("OUT")
        if out and os.path.isdir(out):
            shutil.copy(self.path, os.path.join(out, os.path.basename(self.path)))


# -------------------------------------------------------------------------------------------------
# 1. correctness
# -------------------------------------------------------------------------------------------------
CHECK_HEADER = (
    "| case | M | K | N | config | rel err vs XLA | rel err vs f64 | deterministic | ok |\n"
    "|---|---:|---:|---:|---|---:|---:|---|---|"
)


def check_cases(dry: bool) -> list[tuple[str, int, int, int, Callable | None]]:
    """(spec, m, k, n, config picker or None for the table)."""
    k, n = (256, 192) if dry else (2048, 768)

    def gemv(kernel, m, kk, nn):
        return gemv_cfg(kernel, m, kk, nn)

    def nf4_select(kernel, m, kk, nn):
        return tuning.heuristic("nf4", 16, kk, nn)

    return [
        ("int4_g128", 1, k, n, gemv),
        ("int4_g128", 5, k + 128, n - 64, gemv),
        ("int4_g128_asym", 3, k, n, gemv),
        ("int8_w8a16", 1, k, n, gemv),
        ("nf4", 1, k, n, gemv),
        ("nf4_dq", 5, k, n - 64, gemv),
        ("nf4", 16, k, n, nf4_select),
        ("fp8_w8a16", 1, k, n, gemv),
        ("fp8_w8a8", 3, k, n, gemv),
        ("ternary", 1, k, n, gemv),
        ("ternary_w158a8", 3, k, n, gemv),
    ]


def section_check(rep: Report, dry: bool, mode: str) -> int:
    bad = 0
    for spec, m, k, n, pick in check_cases(dry):
        try:
            key = jax.random.PRNGKey(m * 131 + k + n)
            w = jax.random.normal(key, (k, n), jnp.float32) * 0.02
            q = jq.quantize(w, SPECS[spec][0]())
            x = jax.random.normal(jax.random.fold_in(key, 1), (m, k), jnp.float32).astype(jnp.bfloat16)
            f = _entry(spec)
            with ops.kernel_mode(mode), forced_config(pick):
                path = ops.explain_qdot(x, q) if SPECS[spec][2] == "qdot" else f"direct {SPECS[spec][2]}"
                cfg = tuning.get_config(SPECS[spec][1], m, k, n)
                y1 = np.asarray(jax.jit(f)(x, q), np.float32)
                y2 = np.asarray(jax.jit(f)(x, q), np.float32)
            with ops.kernel_mode("off"):
                yx = np.asarray(jax.jit(f)(x, q), np.float32)
            wd = np.asarray(jq.dequantize(q), np.float64)
            y64 = np.asarray(x, np.float64) @ wd
            e_x, e_64 = rel(y1, yx), rel(y1, y64)
            det = bool(np.array_equal(y1, y2))
            # bf16 output rounding ~4e-3; W8A8/W1.58A8 quantize the activations (their own function)
            bound64 = 0.05 if spec in ("fp8_w8a8", "ternary_w158a8") else 1e-2
            ok = e_x <= 1e-2 and e_64 <= bound64 and det and np.isfinite(y1).all()
            if "kernel" not in path and "direct" not in path:
                ok = False
            bad += not ok
            rep.add(
                "Correctness (forced configs)",
                CHECK_HEADER,
                f"| {spec} | {m} | {k} | {n} | `{cfg}` | {e_x:.1e} | {e_64:.1e} | {det} | "
                + ("yes |" if ok else "**NO** |"),
            )
        except Exception as e:
            bad += 1
            rep.add(
                "Correctness (forced configs)", CHECK_HEADER, f"| {spec} | {m} | {k} | {n} | error | | | | **{e!r}** |"
            )
            traceback.print_exc()
    return bad


# -------------------------------------------------------------------------------------------------
# 2. timing
# -------------------------------------------------------------------------------------------------
BENCH_HEADER = (
    "| kernel | M | K | N | qdot path (auto) | dot-kernel µs | GEMV µs | bf16 jnp.dot µs | XLA path µs "
    "| dot × bf16 | GEMV × bf16 | best × XLA |\n|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
)


def _rotations(q_bytes: int, dry: bool) -> int:
    if dry:
        return 2
    return int(min(8, max(3, math.ceil(2 * L2_BYTES / max(q_bytes, 1)) + 1)))


def dot_cfg(kernel: str, m: int, k: int, n: int):
    """The tensor-core (dot) kernel config dispatch uses at M=16 on this device (table row or heuristic)."""
    return _GET_CONFIG(kernel, max(m, 16), k, n)


def bench_one(spec: str, m: int, k: int, n: int, dry: bool, with_gemv: bool) -> dict[str, Any]:
    """Times the dot kernel and (optionally) the GEMV kernel, each forced, then the XLA path and bf16 dot."""
    key = jax.random.PRNGKey(7 + m)
    w0 = jax.random.normal(key, (k, n), jnp.float32) * 0.02
    scheme = SPECS[spec][0]()
    q0 = jq.quantize(w0, scheme)
    nb = _rotations(q0.nbytes, dry)
    qs = [q0] + [jq.quantize(jnp.roll(w0, b, axis=1), scheme) for b in range(1, nb)]
    x0 = jax.random.normal(jax.random.fold_in(key, 1), (m, k), jnp.float32).astype(jnp.bfloat16)
    xs = [jnp.roll(x0, b, axis=1) for b in range(nb)]
    f = _entry(spec)
    calls, trials = (1, 1) if dry else (10, 5)
    kmode = "interpret" if dry else "on"

    def many():
        return jax.jit(lambda xl, ql: [f(xi, qi) for xi, qi in zip(xl, ql)])

    row: dict[str, Any] = {"spec": spec, "m": m, "k": k, "n": n}
    with ops.kernel_mode("interpret" if dry else "auto"):
        row["path"] = ops.explain_qdot(x0, q0) if SPECS[spec][2] == "qdot" else f"direct {SPECS[spec][2]}"
    pickers = {"t_dot": dot_cfg}
    if with_gemv:
        pickers["t_gemv"] = gemv_cfg
    for name, pick in pickers.items():
        with ops.kernel_mode(kmode), forced_config(pick):
            row[name] = time_per_call(many(), (xs, qs), calls, trials) / nb
    with ops.kernel_mode("off"):
        row["t_xla"] = time_per_call(many(), (xs, qs), calls, trials) / nb
    del qs
    wb = [jnp.roll(w0, b, axis=1).astype(jnp.bfloat16) for b in range(max(3, nb // 2) if not dry else 2)]
    fb = jax.jit(lambda xl, wl: [jnp.dot(xi, wi) for xi, wi in zip(xl, wl)])
    row["t_bf16"] = time_per_call(fb, (xs[: len(wb)], wb), calls, trials) / len(wb)
    return row


def section_bench(rep: Report, dry: bool, deadline: float) -> None:
    k = n = 256 if dry else 8192
    plan = [
        ("int4_g128", 1, True),
        ("int4_g128", 16, True),
        ("nf4", 1, True),
        ("nf4", 16, False),
        ("int8_w8a16", 1, True),
        ("fp8_w8a16", 1, True),
        ("ternary", 1, True),
        ("fp8_w8a8", 1, True),
        ("ternary_w158a8", 1, True),
        ("int8_w8a16", 16, False),
        ("fp8_w8a16", 16, False),
        ("ternary", 16, False),
    ]
    for spec, m, with_gemv in plan:
        if time.perf_counter() > deadline:
            rep.note(f"time budget reached: skipped {spec} M={m}")
            continue
        try:
            r = bench_one(spec, m, k, n, dry, with_gemv)
        except Exception as e:
            rep.add("Timing", BENCH_HEADER, f"| {spec} | {m} | {k} | {n} | error: {e!r} | | | | | | | |")
            traceback.print_exc()
            continue
        us = {key: r[key] * 1e6 for key in ("t_dot", "t_gemv", "t_xla", "t_bf16") if key in r}
        best = min(r["t_dot"], r.get("t_gemv", math.inf))
        gemv = f"{us['t_gemv']:.1f}" if "t_gemv" in us else "–"
        gx = f"{r['t_bf16'] / r['t_gemv']:.2f}" if "t_gemv" in r else "–"
        rep.add(
            "Timing",
            BENCH_HEADER,
            f"| {spec} | {m} | {k} | {n} | {r['path'][:70]} | {us['t_dot']:.1f} | {gemv} | {us['t_bf16']:.1f} "
            f"| {us['t_xla']:.1f} | {r['t_bf16'] / r['t_dot']:.2f} | {gx} | {r['t_xla'] / best:.2f} |",
        )
        if "t_gemv" in r and not dry:
            kern = SPECS[spec][1]
            won = "GEMV" if r["t_gemv"] < r["t_dot"] else "dot"
            cfg = gemv_cfg(kern, m, k, n) if won == "GEMV" else dot_cfg(kern, m, k, n)
            rep.note(
                f"{spec} M={m}: {won} faster ({us.get('t_gemv', 0):.1f} µs GEMV vs {us['t_dot']:.1f} µs dot); "
                f"auto dispatch took `{r['path'][:60]}`; best row for tuning.TABLE: `({m}, {cfg})`"
            )


# -------------------------------------------------------------------------------------------------
# 3. dispatch at large M
# -------------------------------------------------------------------------------------------------
def section_dispatch(rep: Report, dry: bool) -> int:
    header = "| kernel | M | device | qdot path (auto) | expected | ok |\n|---|---:|---|---|---|---|"
    bad = 0
    k = n = 256 if dry else 8192
    dev = tuning.device_key()
    for spec in ("int4_g128", "nf4", "fp8_w8a16", "int8_w8a16", "ternary"):
        q = jq.quantize(jnp.ones((k, n), jnp.float32) * 0.01, SPECS[spec][0]())
        x = jax.ShapeDtypeStruct((4096, k), jnp.bfloat16)
        with ops.kernel_mode("auto"):
            path = ops.explain_qdot(x, q)
        limit = tuning.max_m(SPECS[spec][1], dev)
        expect_xla = limit is not None or dry  # dry run: no GPU, XLA everywhere
        ok = path.startswith("xla:") == expect_xla
        bad += not ok
        exp = "xla" if expect_xla else "kernel (unmeasured device)"
        rep.add("Dispatch at M=4096", header, f"| {spec} | 4096 | {dev} | {path[:90]} | {exp} | {ok} |")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", "--cpu-interpret", action="store_true", dest="dry_run")
    p.add_argument("--budget-s", type=float, default=95.0, help="start no timing row after this many seconds")
    p.add_argument("--out", default=None, help="report path (default benchmarks/results/<device>-quick.md)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    dev = tuning.device_key() if jax.default_backend() == "gpu" else "cpu"
    path = a.out or (
        os.path.join(tempfile.mkdtemp(prefix="gpu_quick_"), f"{dev}-quick.md")
        if a.dry_run
        else os.path.join(ROOT, "benchmarks", "results", f"{dev}-quick.md")
    )
    mode = "interpret" if a.dry_run else "auto"
    d = jax.devices()[0]
    head = [
        f"# Quick kernel re-check on {getattr(d, 'device_kind', d.platform)}",
        "",
        f"- date (UTC): {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"- JAX {jax.__version__}, Python {sys.version.split()[0]}, backend {jax.default_backend()}",
        "- written by `benchmarks/gpu_quick.py`"
        + (" (**dry run: Pallas interpreter on CPU, timings meaningless**)" if a.dry_run else ""),
        "- µs per matmul (median of 5 x 10 back-to-back calls, weights rotating over copies > 2x L2); "
        "dot-kernel = the tensor-core kernel with the config dispatch uses at M=16 (table/heuristic), GEMV = the "
        "small-M GEMV config, both forced; the qdot path column says which one `qdot` takes at this M; "
        "best × XLA = XLA path time / min(dot, GEMV)",
    ]
    rep = Report(path, head)
    rep.write()
    bad = section_check(rep, a.dry_run, mode)
    bad += section_dispatch(rep, a.dry_run)
    section_bench(rep, a.dry_run, t0 + a.budget_s)
    rep.note(f"total {time.perf_counter() - t0:.1f} s; {bad} failed check(s)")
    print(open(path).read())
    print(f"report: {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
