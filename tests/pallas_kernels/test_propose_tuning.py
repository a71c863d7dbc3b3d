"""``benchmarks/propose_tuning.py``: a suite report's measurements turned into tuning-table proposals."""

from __future__ import annotations

import json

import pytest

from benchmarks.propose_tuning import format_proposals, main, propose
from pallas_kernels import tuning
from pallas_kernels._common import BlockConfig

K = N = 8192


def _bench(kernel: str, m: int, t_kernel: float, t_xla: float, path: str = "kernel: x", **extra) -> dict:
    return {"kernel": kernel, "m": m, "k": K, "n": N, "t_kernel": t_kernel, "t_xla": t_xla, "path": path, **extra}


def test_limit_is_the_largest_m_won_at_every_smaller_m_and_every_scheme():
    report = {
        "bench": [
            _bench("int4_g128", 1, 30e-6, 200e-6),
            _bench("int4_g128", 16, 31e-6, 200e-6),
            _bench("int4_g128", 64, 60e-6, 210e-6),
            _bench("int4_g128", 256, 250e-6, 230e-6),
            _bench("int4_g128", 4096, 9e-6, 1e-3),  # a win after a loss does not extend the limit
            _bench("int4_g128_asym", 1, 30e-6, 200e-6),
            _bench("int4_g128_asym", 16, 40e-6, 200e-6),
            _bench("int4_g128_asym", 64, 220e-6, 210e-6),
            _bench("nf4", 1, 50e-6, 300e-6),
            _bench("nf4", 16, 52e-6, 300e-6),
            _bench("nf4", 4096, 1e-6, 9.0, path="xla: not the kernel"),  # ignored: timed the XLA path
            _bench("ternary_w158a8", 1, 90e-6, 80e-6, path="direct ternary_a8"),
            {"kernel": "fp8_w8a8", "m": 1, "k": K, "n": N, "error": "boom"},
        ]
    }
    props = propose(report, "h100")
    lim = props["limits"]
    assert lim["int4"]["proposed"] == 16 and lim["int4"]["current"] == 256
    assert "int4_g128_asym 8192x8192: won to M=16, lost at M=64" in lim["int4"]["evidence"]
    assert "int4_g128 8192x8192: won to M=64, lost at M=256" in lim["int4"]["evidence"]
    # no measured loss: the current (inferred) 32 stands, the measurements reach only 16
    assert lim["nf4"]["proposed"] == 32 and "won at every measured M (to 16)" in lim["nf4"]["evidence"]
    assert lim["ternary_a8"]["proposed"] == 0  # lost at its first M: never the kernel
    assert "fp8_w8a8" not in lim
    text = format_proposals(props, "h100")
    assert "`LIMITS['h100']['int4'] = 16` (now 256 from LIMITS)" in text
    assert "`nf4` limit 32 consistent with the measurements" in text
    won_far = [_bench("nf4", 1, 50e-6, 300e-6), _bench("nf4", 128, 90e-6, 300e-6)]
    assert propose({"bench": won_far}, "h100")["limits"]["nf4"]["proposed"] == 128  # won beyond the current 32
    with tuning.as_device("l4"):  # an unmeasured device: the current value is the estimate
        assert propose(report, "l4")["limits"]["int4"]["current_from"] == "ESTIMATED_LIMITS"


def test_limit_counts_a_faster_swept_config_within_the_error_bound():
    """The benchmark times the config in the table then; a swept config proposed as a row (within the error bound)
    is what would run, so its time decides a win (the H200's fp8 W8A8 from (N, K) codes: its GEMV lost to the XLA
    path at M=1, the "prequant" config won)."""
    rows = [_bench("fp8_w8a8_nk", 1, 55e-6, 43e-6, path="direct fp8_w8a8"), _bench("fp8_w8a8_nk", 16, 40e-6, 33e-6)]

    def swept(m, t, err):
        return {"kernel": "fp8_w8a8_nk", "m": m, "k": K, "n": N, "config": f"c{t}", "t": t, "rel_err_vs_xla": err}

    lim = propose({"bench": rows, "tune_kernels": {"rows": [swept(1, 30e-6, 2e-3), swept(16, 37e-6, 1e-3)]}}, "h200")
    assert lim["limits"]["fp8_w8a8_nk"]["proposed"] == 1
    assert "the swept config's 30.0 µs counted" in lim["limits"]["fp8_w8a8_nk"]["evidence"]
    # a swept config beyond the error bound does not count
    lim = propose({"bench": rows, "tune_kernels": {"rows": [swept(1, 30e-6, 0.5)]}}, "h200")
    assert lim["limits"]["fp8_w8a8_nk"]["proposed"] == 0


def test_dequant_dot_needs_bit_identity_and_wins_at_every_larger_m():
    rows = [
        _bench("int4_g128", 1, 30e-6, 200e-6),
        _bench("int4_g128", 256, 300e-6, 230e-6, t_dequant_dot=250e-6, dequant_dot_bit_identical=True),
        _bench("int4_g128", 1024, 600e-6, 400e-6, t_dequant_dot=380e-6, dequant_dot_bit_identical=True),
        _bench("int4_g128", 4096, 2e-3, 950e-6, t_dequant_dot=800e-6, dequant_dot_bit_identical=True),
    ]
    dd = propose({"bench": rows}, "h100")["dequant_dot"]["int4"]
    assert dd["proposed"] == 1024 and dd["current"] is None  # lost at 256, won from 1024 up
    rows[-1]["dequant_dot_bit_identical"] = False
    dd = propose({"bench": rows}, "h100")["dequant_dot"]["int4"]
    assert dd["proposed"] is None and "not bit-identical" in dd["evidence"]


def test_rows_only_where_faster_by_the_margin_accurate_and_flagged_if_ptx():
    cur = repr(tuning.get_config("ternary_a8", 1, K, N, "h100"))
    gemv = repr(BlockConfig(1, 128, 64, split_k=1, num_warps=4, num_stages=4, variant="dp4a-gemv+xq"))
    split = repr(BlockConfig(16, 64, 128, split_k=4, num_warps=4, num_stages=4, variant="split"))
    loose = repr(BlockConfig(16, 64, 128, split_k=4, num_warps=4, num_stages=4, variant="split+ptx"))
    sweep = [
        {"kernel": "ternary_w158a8", "m": 1, "k": K, "n": N, "config": cur, "t": 40e-6, "rel_err_vs_xla": 0.0},
        {"kernel": "ternary_w158a8", "m": 1, "k": K, "n": N, "config": gemv, "t": 20e-6, "rel_err_vs_xla": 0.0},
        {"kernel": "ternary_w158a8", "m": 16, "k": K, "n": N, "config": split, "t": 39.5e-6, "rel_err_vs_xla": 0.0},
        {"kernel": "ternary_w158a8", "m": 16, "k": K, "n": N, "config": loose, "t": 10e-6, "rel_err_vs_xla": 0.5},
    ]
    bench = [_bench("ternary_w158a8", 16, 40e-6, 100e-6, path="direct ternary_a8")]
    rows = propose({"bench": bench, "tune_kernels": {"rows": sweep}}, "h100")["rows"]
    assert [(r["m"], r["config"], r["ptx"], r["current_timed_by"]) for r in rows["ternary_a8"]] == [
        (1, gemv, True, "swept")
    ]  # M=16: 1.3% faster (below 3%), and the fast one is 50% off the XLA path
    kept = propose({"bench": bench, "tune_kernels": {"rows": sweep}}, "h100")["kept"]["ternary_a8"]
    why = "the current config 40.0 µs (benchmark), the fastest swept 39.5 µs"
    assert [(r["m"], r["why"]) for r in kept] == [(16, why)]
    assert "`ternary_a8` M=16, 8192x8192: no row proposed (the current config 40.0 µs" in format_proposals(
        propose({"bench": bench, "tune_kernels": {"rows": sweep}}, "h100"), "h100"
    )
    loose_ok = propose({"bench": bench, "tune_kernels": {"rows": sweep}}, "h100", max_rel_err=1.0)["rows"]
    assert [(r["m"], r["config"], r["current_timed_by"]) for r in loose_ok["ternary_a8"]][1] == (16, loose, "benchmark")
    text = format_proposals({"limits": {}, "dequant_dot": {}, "rows": rows}, "h100")
    assert f"`TABLE['h100']['ternary_a8']`: `(1, {gemv})` 20.0 µs against 40.0 µs" in text
    assert "inline PTX" in text
    int4 = [{"m": 1, "k": K, "n": N, "config": repr(tuning.get_config("int4", 1, K, N, "h100")), "t": 34e-6}]
    int4.append({"m": 1, "k": K, "n": N, "config": split, "t": 20e-6, "rel_err_vs_xla": 1e-6})
    bare = [{k: v for k, v in r.items() if k != "rel_err_vs_xla"} for r in int4]
    no_err = propose({"tune": {"rows": bare}}, "h100")  # rows without a measured error are never proposed
    assert "int4" not in no_err["rows"] and "measured error" in no_err["kept"]["int4"][0]["why"]
    int4[0]["rel_err_vs_xla"] = 1e-6
    assert propose({"tune": {"rows": int4}}, "h100")["rows"]["int4"][0]["config"] == split


def test_cli_reads_a_report_and_refuses_bad_input(tmp_path, capsys):
    path = tmp_path / "h100.json"
    bench = [_bench("nf4", 1, 50e-6, 300e-6), _bench("nf4", 16, 400e-6, 300e-6)]
    path.write_text(json.dumps({"env": {"device_key": "h100"}, "bench": bench}))
    assert main([str(path)]) == 0
    assert "`LIMITS['h100']['nf4'] = 1` (now 32 from LIMITS)" in capsys.readouterr().out
    bad = [
        ([str(tmp_path / "missing.json")], "cannot read"),
        ([str(path), "--min-gain", "2"], "min_gain must be in [0, 1)"),
    ]
    (tmp_path / "nodev.json").write_text("{}")
    bad.append(([str(tmp_path / "nodev.json")], "names no device"))
    (tmp_path / "list.json").write_text("[1]")
    bad.append(([str(tmp_path / "list.json"), "--device", "h100"], "JSON object"))
    (tmp_path / "rows.json").write_text(json.dumps({"bench": "oops", "tune": {"rows": [1]}}))
    bad.append(([str(tmp_path / "rows.json"), "--device", "h100"], "report['bench'] is not a gpu_suite section"))
    (tmp_path / "tune.json").write_text(json.dumps({"tune": {"rows": [1]}}))
    bad.append(([str(tmp_path / "tune.json"), "--device", "h100"], "report['tune'] is not a gpu_suite section"))
    no_m = {"kernel": "nf4", "t_kernel": 1.0, "t_xla": 2.0, "path": "kernel"}  # no M, K, N
    (tmp_path / "field.json").write_text(json.dumps({"bench": [no_m]}))
    bad.append(([str(tmp_path / "field.json"), "--device", "h100"], "lacks the field"))
    for argv, message in bad:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv
