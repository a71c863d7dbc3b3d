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
            assert "pallas_call" in jaxpr, (name, m, cfg)
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
