"""Bit packing: LSB-first, rows padded to whole bytes, exactly numpy's packbits(bitorder='little')."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltahub.codecs._bits import pack_bits, packed_cols, unpack_bits, unpack_signs


def _numpy_reference(bits: np.ndarray) -> np.ndarray:
    rows, cols = bits.shape
    padded = np.zeros((rows, packed_cols(cols) * 8), dtype=bool)
    padded[:, :cols] = bits
    return np.packbits(padded, axis=1, bitorder="little").reshape(rows, packed_cols(cols))


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(0, 9), cols=st.integers(0, 70), seed=st.integers(0, 2**31 - 1), p=st.floats(0, 1))
def test_pack_matches_numpy_and_round_trips(rows: int, cols: int, seed: int, p: float) -> None:
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(rows, cols, generator=g) < p
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (rows, packed_cols(cols))
    assert np.array_equal(packed.numpy(), _numpy_reference(bits.numpy()))
    assert torch.equal(unpack_bits(packed, cols), bits)


def test_bit_order_is_lsb_first_and_padding_is_zero() -> None:
    bits = torch.tensor([[True, False, False, False, False, False, False, False, False, True]])
    assert pack_bits(bits).tolist() == [[0x01, 0x02]]
    assert pack_bits(torch.ones(1, 3, dtype=torch.bool)).tolist() == [[0b111]]


def test_unpack_signs_is_exactly_plus_minus_scale() -> None:
    bits = torch.tensor([[True, False, True], [False, False, True]])
    scale = torch.tensor([[0.3], [2.0]])
    out = unpack_signs(pack_bits(bits), 3, scale)
    assert torch.equal(out, torch.tensor([[0.3, -0.3, 0.3], [-2.0, -2.0, 2.0]]))


def test_unpack_rejects_wrong_width() -> None:
    import pytest

    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(2, 1, dtype=torch.uint8), 9)
