"""Decode-sized int4 weight-only matmul (2-16 rows, bf16/fp16 activations) on tensor cores.

The FMA kernels (triton_wNa16.py) make every 4-bit value a float32 of its own: about 7.5
instructions per value in the one-row GEMV's SASS. This kernel spends 2.6-4.4
(`benchmarks/int4_sass.py --kernel dot`, sm_90):

- The internal layout interleaves each word's nibbles (kernels/int_group.py): the low and
  high half-words hold rows 0, 2, 4, 6 and 1, 3, 5, 7. One LOP3 ORs the nibbles at bits
  4s and 16 + 4s into the mantissas of a 16-bit pair of 128.0 (bf16) or 1024.0 (fp16),
  giving 128 + q for rows 2s and 2s + 1 at once, and one packed add subtracts 128 + zero
  from both: the exact integers q - zero, two values per two instructions.
- The tile of q - zero, transposed ([N, K]), is the A operand of a tensor-core dot whose B
  is x padded to 16 rows.
- Each K tile lies inside one group: its float32 dot is scaled by the group's scales once.

So the sums are x @ (q - zero) exactly in float32, times the scale: the weights are never
rounded to 16 bits (the reference rounds (q - zero) * scale; the difference is within the
16-bit rounding the tests allow).

Measured on an H200 (BENCHMARKS.md, seventh run) it is not faster than the FMA GEMV at one
row (16-24% of the copy bandwidth against 21-36%): ncu shows the FMA GEMV bound by
instruction issue but this kernel by shared memory, through which Triton moves the unpacked
16-bit tile into the dot's operand layout. At 2-16 rows it beats the FMA GEMM by 2-14%, so it
serves those; one row goes to int4_half2.py (packed fp16 FMAs, no tensor-core tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.layers.ops import INTERPRETED
from pagedllm.layers.ops.pdl import allow_next_kernel, pdl_launch_options, wait_for_previous_kernel
from pagedllm.layers.ops.split_k import finish_splits, k_tile_range, split_for, split_outputs, store_or_merge
from pagedllm.layers.quantization.kernels.int_group import (
    fits_int4_16bit_kernels,
    kernel_group_size,
    tiles_k,
    whole_k_tile,
)

MIN_DOT_ROWS, MAX_DOT_ROWS = 2, 16

# 16-bit pairs of the magic base (128.0 in bf16, 1024.0 in fp16): a 4-bit q ORed into the
# low mantissa bits reads as base + q.
_BF16_BASE, _FP16_BASE = 0x43004300, 0x64006400


def _unpack_asm(base: int, add: str) -> str:
    """PTX for one word ($8) and its column's -(base + zero) pair ($9): rows 2s and 2s + 1 are
    the nibbles at bits 4s and 16 + 4s; LOP3 (a & b) | c is table 0xEA."""
    lines = ["mov.b32 one, 0x3F803F80;"] if "fma" in add else []
    lines += [f"shr.u32 s{shift}, $8, {4 * shift};" for shift in (1, 2, 3)]
    lines += [f"lop3.b32 t{pair}, {'$8' if pair == 0 else f's{pair}'}, 0x000F000F, {base:#x}, 0xEA;" for pair in range(4)]
    operands = "one, $9" if "fma" in add else "$9"
    lines += [f"{add} t{pair}, t{pair}, {operands};" for pair in range(4)]
    lines += [f"mov.b32 {{${2 * pair}, ${2 * pair + 1}}}, t{pair};" for pair in range(4)]
    return "{\n.reg .b32 t0, t1, t2, t3, s1, s2, s3, one;\n" + "\n".join(lines) + "\n}"


_UNPACK_BF16_ASM = tl.constexpr(_unpack_asm(_BF16_BASE, "fma.rn.bf16x2"))
_UNPACK_FP16_ASM = tl.constexpr(_unpack_asm(_FP16_BASE, "add.rn.f16x2"))


@triton.jit
def _pair_bias(zero, BASE: tl.constexpr):
    """-(base + zero) as a 16-bit pair in an int32, per column (exact: integers below 2**11)."""
    if BASE == 0x43004300:
        half = (-(zero.to(tl.float32) + 128.0)).to(tl.bfloat16).to(tl.int16, bitcast=True)
    else:
        half = (-(zero.to(tl.float32) + 1024.0)).to(tl.float16).to(tl.int16, bitcast=True)
    low = half.to(tl.int32) & 0xFFFF
    return low | (low << 16)


@triton.jit
def _unpack_interleaved(words, zero, BASE: tl.constexpr, DTYPE: tl.constexpr, INTERP: tl.constexpr):
    """The eight values q - zero of each interleaved word [BLOCK_N, WORDS] as DTYPE tensors of
    its shape, in row order 0..7; `zero` [BLOCK_N] per column. Under the interpreter, which
    has no inline assembly and whose 16-bit dots read raw bits, float32 tensors of the same
    exact integers."""
    if INTERP:
        zero = zero.to(tl.float32)[:, None]
        v0 = (words & 0xF).to(tl.float32) - zero
        v1 = ((words >> 16) & 0xF).to(tl.float32) - zero
        v2 = ((words >> 4) & 0xF).to(tl.float32) - zero
        v3 = ((words >> 20) & 0xF).to(tl.float32) - zero
        v4 = ((words >> 8) & 0xF).to(tl.float32) - zero
        v5 = ((words >> 24) & 0xF).to(tl.float32) - zero
        v6 = ((words >> 12) & 0xF).to(tl.float32) - zero
        v7 = ((words >> 28) & 0xF).to(tl.float32) - zero
    else:
        bias = tl.broadcast_to(_pair_bias(zero, BASE)[:, None], words.shape)
        if BASE == 0x43004300:
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                _UNPACK_BF16_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [words, bias],
                dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        else:
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                _UNPACK_FP16_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [words, bias],
                dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def _int4_dot_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, workspace_ptr, count_ptr,
    M, N, K, group_size,
    stride_xm, stride_qk, stride_sg, stride_zg, stride_om,
    BASE: tl.constexpr, SPLIT_K: tl.constexpr, SELF_MERGE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, INTERP: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """out [M, N] = x [M, K] @ W for M <= 16, W in the interleaved int4 layout with uniform
    groups (each BLOCK_K tile inside one). Grid (cdiv(N, BLOCK_N), SPLIT_K); column strides 1.
    Split K: workspace [SPLIT_K, M, N] float32 and count_ptr as in ops/split_k.py."""
    wait_for_previous_kernel(USE_PDL)
    WORDS: tl.constexpr = BLOCK_K // 8
    BLOCK_M: tl.constexpr = 16
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    offs_words = tl.arange(0, WORDS)

    tile_start, tile_end = k_tile_range(K, BLOCK_K, SPLIT_K, pid_k)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for tile in tl.range(tile_start, tile_end, num_stages=NUM_STAGES):
        group = (tile * BLOCK_K) // group_size
        zero = tl.load(zeros_ptr + group * stride_zg + offs_n, mask=mask_n, other=0.0)
        scale = tl.load(scales_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        word_rows = tile * WORDS + offs_words
        # [BLOCK_N, WORDS]: the weight transposed, so that it is the dot's A operand.
        words = tl.load(qweight_ptr + word_rows[None, :] * stride_qk + offs_n[:, None],
                        mask=mask_n[:, None], other=0)
        offs_k = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None], mask=mask_m[None, :], other=0.0)
        v0, v1, v2, v3, v4, v5, v6, v7 = _unpack_interleaved(words, zero, BASE, DTYPE, INTERP)
        # [BLOCK_N, WORDS, 2, 2, 2] indexed (row & 1, row >> 1 & 1, row >> 2), then K in order.
        values = tl.join(tl.join(tl.join(v0, v1), tl.join(v2, v3)), tl.join(tl.join(v4, v5), tl.join(v6, v7)))
        values = tl.reshape(tl.permute(values, (0, 1, 4, 3, 2)), (BLOCK_N, BLOCK_K))
        if INTERP:
            acc += tl.dot(values, x.to(tl.float32), input_precision="ieee") * scale[:, None]
        else:
            acc += tl.dot(values, x) * scale[:, None]

    allow_next_kernel(USE_PDL)
    store_or_merge(tl.trans(acc), out_ptr, workspace_ptr, count_ptr, offs_m, offs_n, mask_m, mask_n, M, N,
                   stride_om, pid_n, pid_k, SPLIT_K, SELF_MERGE)


def supports(m: int, k: int, bits: int, group_size: int, act_order: bool, dtype: torch.dtype) -> bool:
    """Whether a matmul fits this kernel: MIN_DOT_ROWS to MAX_DOT_ROWS rows of a layer that
    int_group.fits_int4_16bit_kernels."""
    return MIN_DOT_ROWS <= m <= MAX_DOT_ROWS and fits_int4_16bit_kernels(k, bits, group_size, act_order, dtype)


def default_config(n: int, k: int, group_size: int, device: torch.device) -> dict[str, int]:
    """Tiles, split and pipeline depth for one shape. From the H200 sweep (`benchmarks/int4_gemm.py
    --sweep`): 64-column tiles, three stages and about four programs per SM were best or within
    6% of it on each Llama-3.1-8B shape at 8 rows."""
    block_n, block_k = 64, whole_k_tile(k, group_size, 128)
    split_k = split_for(triton.cdiv(n, block_n), triton.cdiv(k, block_k), 4, device)
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=4, num_stages=3)


def int4_dot_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    split_counts: torch.Tensor | None = None, config: dict[str, int] | None = None,
) -> torch.Tensor:
    """x [M, K] (bf16/fp16, M <= 16) @ W for the interleaved int4 layout (kernels/int_group.py);
    `split_counts` as in ops/split_k.py (without it a second launch adds the splits)."""
    m, k = x.shape
    n = qweight.shape[1]
    config = config or default_config(n, k, group_size, x.device)
    block_k = config["BLOCK_K"]
    if not tiles_k(k, group_size, block_k):
        raise ValueError(f"BLOCK_K={block_k} tiles must tile K={k} and groups of {group_size} rows.")
    if x.stride(-1) != 1:
        x = x.contiguous()
    tile_group_size = kernel_group_size(group_size, k, block_k)
    split_k = config["SPLIT_K"]
    num_tiles = triton.cdiv(n, config["BLOCK_N"])
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    splits = split_outputs(out, split_k, num_tiles, split_counts, placeholder=qweight)
    _int4_dot_kernel[(num_tiles, split_k)](
        x, qweight, scales, zeros, out, splits.workspace, splits.counts,
        m, n, k, tile_group_size,
        x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
        BASE=_BF16_BASE if x.dtype == torch.bfloat16 else _FP16_BASE, SELF_MERGE=splits.self_merge,
        NUM_STAGES=config["num_stages"], INTERP=INTERPRETED, **config,
        **pdl_launch_options(x.device),
    )
    finish_splits(splits, out)
    return out
