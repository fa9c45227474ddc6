"""The shared int-group core: its unpackers read what the formats' packers (written in the
tests from the public descriptions) wrote, its packer inverts its unpacker, and dequantize
applies zero points and scales per group (in order, per channel, or by row group)."""

from __future__ import annotations

import pytest
import torch
from int_group_checkpoints import pack_along_cols, pack_along_rows, unpack_along_rows

from pagedllm.layers.quantization.kernels.int_group import (
    dequantize,
    pack_int32,
    pack_internal,
    to_internal_words,
    unpack_int32,
    unpack_internal,
)


@pytest.mark.parametrize("bits", [4, 8])
def test_unpack_reads_the_sequential_packing_along_either_dim(bits):
    values = torch.randint(0, 2**bits, (32, 24))
    assert torch.equal(unpack_int32(pack_along_rows(values, bits), bits, dim=0).long(), values)
    assert torch.equal(unpack_int32(pack_along_cols(values, bits), bits, dim=1).long(), values)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_inverts_unpack_including_the_sign_bit(bits):
    values = torch.full((16, 3), 2**bits - 1)  # every bit set: words are negative int32
    packed = pack_int32(values, bits, dim=0)
    assert packed.dtype == torch.int32 and bool((packed < 0).all())
    assert torch.equal(unpack_along_rows(packed, bits), values)
    assert torch.equal(unpack_int32(packed, bits, dim=0).long(), values)


def test_internal_int4_words_interleave_rows_by_half_word():
    """Rows 2s and 2s + 1 of a word sit at bits 4s and 16 + 4s (the GPU kernel's pairs)."""
    rows = torch.arange(8).reshape(8, 1)  # row r holds the value r
    word = pack_internal(rows, 4).item() & 0xFFFFFFFF
    assert [(word >> (4 * s)) & 0xF for s in range(4)] == [0, 2, 4, 6]
    assert [(word >> (16 + 4 * s)) & 0xF for s in range(4)] == [1, 3, 5, 7]


@pytest.mark.parametrize("bits", [4, 8])
def test_internal_layout_round_trips_and_converts_in_order_words(bits):
    values = torch.randint(0, 2**bits, (64, 24))
    values[:, 0] = 2**bits - 1  # every bit set: negative words
    assert torch.equal(unpack_internal(pack_internal(values, bits), bits).long(), values)
    assert torch.equal(to_internal_words(pack_int32(values, bits, 0), bits), pack_internal(values, bits))


@pytest.mark.parametrize("group_size", [8, -1])
def test_dequantize_applies_each_groups_zero_and_scale(group_size):
    q = torch.randint(0, 16, (16, 4))
    groups = 1 if group_size == -1 else 2
    scales, zeros = torch.rand(groups, 4), torch.randint(0, 16, (groups, 4)).float()
    row_groups = torch.zeros(16, dtype=torch.long) if group_size == -1 else torch.arange(16) // 8
    expected = (q.float() - zeros[row_groups]) * scales[row_groups]
    torch.testing.assert_close(dequantize(pack_internal(q, 4), scales, zeros, 4, group_size), expected)


def test_dequantize_with_row_groups_reads_each_rows_group():
    q = torch.randint(0, 16, (8, 2))
    scales, zeros = torch.rand(3, 2), torch.randint(0, 16, (3, 2)).float()
    row_group = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0], dtype=torch.int32)
    expected = (q.float() - zeros[row_group.long()]) * scales[row_group.long()]
    torch.testing.assert_close(dequantize(pack_internal(q, 4), scales, zeros, 4, 4, row_group), expected)
