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
