"""What a decode GEMV does to its sums besides storing them: the elementwise op that would
otherwise follow it as a launch of its own (ops/gemv.py, quantization/kernels/int4_half2.py).
This module says which (importable without Triton, for the layers); ops/epilogue_kernels.py
does it.

- SiLU-and-mul after a gate_up projection: each output tile holds half gate and half up
  outputs (`gate_up_columns`), so the tile's epilogue writes silu(gate) * up.
- Rope after a qkv projection: each tile holds pairs of features (i, i + head_size / 2) of the
  same heads (`rope_pair_columns`), so the epilogue rotates the q and k heads and leaves v.

Each rounds the sums to the output dtype first and then computes as the unfused kernel does
(silu_and_mul.py, rotary.py): SiLU-and-mul gives the same bits; rope too, except where the
compiler fuses one product of a pair with the add differently (one rounding apart; 89% of
Llama's q and k identical on the H200). At batch 1 each saves a ~2 µs launch and the gap
before it per layer (BENCHMARKS.md, eleventh run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The kernels' EPILOGUE constexpr (the Triton side: ops/epilogue_kernels.py).
EPILOGUE_NONE, EPILOGUE_SILU_AND_MUL, EPILOGUE_ROPE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class SiluAndMulEpilogue:
    """The weight stacks gate and up matrices of N / 2 outputs each; the result is
    silu(x @ gate.T) * (x @ up.T), [M, N / 2]."""


@dataclass(frozen=True, slots=True)
class RopeEpilogue:
    """The weight's outputs are heads of `head_size` features; those of the first
    `rotated_columns` outputs (q and k heads) are rotated by neox rope at each row's position
    (layers/rotary_embedding.py's tables, rotary_dim == head_size)."""

    positions: torch.Tensor
    """[M] int: row m's position."""
    cos_cache: torch.Tensor
    """[max_position, head_size / 2]."""
    sin_cache: torch.Tensor
    head_size: int
    rotated_columns: int


Epilogue = SiluAndMulEpilogue | RopeEpilogue


def epilogue_code(epilogue: Epilogue | None) -> int:
    if epilogue is None:
        return EPILOGUE_NONE
    return EPILOGUE_SILU_AND_MUL if isinstance(epilogue, SiluAndMulEpilogue) else EPILOGUE_ROPE


def check_epilogue(epilogue: Epilogue | None, num_rows: int, out_features: int, block_n: int) -> None:
    """ValueError where the launch cannot take `epilogue` (odd tiles, heads that do not tile N)."""
    if epilogue is None:
        return
    if block_n % 2 or out_features % 2:
        raise ValueError(f"a GEMV epilogue needs an even block_n and output count; got {block_n}, {out_features}.")
    if isinstance(epilogue, RopeEpilogue):
        head = epilogue.head_size
        if head % 2 or out_features % head or epilogue.rotated_columns % head or epilogue.rotated_columns > out_features:
            raise ValueError(
                f"rope in the GEMV needs {out_features} outputs of whole heads of an even head_size={head}, "
                f"the first rotated_columns={epilogue.rotated_columns} of them whole heads."
            )
        if epilogue.positions.shape != (num_rows,) or epilogue.cos_cache.shape[-1] != head // 2:
            raise ValueError(
                f"rope in the GEMV needs one position per row ({num_rows}) and cos/sin tables of {head // 2} "
                f"columns; got positions {tuple(epilogue.positions.shape)}, tables {tuple(epilogue.cos_cache.shape)}."
            )


def contiguous_run(epilogue: Epilogue | None, block_n: int, out_features: int) -> int:
    """How many consecutive, equally aligned output indices the epilogue's tiles hold (the
    kernels' EPILOGUE_RUN: a hint that keeps their loads along N vectorized): the largest
    power of two dividing half a tile and where the second half starts (N / 2 for gate and
    up, half a head for rope)."""
    if epilogue is None:
        return 1
    second_half = out_features // 2 if isinstance(epilogue, SiluAndMulEpilogue) else epilogue.head_size // 2
    run = block_n // 2
    while run > 1 and second_half % run:
        run //= 2
    return max(run, 1)


@dataclass(frozen=True, slots=True)
class EpilogueLaunch:
    """What a GEMV launch passes for its epilogue (the kernels of ops/gemv.py and int4_half2.py
    take the same arguments)."""

    out_features: int
    """The output's width: the weight's, or half of it for SiLU-and-mul."""
    rope_args: tuple
    """positions, cos, sin, stride_cos, rotated_columns (placeholders, never read, without rope)."""
    constexprs: dict[str, int]
    """EPILOGUE, ROPE_HALF, EPILOGUE_RUN."""


def plan_epilogue(epilogue: Epilogue | None, num_rows: int, out_features: int, block_n: int,
                  placeholder: torch.Tensor) -> EpilogueLaunch:
    """The launch arguments for `epilogue` on a GEMV of num_rows x out_features in tiles of
    block_n columns; ValueError where the shapes cannot take it (check_epilogue)."""
    check_epilogue(epilogue, num_rows, out_features, block_n)
    code = epilogue_code(epilogue)
    rope_args = (placeholder, placeholder, placeholder, 0, 0)
    rope_half = 1
    if isinstance(epilogue, RopeEpilogue):
        tables = epilogue.cos_cache
        rope_args = (epilogue.positions, tables, epilogue.sin_cache, tables.stride(0), epilogue.rotated_columns)
        rope_half = epilogue.head_size // 2
    return EpilogueLaunch(
        out_features=out_features // 2 if code == EPILOGUE_SILU_AND_MUL else out_features,
        rope_args=rope_args,
        constexprs={"EPILOGUE": code, "ROPE_HALF": rope_half,
                    "EPILOGUE_RUN": contiguous_run(epilogue, block_n, out_features)},
    )
