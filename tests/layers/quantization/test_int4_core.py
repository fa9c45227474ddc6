"""The shared int-group core: its unpackers read what the formats' packers (written in the
tests from the public descriptions) wrote, its packer inverts its unpacker, and dequantize
applies zero points and scales per group (in order, per channel, or by row group)."""

from __future__ import annotations

import pytest
import torch
from int_group_checkpoints import pack_along_cols, pack_along_rows, unpack_along_rows

from pagedllm.layers.quantization.kernels.int_group import dequantize, pack_int32, unpack_int32


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


@pytest.mark.parametrize("group_size", [8, -1])
def test_dequantize_applies_each_groups_zero_and_scale(group_size):
    q = torch.randint(0, 16, (16, 4))
    groups = 1 if group_size == -1 else 2
    scales, zeros = torch.rand(groups, 4), torch.randint(0, 16, (groups, 4)).float()
    row_groups = torch.zeros(16, dtype=torch.long) if group_size == -1 else torch.arange(16) // 8
    expected = (q.float() - zeros[row_groups]) * scales[row_groups]
    torch.testing.assert_close(dequantize(pack_int32(q, 4, 0), scales, zeros, 4, group_size), expected)


def test_dequantize_with_row_groups_reads_each_rows_group():
    q = torch.randint(0, 16, (8, 2))
    scales, zeros = torch.rand(3, 2), torch.randint(0, 16, (3, 2)).float()
    row_group = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0], dtype=torch.int32)
    expected = (q.float() - zeros[row_group.long()]) * scales[row_group.long()]
    torch.testing.assert_close(dequantize(pack_int32(q, 4, 0), scales, zeros, 4, 4, row_group), expected)
