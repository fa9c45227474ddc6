"""The one internal layout of group-quantized integer weights (GPTQ, AWQ, compressed-tensors
W4A16/W8A16), its unpacking helpers, and the reference matmul that reads it.

Every format is repacked after loading into this layout, so one reference path (CPU) and one
Triton kernel (CUDA) serve all of them:

  qweight   int32 [K / pack, N]   `pack = 32 // bits` unsigned values per int32 along the input
                                  dimension K. 8 bits: row i of a word in bits [8i, 8i + 8).
                                  4 bits, interleaved: rows 0, 2, 4, 6 in the low half-word and
                                  1, 3, 5, 7 in the high one, row i in nibble INT4_SLOTS[i], so
                                  that rows 2s and 2s + 1 sit at bits 4s and 16 + 4s, where one
                                  bitwise op makes them a pair of 16-bit floats (int4_dot.py)
  scales    [G, N]                the engine's dtype
  zeros     [G, N]                the engine's dtype: zero points as unsigned integers stored
                                  in float (symmetric schemes hold 2**(bits-1))
  perm      int32 [P, K]          (act-order only) input order that makes each part's groups
                                  contiguous; part p covers output columns of fused part p
  row_group int32 [P, K]          (act-order only) group of each permuted input row

(`pack_internal` / `unpack_internal`), so that
W[k, n] = (q[k, n] - zeros[g(k), n]) * scales[g(k), n] with g(k) = k // group_size, or with
act order: x @ W = x[:, perm] @ W_permuted with g = row_group. Quantization rounds the
weights only: the matmul itself runs in the engine's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (4, 8)

# AWQ's GEMM packing puts logical column order[i] into nibble i of each int32.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# The internal 4-bit layout's nibble of row i of a word (the inverse of AWQ's order).
INT4_SLOTS = (0, 4, 1, 5, 2, 6, 3, 7)


def pack_factor(bits: int) -> int:
    return 32 // bits


def check_bits(bits: int, option: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{option}={bits} is not supported; use one of {SUPPORTED_BITS}.")


def tiles_k(k: int, group_size: int, block_k: int) -> bool:
    """Whether BLOCK_K-row tiles tile K and every group (group_size -1: one group), as the
    unmasked int4 kernels need."""
    return k % block_k == 0 and (group_size == -1 or group_size % block_k == 0)


def kernel_group_size(group_size: int, k: int, block_k: int) -> int:
    """The group size a kernel divides row indices by: one group (-1) becomes a size past K,
    so that every BLOCK_K tile reads group 0."""
    return group_size if group_size != -1 else k + block_k


def whole_k_tile(k: int, group_size: int, largest: int) -> int:
    """The largest power-of-two K tile up to `largest` (a power of two) that tiles K and every
    group."""
    block_k = largest
    while not tiles_k(k, group_size, block_k):
        block_k //= 2
    return block_k


def fits_int4_16bit_kernels(k: int, bits: int, group_size: int, act_order: bool, dtype: torch.dtype) -> bool:
    """Whether int4_half2.py / int4_dot.py can serve a layer: 4 bits, no act order, bf16/fp16
    activations, K and the groups made of whole 16-row tiles (those kernels do not mask K)."""
    return bits == 4 and not act_order and dtype in (torch.bfloat16, torch.float16) and tiles_k(k, group_size, 16)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned values of `packed` (int32) unpacked along `dim` (value i of a word at bits
    i*bits), as int32, `dim` growing by 32 // bits."""
    pack = pack_factor(bits)
    shifts = torch.arange(pack, device=packed.device, dtype=torch.int32) * bits
    moved = packed.movedim(dim, -1)
    values = (moved.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(*moved.shape[:-1], moved.shape[-1] * pack).movedim(-1, dim)


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `unpack_int32`: unsigned values packed into int32 along `dim`."""
    pack = pack_factor(bits)
    moved = values.to(torch.int64).movedim(dim, -1)
    if moved.shape[-1] % pack:
        raise ValueError(f"Cannot pack {moved.shape[-1]} values into int32 words of {pack}.")
    grouped = moved.reshape(*moved.shape[:-1], moved.shape[-1] // pack, pack)
    shifts = torch.arange(pack, device=values.device, dtype=torch.int64) * bits
    words = ((grouped & ((1 << bits) - 1)) << shifts).sum(-1)
    # Words above 2**31 wrap to negative int32, as the formats store them.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def _move_nibbles(words: torch.Tensor, slots: tuple[int, ...]) -> torch.Tensor:
    """int32 words with nibble i moved to nibble slots[i] (in int64, so that no shift overflows)."""
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    moved = torch.zeros_like(unsigned)
    for nibble, slot in enumerate(slots):
        moved |= ((unsigned >> (4 * nibble)) & 0xF) << (4 * slot)
    return torch.where(moved >= 2**31, moved - 2**32, moved).to(torch.int32)


def pack_internal(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [K, N] as the internal layout's qweight [K / pack, N]."""
    return to_internal_words(pack_int32(values, bits, dim=0), bits)


def to_internal_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Words packed in order along K (row i at bits [i*bits, (i+1)*bits), as GPTQ and
    compressed-tensors store them) as the internal layout's words."""
    return _move_nibbles(words, INT4_SLOTS) if bits == 4 else words


def unpack_internal(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_internal`: the unsigned values [K, N] as int32."""
    if bits == 4:
        qweight = _move_nibbles(qweight, tuple(INT4_SLOTS.index(nibble) for nibble in range(8)))
    return unpack_int32(qweight, bits, dim=0)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM int32 [rows, cols/8] -> unsigned 4-bit values [rows, cols] in logical order."""
    nibbles = unpack_int32(packed, 4, dim=1)
    rows, cols = nibbles.shape
    # Nibble i of a word holds column AWQ_PACK_ORDER[i]: scatter them back to their columns.
    order = torch.tensor(AWQ_PACK_ORDER, device=packed.device)
    logical = torch.empty_like(nibbles).view(rows, cols // 8, 8)
    logical[:, :, order] = nibbles.view(rows, cols // 8, 8)
    return logical.view(rows, cols)


@dataclass(frozen=True)
class IntGroupScheme:
    """What one layer's internal layout holds: bits, group size along K (-1: one group) and
    whether rows are permuted (act order)."""

    bits: int
    group_size: int
    act_order: bool

    @property
    def pack_factor(self) -> int:
        return pack_factor(self.bits)

    def num_groups(self, input_size: int) -> int:
        return 1 if self.group_size == -1 else -(-input_size // self.group_size)


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
    group_size: int, row_group: torch.Tensor | None = None,
) -> torch.Tensor:
    """The [K, N] weight of the internal layout in the scales' dtype (rows in stored order)."""
    values = unpack_internal(qweight, bits)
    num_rows = values.shape[0]
    if row_group is not None:
        groups = row_group.long()
    elif group_size == -1:
        groups = torch.zeros(num_rows, dtype=torch.long, device=values.device)
    else:
        groups = torch.arange(num_rows, device=values.device) // group_size
    return (values.to(scales.dtype) - zeros[groups]) * scales[groups]


def reference_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bits: int, group_size: int, perm: torch.Tensor | None = None,
    row_group: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W` for one part of the internal layout: dequantize, then a plain matmul."""
    weight = dequantize(qweight, scales, zeros, bits, group_size, row_group)
    if perm is not None:
        x = x.index_select(-1, perm.long())
    return torch.matmul(x.to(weight.dtype), weight)
