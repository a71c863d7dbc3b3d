"""The SASS loop profiler of ``pallas_kernels._triton_tools`` on hand-written nvdisasm-style text."""

from __future__ import annotations

import pytest

from pallas_kernels import _triton_tools as tt

SASS = """
kernel:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   LDS.U8 R4, [R3] ;
        /*0040*/                   I2F.BF16 R5, R4 ;
        /*0050*/                   I2F.BF16 R6, R4 ;
        /*0060*/              @!P1 HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0070*/                   ISETP.GE.AND P0, PT, R2, 0x4, PT ;
        /*0080*/               @P0 BRA `(.L_x_1) ;
        /*0090*/                   EXIT ;
.L_x_2:
        /*00a0*/                   BRA `(.L_x_2);
"""


def test_loop_profile_takes_the_longest_backward_loop():
    p = tt.loop_profile(SASS)
    assert p.instructions == 6  # LDS, 2x I2F, HMMA, ISETP, BRA; not the 2-line loop nor the self-branch
    assert p.counts["I2F.BF16"] == 2
    assert p.count("I2F") == 2 and p.count("HMMA") == 1 and p.count("LDS") == 1
    assert p.count("IADD3") == 0  # in the other loop
    assert p.count("I2") == 0  # prefixes match whole opcode names only


def test_loop_profile_finds_loads_used_in_the_same_trip():
    """An ``LDG`` read later in the trip is exposed (also through a 64-bit pair or a 128-bit store); a prefetch read
    only before it (by the next trip), an overwritten register and the pipeline's ``LDGSTS`` are not."""
    text = (
        ".L_x_3:\n"
        "        /*0100*/                   HADD2.F32 R14, -RZ, R9.H1_H1 ;\n"
        "        /*0110*/                   LDGSTS.E.64 [R3], desc[UR4][R4.64] ;\n"
        "        /*0120*/                   LDGDEPBAR ;\n"
        "        /*0130*/                   LDG.E.U8 R5, desc[UR4][R6.64] ;\n"
        "        /*0140*/              @!P0 LDG.E.128 R8, desc[UR4][R6.64] ;\n"
        "        /*0150*/                   LDG.E R20, desc[UR4][R6.64] ;\n"
        "        /*0160*/                   LDG.E R22, desc[UR4][R6.64] ;\n"
        "        /*0170*/                   LDG.E R31, desc[UR4][R6.64] ;\n"
        "        /*0180*/                   MOV R20, R1 ;\n"
        "        /*0190*/                   STS.U8 [R3], R5 ;\n"
        "        /*01a0*/                   IADD3 R7, R20, R1, RZ ;\n"
        "        /*01b0*/                   DADD R40, R21.64, R40.64 ;\n"
        "        /*01c0*/                   STS.128 [R3], R28 ;\n"
        "        /*01d0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;\n"
        "        /*01e0*/               @P1 BRA `(.L_x_3) ;\n"
    )
    p = tt.loop_profile(text)
    assert p.instructions == 15
    # R5 (STS data), R22 (via the pair R21.64), R31 (in STS.128's R28..R31); not R8 (prefetch), R20 (overwritten)
    assert p.exposed_loads == 3
    assert p.barriers == 1 and p.count("LDG") == 5
    assert tt.loop_profile(SASS).exposed_loads == 0 and tt.loop_profile(SASS).barriers == 0


def test_loop_profile_without_loop_is_an_error():
    with pytest.raises(ValueError, match="no backward branch"):
        tt.loop_profile("        /*0000*/                   EXIT ;\n")


UNROLLED = """
        /*0000*/                   LDSM.16.M88.4 R4, [R3] ;
        /*0010*/                   IMMA.16832.S8.S8.SAT R8, R4.ROW, R6.COL, R8 ;
        /*0020*/                   LDSM.16.M88.4 R4, [R3+0x100] ;
        /*0030*/                   IMMA.16832.S8.S8.SAT R8, R4.ROW, R6.COL, R8 ;
.L_x_5:
        /*0040*/                   LDG.E.U8 R5, desc[UR4][R6.64] ;
        /*0050*/                   I2F.S8 R5, R5 ;
        /*0060*/                   HMMA.1684.F32.TF32 R12, R4, R5, R12 ;
        /*0070*/               @P0 BRA `(.L_x_5) ;
        /*0080*/                   EXIT ;
"""


def test_k_loop_profile_picks_the_dot_loop_or_divides_an_unrolled_kernel():
    """The K loop is the loop holding the dot's tensor-core opcode, not the longest loop (here a float32 outlier
    loop); a fully unrolled K loop is the whole kernel over its trips; a kernel without tensor cores (a GEMV) is
    profiled by its longest loop."""
    p = tt.k_loop_profile(UNROLLED, trips=2, mma=("IMMA", "IGMMA"))
    assert p.unrolled and p.count("IMMA") == 1 and p.count("LDSM") == 1
    assert p.instructions == 5  # the kernel's 9 instructions (EXIT and the other loop too) over 2 trips, half up
    looped = UNROLLED.replace("HMMA.1684.F32.TF32", "IMMA.16832.S8.S8.SAT")
    q = tt.k_loop_profile(looped, trips=2, mma=("IMMA",))
    assert not q.unrolled and q.instructions == 4 and q.exposed_loads == 1
    assert tt.k_loop_profile(SASS, trips=4, mma=("QGMMA",)).instructions == 6  # no such opcode: the longest loop
    assert tt.k_loop_profile(SASS, trips=4).count("HMMA") == 1  # any tensor-core opcode by default
    with pytest.raises(ValueError, match="trips"):
        tt.k_loop_profile(SASS, trips=0)


def test_occupancy_takes_the_binding_limit():
    # 104 registers x 128 threads: 4 blocks of 4 warps fit the 64 K registers (the H200 int4 table row's kernel)
    assert tt.occupancy(104, 24832, 4, 90) == (4, "registers")
    assert tt.occupancy(88, 16384, 4, 90) == (5, "registers")  # its split+postscale form: 88 registers
    # registers round up to a multiple of 8 per thread: 97..104 all cost 104
    assert tt.occupancy(97, 0, 4, 90) == tt.occupancy(104, 0, 4, 90)
    assert tt.occupancy(32, 100 * 1024, 4, 90) == (2, "shared memory")  # 228 KiB / (100 + 1 KiB reserved)
    assert tt.occupancy(32, 100 * 1024, 4, 80) == (1, "shared memory")  # 164 KiB on an A100
    assert tt.occupancy(16, 0, 1, 90) == (32, "blocks")
    assert tt.occupancy(24, 0, 16, 90) == (4, "threads")  # 2048 threads / 512
    assert tt.occupancy(24, 0, 16, 86) == (3, "threads")  # 1536 on sm_86
    assert tt.occupancy(255, 0, 8, 90)[0] == 1
    assert tt.occupancy(32, 300 * 1024, 4, 90) == (0, "shared memory")  # does not fit at all
    with pytest.raises(ValueError, match="sm_75"):
        tt.occupancy(32, 0, 4, 75)
    with pytest.raises(ValueError, match="bad kernel resources"):
        tt.occupancy(0, 0, 4, 90)
