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


def test_loop_profile_without_loop_is_an_error():
    with pytest.raises(ValueError, match="no backward branch"):
        tt.loop_profile("        /*0000*/                   EXIT ;\n")
