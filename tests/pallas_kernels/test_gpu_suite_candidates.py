"""The prepared GPU sweep only holds calls the kernels accept (checked by tracing, no GPU and no compilation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant.ops import kernel_mode
from pallas_kernels import tuning


def test_every_sweep_case_traces_as_its_kernel(monkeypatch):
    """Each ``TUNE_KERNEL_CONFIGS`` case, at the sweep's shapes (K = N = 8192), with the device table replaced by
    that one config as the suite does, traces in kernel mode "on" (which raises instead of falling back to XLA)
    and contains a Pallas call: a variant name the kernel does not know, or a tile it rejects, fails here rather
    than on the lent GPU."""
    from benchmarks import gpu_suite
    from benchmarks.kernel_sass import TUNING_NAME
    from benchmarks.kernels import SPECS, _direct_fn

    monkeypatch.setattr(tuning, "device_key", lambda kind=None: "sweep-probe")
    k = n = 8192
    cases = 0
    for name, cfg, ms in gpu_suite.tune_kernel_candidates():
        spec, tname = SPECS[name], TUNING_NAME[name]
        q = jax.eval_shape(
            lambda w, spec=spec: jq.quantize(w, spec.scheme()), jax.ShapeDtypeStruct((k, n), jnp.float32)
        )
        op = jq.qdot if spec.direct is None else _direct_fn(spec, False)
        for m in ms or (1, 16):
            if "gemv" in cfg.variant and m > cfg.block_m:
                continue  # the suite skips these too
            monkeypatch.setitem(tuning.TABLE, "sweep-probe", {tname: [(1 << 62, cfg)]})
            x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
            with kernel_mode("on"):
                jaxpr = str(jax.make_jaxpr(op)(x, q))
            # a Pallas kernel: pallas_call, or (a Mosaic GPU kernel with scoped accumulators) its mpmd_map
            assert "pallas_call" in jaxpr or "mpmd_map" in jaxpr, (name, m, cfg)
            cases += 1
    assert cases >= 60


def test_wall_clock_limit_still_writes_the_report(tmp_path):
    """``--wall-s``: sections that no longer fit before the limit (minus the report's reserve) are skipped and
    named, and the report is written in time (a CPU dry run: the environment section always runs, the rest is
    skipped)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "benchmarks" / "gpu_suite.py"), "--dry-run", "--wall-s", "32"]
    cmd += ["--kernels", "int4_g128", "--m", "1", "--kn", "256x256", "--no-tune", "--skip-check"]
    cmd += ["--trace-budget-s", "0", "--out", str(tmp_path)]
    t0 = time.time()
    subprocess.run(cmd, cwd=root, check=True, capture_output=True, timeout=120)
    assert time.time() - t0 < 32
    text = (tmp_path / "cpu-dry-run.md").read_text()
    assert "skipped: --wall-s 32" in text and "interim" not in text and "ceilings: --wall-s 32 reached" in text
    assert (tmp_path / "cpu-dry-run.json").exists()


def test_bad_shape_lists_stop_before_any_section(capsys):
    """A typo in ``--m`` / ``--kn`` / ``--tune-kn`` ends the benchmark scripts with a usage error naming the bad
    part (exit status 2), before anything runs, instead of a traceback minutes into a device lease."""
    import pytest

    from benchmarks import gpu_suite, kernels

    cases = [
        (kernels.main, ["--m", "1,x"], "'x' is not an M value"),
        (kernels.main, ["--m", "0"], "M must be positive"),
        (kernels.main, ["--kn", "8192"], "'8192' is not KxN"),
        (gpu_suite.main, ["--trace-m", "1,,16"], "'' is not an M value"),
        (gpu_suite.main, ["--tune-kn", "64x64,128x128"], "--tune-kn takes one KxN"),
        (gpu_suite.main, ["--kn", "64x0"], "K and N must be positive"),
    ]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
        assert message in capsys.readouterr().err, argv
    assert kernels._parse_kn("8192x8192,4096X14336") == [(8192, 8192), (4096, 14336)]
    assert kernels._parse_m("1,4,16") == [1, 4, 16]


def test_sweeps_time_what_this_device_has_not_timed_first(tmp_path):
    """``measured_before`` reads the keys a saved report of the same device and shape timed without error; other
    devices, other shapes, failed rows and unreadable files count for nothing. ``unmeasured_first`` moves those
    keys behind the rest, keeping each part's order."""
    import json

    import pytest

    from benchmarks import gpu_suite

    def report(device, kn, rows):
        return {"env": {"device_key": device}, "tune_kn": kn, "tune_kernels": {"rows": rows}}

    rows = [
        {"key": "nf4|1|A", "t": 1e-5},
        {"key": "nf4|16|A", "t": 2e-5, "error": "boom"},  # failed: still to measure
        {"key": "nf4|1|B"},  # no time (cut off): still to measure
    ]
    (tmp_path / "h200-a.json").write_text(json.dumps(report("h200", "8192x8192", rows)))
    (tmp_path / "h200-b.json").write_text(json.dumps(report("h200", "4096x4096", [{"key": "nf4|1|C", "t": 1e-5}])))
    (tmp_path / "h100.json").write_text(json.dumps(report("h100", "8192x8192", [{"key": "nf4|1|D", "t": 1e-5}])))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    done = gpu_suite.measured_before("h200", "tune_kernels", "8192x8192", str(tmp_path))
    assert done == {"nf4|1|A"}
    assert gpu_suite.measured_before("h200", "tune", "8192x8192", str(tmp_path)) == set()
    assert gpu_suite.measured_before("h200", "tune_kernels", "8192x8192", str(tmp_path / "absent")) == set()

    keys = ["nf4|1|A", "nf4|16|A", "nf4|1|B", "nf4|1|D"]
    assert gpu_suite.unmeasured_first(["a", "b", "c", "d"], keys, {"nf4|1|A", "nf4|1|B"}) == ["b", "d", "a", "c"]
    with pytest.raises(ValueError, match="3 cases but 2 keys"):
        gpu_suite.unmeasured_first([1, 2, 3], ["x", "y"], set())


def test_the_saved_h200_reports_put_new_configs_first():
    """With the reports in benchmarks/results, the H200 sweep at 8192^2 starts with configs it never timed (the
    K-major int4 ones, then W1.58A8 ``split+ptx`` and NF4 ``prmt``), not with the repeats of its last run."""
    from benchmarks import gpu_suite

    done = gpu_suite.measured_before("h200", "tune_kernels", "8192x8192")
    assert len(done) >= 20  # the 2026-11-28 run's sweep
    cases = [
        (name, cfg, m)
        for name, cfg, ms in gpu_suite.tune_kernel_candidates()
        for m in ms or (1, 16)
        if not ("gemv" in cfg.variant and m > cfg.block_m)
    ]
    keys = [f"{name}|{m}|{cfg!r}" for name, cfg, m in cases]
    order = gpu_suite.unmeasured_first(cases, keys, done)
    first = [f"{name}|{m}|{cfg!r}" for name, cfg, m in order[:24]]
    assert not set(first) & done
    assert any(k.startswith("nf4|") and "prmt" in k for k in first)
