"""The host side of the GEMV epilogues (ops/epilogue.py): the contiguity hint each kernel is
given must hold for every tile (else its vectorized loads would read wrong columns), and bad
shapes are refused with the values that would work. The kernels themselves: test_gemv.py and
quantization/test_int4_triton_kernel.py."""

from __future__ import annotations

import pytest
import torch

from pagedllm.layers.ops.epilogue import RopeEpilogue, SiluAndMulEpilogue, check_epilogue, contiguous_run


def _gate_up_columns(tile: int, block_n: int, out_features: int) -> list[int]:
    half = block_n // 2
    outs = [tile * half + j for j in range(half)]
    return outs + [out_features // 2 + c for c in outs]


def _rope_pair_columns(tile: int, block_n: int, head: int) -> list[int]:
    pairs = block_n // 2
    firsts = [(p // (head // 2)) * head + p % (head // 2) for p in range(tile * pairs, (tile + 1) * pairs)]
    return firsts + [c + head // 2 for c in firsts]


def _holds(columns: list[int], run: int) -> bool:
    """Every aligned group of `run` tile positions holds consecutive columns starting at a
    multiple of `run`."""
    return all(columns[i] % run == 0 and columns[i:i + run] == list(range(columns[i], columns[i] + run))
               for i in range(0, len(columns), run))


@pytest.mark.parametrize("block_n", [8, 16, 64, 256])
@pytest.mark.parametrize("out_features", [2 * 14336, 2 * 1000, 2 * 24])
def test_gate_up_tiles_keep_the_contiguity_they_claim(block_n: int, out_features: int) -> None:
    run = contiguous_run(SiluAndMulEpilogue(), block_n, out_features)
    assert run >= 1 and (out_features // 2) % run == 0
    for tile in range(3):
        assert _holds(_gate_up_columns(tile, block_n, out_features), run)
    if out_features == 2 * 14336:
        assert run == block_n // 2


@pytest.mark.parametrize("block_n", [8, 16, 64, 256])
@pytest.mark.parametrize("head", [128, 64, 96])
def test_rope_tiles_keep_the_contiguity_they_claim(block_n: int, head: int) -> None:
    epilogue = RopeEpilogue(torch.zeros(1, dtype=torch.long), torch.zeros(4, head // 2), torch.zeros(4, head // 2),
                            head, 2 * head)
    run = contiguous_run(epilogue, block_n, 4 * head)
    for tile in range(4):
        assert _holds(_rope_pair_columns(tile, block_n, head), run)
    assert run == min(block_n // 2, head // 2) or head == 96


def test_bad_epilogue_shapes_are_refused_with_what_fits() -> None:
    tables = torch.zeros(8, 64)
    with pytest.raises(ValueError, match="whole heads"):
        check_epilogue(RopeEpilogue(torch.zeros(1, dtype=torch.long), tables, tables, 128, 96), 1, 640, 8)
    with pytest.raises(ValueError, match="one position per row"):
        check_epilogue(RopeEpilogue(torch.zeros(2, dtype=torch.long), tables, tables, 128, 256), 1, 640, 8)
    with pytest.raises(ValueError, match="even block_n"):
        check_epilogue(SiluAndMulEpilogue(), 1, 640, 7)
