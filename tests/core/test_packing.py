import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxquant.core import packing


@given(
    bits=st.sampled_from([2, 3, 4, 5, 6, 7, 8]),
    n=st.integers(1, 100),
    cols=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_roundtrip(bits, n, cols, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(n, cols), dtype=np.uint8)
    packed = packing.pack(codes, bits)
    assert packed.shape[0] == packing.packed_rows(n, bits)
    np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits, n)), codes)


@pytest.mark.parametrize(
    ("bits", "dtype", "rows"), [(8, np.uint8, 64), (4, np.uint8, 32), (2, np.uint8, 16), (3, np.uint32, 6)]
)
def test_packed_sizes(bits, dtype, rows):
    packed = packing.pack(np.zeros((64, 5), np.uint8), bits)
    assert packed.dtype == dtype and packed.shape == (rows, 5)
    # 3-bit: 32 values in 3 uint32 words = exactly 3 bits each
    assert packing.bits_storage(64, bits) * 8 == 64 * bits


def test_nibble_order_low_first():
    packed = np.asarray(packing.pack(np.array([1, 2, 3, 4], np.uint8), 4))
    np.testing.assert_array_equal(packed, [0x21, 0x43])
    packed2 = np.asarray(packing.pack(np.array([1, 2, 3, 0], np.uint8), 2))
    np.testing.assert_array_equal(packed2, [1 | 2 << 2 | 3 << 4])


def test_three_bit_dense_layout():
    # 32 codes of value 7 fill exactly 96 bits
    packed = np.asarray(packing.pack(np.full((32,), 7, np.uint8), 3))
    np.testing.assert_array_equal(packed, [0xFFFFFFFF] * 3)
    codes = np.zeros(32, np.uint8)
    codes[10] = 5  # bits 30..32 cross the word boundary: 0b101 -> bit 30 set in word 0, bit 0 set in word 1
    packed = np.asarray(packing.pack(codes, 3))
    np.testing.assert_array_equal(packed, [1 << 30, 1, 0])


@given(n=st.integers(1, 60), seed=st.integers(0, 2**31 - 1))
def test_trits_roundtrip(n, seed):
    t = np.random.default_rng(seed).integers(0, 3, size=(n,), dtype=np.uint8)
    packed = np.asarray(packing.pack_trits(t))
    assert packed.shape == (packing.trit_rows(n),) and packed.max() < 243
    np.testing.assert_array_equal(np.asarray(packing.unpack_trits(packed, n)), t)


def test_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        packing.pack(np.zeros(4, np.uint8), 9)
