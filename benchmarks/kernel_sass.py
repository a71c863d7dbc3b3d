"""Static machine-code profile of the Pallas kernels' K loops (CPU only, no GPU): instructions per weight.

For each kernel of ``benchmarks/kernels.py`` and each ``M``, the call ``jq.qdot`` makes on a GPU (kernels forced
on, the block config the tuning table gives the chosen device) is lowered for CUDA, its Triton IR compiled for
``sm_<arch>`` with PyPI Triton and disassembled with the bundled ``nvdisasm``; the kernel's main loop (its
longest backward branch; where Triton unrolled the K loop completely, the whole kernel divided by its trips, marked
"unrolled": ``pallas_kernels._triton_tools.k_loop_profile``) is counted by opcode. It prints, per
case: instructions per loop trip (per warp), *thread instructions per weight* (trip instructions x 32 lanes x
warps / weights per trip), int/float conversions per weight, shared-memory loads/stores per weight, and three
floors for the whole matmul on an H100 SXM (132 SMs at the 1.98 GHz boost clock):

* issue floor: every warp instruction of every loop trip issued at 4 per clock per SM (one per sub-partition);
* conversion floor: conversions (``I2F``, ``F2F``, ``F2I``, ``I2I``; not the ALU forms ``I2FP``/``F2FP``) at 16
  results per clock per SM (the CUDA guide's rate for "all other type conversions" on compute capability 9.0);
* memory floor: the packed weights (plus scales) read once at the copy bandwidth measured on the H100
  (2.93 TB/s, ``benchmarks/results/h100.md``).

It also prints two latency hints per trip: *exposed loads*, global loads into registers whose value is read in
the same trip (not the ``LDGSTS`` copies the software pipeline issues stages ahead, nor register prefetches for
the next trip; each makes every trip wait for the memory latency), and *BAR*, block-wide barriers (about two
for the pipeline; more are layout conversions through shared memory); and ptxas' register count per thread with
the bytes spilled to local memory (which should be 0). From those and the shared memory per block: resident blocks
per SM and the limit that binds (``pallas_kernels._triton_tools.occupancy``), and *waves*, programs / (blocks per
SM x 132 SMs), at most one of which may run below full occupancy.

These are lower bounds from the instruction stream, not measurements: latency, occupancy, the split-K
reduction and launch costs come on top. They rank kernel variants without a GPU (e.g. whether a change removes
the quarter-rate conversions) and say which floor binds.

Usage::

    python benchmarks/kernel_sass.py                                   # every kernel, M=1,16, 8192x8192
    python benchmarks/kernel_sass.py --kernels int4_g128 --variant int4=strided+postscale
    python benchmarks/kernel_sass.py --kernels int3_g128 --m 1,4 --variant int3w=gemv/split-gemv/split-gemv+postscale
    python benchmarks/kernel_sass.py --out benchmarks/results/sass-sm90.md
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import json
import os
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.provenance import git_commit  # noqa: E402

SMS, CLOCK_HZ, ISSUE_PER_CLK, CONV_PER_CLK, COPY_BPS = 132, 1.98e9, 4, 16, 2.93e12

#: tensor-core opcodes of the K loop's dot where a kernel has other dots (LLM.int8's float32 outlier loop)
DOT_MMA = {"int8_outlier": ("IMMA", "IGMMA")}

#: benchmark kernel name -> tuning table kernel name
TUNING_NAME = {
    "int4_g128": "int4",
    "int4_g128_asym": "int4",
    "int4_g128_nk": "int4_nk",  # its own key (pallas_kernels.tuning.STORAGE_KEYS)
    "int4_g128_nk_s32": "int4_nk",
    "int8_w8a16": "int8w",
    "int8_w8a16_nk": "int8w_nk",  # its own key (pallas_kernels.tuning.STORAGE_KEYS)
    "int3_g128": "int3w",
    "int3_g128_asym": "int3w",
    "int5_g128_asym": "int5w",
    "int6_g128_asym": "int6w",
    "nf4": "nf4",
    "int8_outlier": "int8_outlier",
    "int8_outlier_nk": "int8_outlier",
    "fp8_w8a16": "fp8_w8a16",
    "fp8_w8a16_nk": "fp8_w8a16",
    "fp8_w8a8": "fp8_w8a8",
    "fp8_w8a8_nk": "fp8_w8a8_nk",  # its own key (pallas_kernels.tuning.STORAGE_KEYS)
    "ternary": "ternary",
    "ternary_w158a8": "ternary_a8",
}

#: conversions issued to the quarter-rate conversion unit; the ``I2FP``/``F2FP`` forms of sm_86+ are counted as
#: ordinary ALU instructions (issue floor only)
CONVERSIONS = ("I2F", "F2F", "F2I", "I2I")


def _weights_per_trip(cfg) -> int:
    return cfg.block_k * cfg.block_n


def profile_case(name: str, m: int, k: int, n: int, device: str, arch: int, variants: dict[str, str]) -> dict:
    """Lower, compile and profile one kernel call; returns a result row (``error`` set on failure)."""
    import jax
    import jax.numpy as jnp

    import jaxquant as jq
    from benchmarks.kernels import SPECS, _direct_fn
    from jaxquant.ops import explain_qdot, kernel_mode
    from pallas_kernels import _triton_tools as tt
    from pallas_kernels import tuning

    spec = SPECS[name]
    tname = TUNING_NAME[name]
    with tuning.as_device(device):  # the heuristics of an unmeasured kernel size for that device, too
        cfg = tuning.get_config(tname, m, k, n, device)
    if "gemv" in variants.get(tname, "") and (tuning.base_kernel(tname) in tuning._GEMV_K_PER_UNIT or tname == "nf4"):
        cfg = tuning.gemv_config(tname, m, k, n, variant=variants[tname])
    elif tname in variants:
        cfg = dataclasses.replace(cfg, variant=variants[tname])
    row: dict[str, Any] = {"kernel": name, "m": m, "k": k, "n": n, "config": cfg}
    table = tuning.TABLE.get(device, {}).get(tname)
    if table is not None:
        tuning.TABLE[device][tname] = [(mx, cfg) for mx, _ in table]
    else:
        tuning.TABLE.setdefault(device, {})[tname] = [(1 << 62, cfg)]
    try:
        q = jax.eval_shape(lambda w: jq.quantize(w, spec.scheme()), jax.ShapeDtypeStruct((k, n), jnp.float32))
        x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
        op = jq.qdot if spec.direct is None else _direct_fn(spec, False)
        jax.clear_caches()  # qdot reads the block config when traced: no trace of an earlier config
        with kernel_mode("on"), tuning.as_device(device):
            calls = tt.triton_calls(tt.export_cuda(op, x, q))
            if spec.direct is None:  # the config qdot runs: a table row its storage cannot run is skipped
                path = explain_qdot(x, q, device=device)
                if "BlockConfig(" in path:
                    i = path.index("BlockConfig(")
                    cfg = row["config"] = parse_config(path[i : path.index(")", i) + 1])
        if not calls:
            raise RuntimeError("no Triton kernel in the lowering")
        call = max(calls, key=lambda c: c.grid[0] * c.grid[1] * c.grid[2])
        # trips of one program's K loop: K / BK steps over the split-K programs (the fp8 step may be smaller)
        split = call.grid[2] if len(call.grid) > 2 else 1
        trips = max(1, k // (cfg.block_k * split))
        sass, cubin = tt.sass_and_report(tt.ir_text(call.ir), arch, call.num_warps, call.num_stages)
        prof = tt.k_loop_profile(sass, trips, DOT_MMA.get(tname, tt.MMA_OPCODES))
    except Exception as e:  # reported in the table
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
        return row
    finally:
        if table is not None:
            tuning.TABLE[device][tname] = table
        else:
            del tuning.TABLE[device][tname]
    programs = call.grid[0] * call.grid[1] * call.grid[2]
    per_trip = _weights_per_trip(cfg)
    trips = k * n / per_trip * max(1, -(-m // cfg.block_m))  # every (M tile, weight tile) pair, over all programs
    lanes = call.num_warps * 32
    conv = sum(prof.count(c) for c in CONVERSIONS)
    wbytes = q.nbytes if hasattr(q, "nbytes") else sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(q))
    row.update(
        warps=call.num_warps,
        programs=programs,
        trip_instr=prof.instructions,
        instr_per_weight=prof.instructions * lanes / per_trip,
        conv_per_weight=conv * lanes / per_trip,
        smem_per_weight=(prof.count("LDS") + prof.count("STS")) * lanes / per_trip,
        exposed=prof.exposed_loads,
        barriers=prof.barriers,
        mma=sum(prof.count(op) for op in tt.MMA_OPCODES),
        unrolled=prof.unrolled,
        issue_us=prof.instructions * call.num_warps * trips / (SMS * ISSUE_PER_CLK * CLOCK_HZ) * 1e6,
        conv_us=conv * lanes * trips / (SMS * CONV_PER_CLK * CLOCK_HZ) * 1e6,
        mem_us=wbytes / COPY_BPS * 1e6,
        top=", ".join(f"{op} {c}" for op, c in list(prof.counts.items())[:6]),
        regs=cubin.n_regs,
        spill=cubin.spill_bytes,
        smem=cubin.shared_bytes,
    )
    if cubin.n_regs and arch in tt.SM_LIMITS:
        blocks, bind = tt.occupancy(cubin.n_regs, cubin.shared_bytes or 0, call.num_warps, arch)
        row.update(blocks_per_sm=blocks, occupancy_bound=bind, waves=programs / max(blocks * SMS, 1))
    return row


def swept_cases(report_path: str, kernels: list[str]) -> list[dict]:
    """The timed configs of a gpu_suite report's sweeps (the int4 block sweep and the kernel-variant sweep) of
    ``kernels``: ``{"kernel", "m", "k", "n", "config" (a BlockConfig), "t" (seconds)}``, in the report's order.
    Raises ``ValueError`` for a file that is not such a report."""
    with open(report_path) as f:
        report = json.load(f)
    if not isinstance(report, dict) or not ("tune" in report or "tune_kernels" in report):
        raise ValueError("not a gpu_suite report (no 'tune' / 'tune_kernels' section)")
    out = []
    for section, default in (("tune", "int4_g128"), ("tune_kernels", None)):
        for r in (report.get(section) or {}).get("rows", []):
            name = r.get("kernel") or default
            t = r.get("t")
            if name not in kernels or "error" in r or not isinstance(t, (int, float)) or not t > 0:
                continue
            cfg = parse_config(str(r.get("config")))
            out.append({"kernel": name, "m": int(r["m"]), "k": int(r["k"]), "n": int(r["n"]), "config": cfg, "t": t})
    return out


def parse_config(text: str):
    """The :class:`~pallas_kernels._common.BlockConfig` of its ``repr`` (keyword arguments of literals only; no code
    is run). Raises ``ValueError`` for anything else."""
    from pallas_kernels._common import BlockConfig

    try:
        call = ast.parse(text.strip(), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "BlockConfig"):
            raise ValueError("not a BlockConfig(...) call")
        if call.args:
            raise ValueError("positional arguments")
        return BlockConfig(**{kw.arg: ast.literal_eval(kw.value) for kw in call.keywords})
    except (SyntaxError, TypeError, ValueError) as e:
        raise ValueError(f"unreadable block config {text!r}: {e}") from None


def profile_swept(case: dict, device: str, arch: int) -> dict:
    """:func:`profile_case` of one swept config (forced as the device's only table row), with its time."""
    from pallas_kernels import tuning

    tname = TUNING_NAME[case["kernel"]]
    per_kernel = tuning.TABLE.setdefault(device, {})
    saved = per_kernel.get(tname)
    per_kernel[tname] = [(1 << 62, case["config"])]
    try:
        row = profile_case(case["kernel"], case["m"], case["k"], case["n"], device, arch, {})
    finally:
        if saved is None:
            del per_kernel[tname]
        else:
            per_kernel[tname] = saved
    row["measured_us"] = 1e6 * case["t"]
    print(f"{case['kernel']} M={case['m']} {case['config']}: {row.get('error', 'ok')}", file=sys.stderr, flush=True)
    return row


def format_measured(rows: list[dict]) -> str:
    """Markdown: measured time beside the static numbers, one row per swept config."""
    out = [
        "| kernel | M | variant (tile, split, warps, stages) | measured µs | instr/weight | issue floor µs "
        "| smem/weight | BAR/trip | registers, shared KiB | blocks/SM (bound), waves |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        c = r["config"]
        tile = f"{c.block_m}x{c.block_n}x{c.block_k}"
        cfg = f"{c.variant or 'default'} ({tile}, {c.split_k}, {c.num_warps}, {c.num_stages})"
        if "error" in r:
            out.append(
                f"| {r['kernel']} | {r['m']} | {cfg} | {r['measured_us']:.1f} |" + " – |" * 5 + f" {r['error']} |"
            )
            continue
        out.append(
            f"| {r['kernel']} | {r['m']} | {cfg} | {r['measured_us']:.1f} | {r['instr_per_weight']:.2f} "
            f"| {r['issue_us']:.1f} | {r['smem_per_weight']:.2f} | {r['barriers']} | {r['regs']}, {_kib(r['smem'])} "
            f"| {_occ(r)} |"
        )
    return "\n".join(out)


def _kib(v: int | None) -> str:
    return "?" if v is None else f"{v / 1024:.0f}"


def _occ(r: dict) -> str:
    if "blocks_per_sm" not in r:
        return "?"
    return f"{r['blocks_per_sm']} ({r['occupancy_bound']}), {r['waves']:.2f}"


def format_table(rows: list[dict]) -> str:
    head = (
        "| kernel | M | variant (tile, split, warps) | instr/trip | instr/weight | conv/weight | smem/weight "
        "| exposed loads/trip | BAR/trip | registers (spill bytes), shared KiB | blocks/SM (bound), waves "
        "| issue floor µs | conv floor µs | memory floor µs "
        "| binding | most frequent opcodes per trip |\n"
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|"
    )
    out = [head]
    for r in rows:
        c = r["config"]
        cfg = f"{c.variant or 'default'} ({c.block_m}x{c.block_n}x{c.block_k}, {c.split_k}, {c.num_warps})"
        if "error" in r:
            out.append(f"| {r['kernel']} | {r['m']} | {cfg} |" + " – |" * 12 + f" {r['error']} |")
            continue
        floors = {"issue": r["issue_us"], "conversion": r["conv_us"], "memory": r["mem_us"]}
        trip = f"{r['trip_instr']}{' (unrolled)' if r.get('unrolled') else ''}"
        out.append(
            f"| {r['kernel']} | {r['m']} | {cfg} | {trip} | {r['instr_per_weight']:.2f} "
            f"| {r['conv_per_weight']:.2f} | {r['smem_per_weight']:.2f} | {r['exposed']} | {r['barriers']} "
            f"| {r['regs']} ({r['spill']}), {_kib(r['smem'])} | {_occ(r)} | {r['issue_us']:.1f} | {r['conv_us']:.1f} "
            f"| {r['mem_us']:.1f} | {max(floors, key=floors.get)} | {r['top']} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", help="comma-separated benchmark kernel names (default: all)")
    p.add_argument("--m", default="1,16", help="comma-separated M values")
    p.add_argument("--kn", default="8192x8192", help="K x N")
    p.add_argument("--device", default="h100", help="tuning-table device whose block configs are used")
    p.add_argument("--arch", type=int, default=90, help="compile for sm_<arch>")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KERNEL=VARIANT",
        help="override the config's variant for a tuning kernel name (e.g. int4=strided+postscale; several "
        "separated by '/': int3w=gemv/split-gemv, one row each); repeatable",
    )
    p.add_argument(
        "--report",
        help="a gpu_suite report (JSON): profile every config its sweeps timed (of --kernels, if given), the measured "
        "time beside the static numbers; --m / --kn / --variant are then not used",
    )
    p.add_argument("--out", help="also write the table (with date, commit and command) to this markdown file")
    a = p.parse_args(argv)
    from pallas_kernels import _triton_tools as tt

    if not tt.triton_available():
        print("kernel_sass: needs PyPI triton (pip install -e '.[dev]')", file=sys.stderr)
        return 2
    kernels = a.kernels.split(",") if a.kernels else list(TUNING_NAME)
    unknown = [k for k in kernels if k not in TUNING_NAME]
    if unknown:
        print(f"kernel_sass: unknown kernels {unknown}; known: {', '.join(TUNING_NAME)}", file=sys.stderr)
        return 2
    try:
        ms = [int(v) for v in a.m.split(",")]
        k, n = (int(v) for v in a.kn.lower().split("x"))
        variants = dict(v.split("=", 1) for v in a.variant)
    except ValueError:
        print("kernel_sass: --m takes integers, --kn KxN, --variant KERNEL=VARIANT", file=sys.stderr)
        return 2
    if a.report:
        try:
            cases = swept_cases(a.report, kernels)
        except (OSError, ValueError) as e:
            print(f"kernel_sass: --report {a.report}: {e}", file=sys.stderr)
            return 2
        rows = [profile_swept(c, a.device, a.arch) for c in cases]
        _write(format_measured(rows), a, argv, f"the configs timed in {a.report} (measured µs: its times)")
        return 0
    rows = []
    for name in kernels:
        tname = TUNING_NAME[name]
        for variant in variants.get(tname, "").split("/") if tname in variants else [None]:
            for m in ms:
                over = {**variants, tname: variant} if variant is not None else variants
                r = profile_case(name, m, k, n, a.device, a.arch, over)
                rows.append(r)
                status = r.get("error") or f"{r['instr_per_weight']:.2f} instr/weight, issue {r['issue_us']:.1f} µs"
                print(f"{name} M={m}: {status}", file=sys.stderr, flush=True)
    _write(format_table(rows), a, argv, f"tuning table of `{a.device}`")
    return 0


def _write(table: str, a: argparse.Namespace, argv: list[str] | None, configs: str) -> None:
    print(table)
    if a.out:
        import jax

        text = (
            f"# Static K-loop profile for sm_{a.arch} (no GPU involved)\n\n"
            f"- date (UTC): {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}\n"
            f"- commit: {git_commit()}; JAX {jax.__version__}; PyPI triton with its bundled ptxas/nvdisasm\n"
            f"- command: `python benchmarks/kernel_sass.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n"
            f"- block configs: {configs}; floors for an H100 SXM ({SMS} SMs, "
            f"{CLOCK_HZ / 1e9:.2f} GHz, {COPY_BPS / 1e12:.2f} TB/s copy): see the script's docstring\n\n"
            f"{table}\n"
        )
        from jaxquant.files import atomic_write

        atomic_write(a.out, text, mode=0o644)


if __name__ == "__main__":
    raise SystemExit(main())
