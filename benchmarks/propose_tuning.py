"""Proposed ``pallas_kernels/tuning.py`` changes from a GPU suite report, each with the measurements behind it.

``benchmarks/gpu_suite.py`` writes ``benchmarks/results/<device>.json``; this reads it and says, per tuning kernel
name (``int4``, ``nf4``, ``int8_outlier``, ...):

- **limit** (``LIMITS[device][kernel]``): where the fused kernel lost to jaxquant's XLA path at some measured ``M``
  (benchmark rows: kernel mode "on", the device's configs at the time), the last ``M`` it won before that, the
  smallest over the kernel's benchmarked schemes and shapes (conservative: between a won and a lost ``M`` it
  proposes the won one). Without a measured loss the current limit stands unless the kernel won beyond it.
- **dequant-dot** (``DEQUANT_DOT[device][kernel]``): the smallest benchmarked ``M`` above that limit from which the
  Pallas dequantization + XLA dot beat the XLA path at every larger measured ``M`` and was bit-identical to it.
- **rows** (``TABLE[device][kernel]``): per swept ``M`` (the int4 block sweep and the other kernels' variant sweep),
  the fastest config with a finite error vs the XLA path below ``--max-rel-err``, where it beat the config ``qdot``
  takes now by more than ``--min-gain`` (timed in the same sweep, else the benchmark row at the same shape).

Nothing is edited: the output is text to read and paste, with the evidence beside each line. Configs whose variant
uses inline PTX or the Mosaic GPU backend are marked: check their rows in the report's correctness table first.

Usage::

    python benchmarks/propose_tuning.py benchmarks/results/h100.json
    python benchmarks/propose_tuning.py REPORT.json --device h100 --min-gain 0.05
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable
from typing import Any

# run from the repository root without installing: python benchmarks/propose_tuning.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

__all__ = ["format_proposals", "main", "propose"]

#: variants whose code is inline PTX (checked against the XLA path only by the CPU emulator before a GPU run) or
#: runs on the Mosaic GPU backend (checked only by its interpreter, on plain tiles, before a GPU run)
PTX_MARKERS = ("ptx", "prmt", "dp4a", "xq", "prepass", "mosaic")


def _tname(bench_kernel: str) -> str:
    from benchmarks.kernel_sass import TUNING_NAME

    return TUNING_NAME.get(bench_kernel, bench_kernel)


def _timed(rows: Iterable[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    """Rows without an error whose ``keys`` are finite positive numbers."""
    out = []
    for r in rows:
        if "error" in r:
            continue
        vals = [r.get(k) for k in keys]
        if all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in vals):
            out.append(r)
    return out


def _limit_of(
    rows: list[dict[str, Any]], current: int | None, swept: dict[tuple[str, int, int, int], float] | None = None
) -> tuple[int | None, str]:
    """The proposed limit from the benchmark rows of one tuning kernel, and the evidence.

    Per benchmarked scheme and shape (a series over ``M``): where the kernel lost to the XLA path at some ``M``, the
    last ``M`` it won before that bounds the limit; the proposal is the smallest such bound. Series that never lost
    bound nothing: with no bound at all the current limit stands if it is at least the largest ``M`` won (``None``:
    no limit), else that ``M``. ``swept`` maps ``(benchmark kernel, M, K, N)`` to the fastest swept config's time
    (those within the error bound): where it beats the benchmarked config, the kernel's time is that one (the row
    proposed for it would run).
    """
    swept = swept or {}
    by_shape: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        by_shape.setdefault((r["kernel"], r["k"], r["n"]), []).append(r)
    bounds, won_max, why = [], 0, []
    for (kernel, k, n), rs in sorted(by_shape.items()):
        won = 0
        for r in sorted(rs, key=lambda r: r["m"]):
            t_swept = swept.get((kernel, r["m"], k, n), math.inf)
            t_kernel = min(r["t_kernel"], t_swept)
            if t_swept < r["t_kernel"]:
                why.append(f"{kernel} M={r['m']}: the swept config's {1e6 * t_swept:.1f} µs counted")
            if t_kernel >= r["t_xla"]:
                why.append(
                    f"{kernel} {k}x{n}: won to M={won}, lost at M={r['m']} ({r['t_xla'] / t_kernel:.2f}x of the "
                    "XLA path's speed)"
                )
                bounds.append(won)
                break
            won = r["m"]
        else:
            why.append(f"{kernel} {k}x{n}: won at every measured M (to {won})")
        won_max = max(won_max, won)
    if bounds:
        return min(bounds), "; ".join(why)
    proposed = current if current is None or current >= won_max else won_max
    return proposed, "; ".join(why) + " (no measured loss)"


def _dequant_start(rows: list[dict[str, Any]], above: int) -> tuple[int | None, str]:
    """Smallest ``M > above`` from which the dequantization kernel + dot beat the XLA path (bit-identical) at every
    larger measured ``M`` in every shape; ``None`` if it never did."""
    rs = [r for r in rows if r["m"] > above and isinstance(r.get("t_dequant_dot"), (int, float))]
    if not rs:
        return None, "not timed above the limit"
    bad = [r for r in rs if not r.get("dequant_dot_bit_identical", False)]
    if bad:
        return None, f"not bit-identical to the XLA path at M={bad[0]['m']} ({bad[0]['kernel']})"
    start = None
    for m in sorted({r["m"] for r in rs}, reverse=True):
        at_m = [r for r in rs if r["m"] == m]
        if all(r["t_dequant_dot"] < r["t_xla"] for r in at_m):
            start = m
        else:
            break
    gains = ", ".join(f"M={r['m']} {r['kernel']} {r['t_xla'] / r['t_dequant_dot']:.2f}x" for r in rs)
    return start, f"vs the XLA path: {gains}"


def _config_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Sweep rows of both sweeps as ``{"tname", "m", "k", "n", "config", "t", "rel_err_vs_xla"}``."""
    out = []
    for r in (report.get("tune") or {}).get("rows", []):
        out.append({**r, "tname": "int4", "kernel": r.get("kernel", "int4_g128")})
    for r in (report.get("tune_kernels") or {}).get("rows", []):
        out.append({**r, "tname": _tname(r.get("kernel", "?"))})
    return out


def propose(report: dict[str, Any], device: str, min_gain: float = 0.03, max_rel_err: float = 1e-2) -> dict:
    """The proposals for ``device`` from a suite report (see the module docstring).

    Returns ``{"limits": {tname: {...}}, "dequant_dot": {tname: {...}}, "rows": {tname: [{...}]}, "kept":
    {tname: [{...}]}}``: proposed values with the current ones and the evidence; ``kept``: swept cases where the
    current config stays (fastest, within ``min_gain`` of the fastest, or not timed at that shape).
    """
    from pallas_kernels import tuning

    if not isinstance(report, dict):
        raise ValueError("a gpu_suite report is a JSON object with 'bench' / 'tune' / 'tune_kernels' entries")
    for key in ("bench", "tune", "tune_kernels"):
        part = report.get(key)
        rows = part.get("rows", []) if isinstance(part, dict) and key != "bench" else part
        if part is not None and (not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows)):
            raise ValueError(f"report[{key!r}] is not a gpu_suite section (a list of result rows expected)")
    if not 0 <= min_gain < 1 or not max_rel_err > 0:
        raise ValueError(f"min_gain must be in [0, 1) and max_rel_err > 0, got {min_gain}, {max_rel_err}")
    bench = [
        r
        for r in _timed(report.get("bench", []), "t_kernel", "t_xla")
        if str(r.get("path", "")).startswith(("kernel", "direct"))  # else "t_kernel" timed the XLA path
    ]
    out: dict[str, Any] = {"limits": {}, "dequant_dot": {}, "rows": {}, "kept": {}}
    by_tname: dict[str, list[dict[str, Any]]] = {}
    for r in bench:
        by_tname.setdefault(_tname(r["kernel"]), []).append(r)
    sweep = _timed(_config_rows(report), "t")
    swept: dict[tuple[str, int, int, int], float] = {}
    for r in sweep:
        if 0 <= r.get("rel_err_vs_xla", math.inf) <= max_rel_err:
            key = (r.get("kernel", "?"), r["m"], r["k"], r["n"])
            swept[key] = min(swept.get(key, math.inf), r["t"])
    with tuning.as_device(device):
        for tname, rows in sorted(by_tname.items()):
            cur = tuning.max_m(tname, device)
            limit, why = _limit_of(rows, cur, swept)
            source = "LIMITS" if tuning.limit_measured(tname, device) else "ESTIMATED_LIMITS"
            out["limits"][tname] = {"proposed": limit, "current": cur, "current_from": source, "evidence": why}
            start, dwhy = _dequant_start(rows, limit if limit is not None else max(r["m"] for r in rows))
            if start is not None or any("t_dequant_dot" in r for r in rows):
                current_dd = tuning.DEQUANT_DOT.get(device, {}).get(tname)
                out["dequant_dot"][tname] = {"proposed": start, "current": current_dd, "evidence": dwhy}
        by_case: dict[tuple[str, int, int, int], list[dict[str, Any]]] = {}
        for r in sweep:
            by_case.setdefault((r["tname"], r["m"], r["k"], r["n"]), []).append(r)
        for (tname, m, k, n), rs in sorted(by_case.items()):
            ok = [r for r in rs if 0 <= r.get("rel_err_vs_xla", math.inf) <= max_rel_err]
            if not ok:
                why = f"no swept config with a measured error vs the XLA path <= {max_rel_err:g}"
                out["kept"].setdefault(tname, []).append({"m": m, "k": k, "n": n, "why": why})
                continue
            best = min(ok, key=lambda r: r["t"])
            cur = repr(tuning.get_config(tname, m, k, n, device))
            same = [r for r in rs if r["config"] == cur]
            if same:
                t_cur, cur_from = min(r["t"] for r in same), "swept"
            else:
                b = [r for r in bench if _tname(r["kernel"]) == tname and (r["m"], r["k"], r["n"]) == (m, k, n)]
                b = [r for r in b if r["kernel"] == best.get("kernel")] or b
                if not b:
                    out["kept"].setdefault(tname, []).append(
                        {"m": m, "k": k, "n": n, "why": f"the current `{cur}` was not timed at this shape"}
                    )
                    continue
                t_cur, cur_from = min(r["t_kernel"] for r in b), "benchmark"
            if best["config"] == cur or best["t"] > t_cur * (1 - min_gain):
                why = (
                    f"the current config {1e6 * t_cur:.1f} µs ({cur_from}), the fastest swept {1e6 * best['t']:.1f} µs"
                )
                out["kept"].setdefault(tname, []).append({"m": m, "k": k, "n": n, "why": why})
                continue
            variant = best["config"].split("variant=")[-1]
            out["rows"].setdefault(tname, []).append(
                {
                    "m": m,
                    "k": k,
                    "n": n,
                    "config": best["config"],
                    "t": best["t"],
                    "current": cur,
                    "t_current": t_cur,
                    "current_timed_by": cur_from,
                    "rel_err_vs_xla": best.get("rel_err_vs_xla"),
                    "ptx": any(p in variant for p in PTX_MARKERS),
                }
            )
    return out


def format_proposals(props: dict[str, Any], device: str) -> str:
    """Markdown: the limit, dequant-dot and table-row proposals, each with its evidence."""
    lines = []
    for tname, p in props["limits"].items():
        if p["proposed"] != p["current"]:
            lines.append(
                f"- `LIMITS[{device!r}][{tname!r}] = {p['proposed']}` (now {p['current']} from {p['current_from']}): "
                f"{p['evidence']}"
            )
        else:
            lines.append(f"- `{tname}` limit {p['current']} consistent with the measurements: {p['evidence']}")
    for tname, p in props["dequant_dot"].items():
        if p["proposed"] is not None and p["proposed"] != p["current"]:
            lines.append(
                f"- `DEQUANT_DOT[{device!r}][{tname!r}] = {p['proposed']}` (now {p['current']}): {p['evidence']}"
            )
        elif p["proposed"] is None:
            lines.append(f"- `{tname}` dequant-dot: no proposal ({p['evidence']})")
    for tname, rows in props["rows"].items():
        for r in rows:
            flag = " **inline PTX or Mosaic GPU: check its correctness row first**" if r["ptx"] else ""
            lines.append(
                f"- `TABLE[{device!r}][{tname!r}]`: `({r['m']}, {r['config']})` {1e6 * r['t']:.1f} µs against "
                f"{1e6 * r['t_current']:.1f} µs for the current `{r['current']}` ({r['current_timed_by']}) at "
                f"M={r['m']}, {r['k']}x{r['n']}, rel err vs XLA {r['rel_err_vs_xla']:.1e}{flag}"
            )
    for tname, kept in props.get("kept", {}).items():
        for r in kept:
            lines.append(f"- `{tname}` M={r['m']}, {r['k']}x{r['n']}: no row proposed ({r['why']})")
    return "\n".join(lines) if lines else "(nothing to propose: no timed benchmark or sweep rows)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", help="a gpu_suite JSON report (benchmarks/results/<device>.json)")
    p.add_argument("--device", default=None, help="device key (default: the report's env.device_key)")
    p.add_argument("--min-gain", type=float, default=0.03, help="propose a row only if this much faster (0.03: 3%%)")
    p.add_argument("--max-rel-err", type=float, default=1e-2, help="largest error vs the XLA path of a proposed row")
    a = p.parse_args(argv)
    try:
        with open(a.report) as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        p.error(f"cannot read {a.report}: {e}")
    device = a.device
    if device is None and isinstance(report, dict):
        device = (report.get("env") or {}).get("device_key")
    if not device:
        p.error("the report names no device (env.device_key); pass --device")
    try:
        props = propose(report, device, a.min_gain, a.max_rel_err)
    except ValueError as e:
        p.error(str(e))
    except KeyError as e:
        p.error(f"a result row in {a.report} lacks the field {e}: not a gpu_suite report")
    print(f"# Proposed pallas_kernels/tuning.py changes for {device} from {a.report}\n")
    print(format_proposals(props, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
