"""``benchmarks/kernel_sass.py``: one kernel's sm_90 K-loop profile, occupancy and table row (compiled on the CPU)."""

from __future__ import annotations

from pallas_helpers import requires_triton


@requires_triton
def test_profile_case_reports_the_loop_and_the_occupancy():
    from benchmarks.kernel_sass import format_table, profile_case
    from pallas_kernels import _triton_tools as tt

    row = profile_case("int4_g128", 1, 1024, 1024, "h200", 90, {})
    assert "error" not in row, row.get("error")
    assert row["mma"] > 0 and row["trip_instr"] > 0 and row["instr_per_weight"] > 0
    blocks, bind = tt.occupancy(row["regs"], row["smem"], row["warps"], 90)
    assert (row["blocks_per_sm"], row["occupancy_bound"]) == (blocks, bind) and blocks >= 1
    assert abs(row["waves"] - row["programs"] / (blocks * 132)) < 1e-9
    table = format_table([row, {"kernel": "x", "m": 1, "config": row["config"], "error": "boom"}])
    head, rule, good, bad = table.splitlines()
    # every line has as many cells as the header
    assert head.count("|") == rule.count("|") == good.count("|") == bad.count("|")
    assert f"{blocks} ({bind}), " in good and "boom" in bad


@requires_triton
def test_profile_case_names_the_config_qdot_runs():
    """K-major int4 codes on the H200: the int4 table row (``interleave``) is one their storage cannot run, so qdot
    skips it; the profile names the config that was compiled (the split dot), not the skipped row."""
    from benchmarks.kernel_sass import profile_case

    row = profile_case("int4_g128_nk", 1, 1024, 1024, "h200", 90, {})
    assert "error" not in row, row.get("error")
    assert row["config"].variant == "split"
    assert profile_case("int4_g128", 1, 1024, 1024, "h200", 90, {})["config"].variant == "interleave"


def test_parse_config_reads_a_repr_and_nothing_else():
    import pytest

    from benchmarks.kernel_sass import parse_config
    from pallas_kernels._common import BlockConfig

    cfg = BlockConfig(16, 64, 128, split_k=4, num_warps=4, num_stages=5, variant="interleave")
    assert parse_config(repr(cfg)) == cfg
    for bad in ("BlockConfig(16, 64)", "__import__('os').system('true')", "BlockConfig(block_m=x)", "Foo(a=1)", "("):
        with pytest.raises(ValueError, match="unreadable block config"):
            parse_config(bad)


def test_report_mode_refuses_a_file_that_is_not_a_report(tmp_path, capsys):
    from benchmarks.kernel_sass import main
    from pallas_kernels import _triton_tools as tt

    bad = tmp_path / "r.json"
    bad.write_text('{"bench": []}')
    code = main(["--report", str(bad)])
    if tt.triton_available():
        assert code == 2 and "not a gpu_suite report" in capsys.readouterr().err
    else:
        assert code == 2
