"""One-row int4 GEMV in packed fp16 arithmetic (batch-1 decode, bf16/fp16 activations).

The float32 GEMV (triton_wNa16._int_group_gemv_kernel) spends one LOP3, one FMA for the zero
point and one FMA for the product on every 4-bit value, plus the rest of its loop: it is bound
by instruction issue (ncu, BENCHMARKS.md seventh run). Here every instruction handles two
values. Per packed word (eight values, the interleaved layout of kernels/int_group.py: rows
2s and 2s + 1 at bits 4s and 16 + 4s):

- one shift and four LOP3 make four fp16 pairs 1024 + q (nibbles at bits 0 and 16, or 8 and
  24 after the shift) or 1024 + 16 q (the nibbles above them);
- four packed adds or FMAs take 1024 + zero (or, scaled by 1/16, 64 + zero) off: the exact
  integers q - zero;
- four packed FMAs multiply them by their pairs of x and sum into one pair.

Each thread takes two words of a column (one from each half of the K tile) into one pair of
sums, whose halves are widened to float32 and added: 34 instructions for sixteen values, plus
one FMA for the group's scale. fp16 products and sums are exact enough (2**-11 relative, below
the bf16 output's 2**-8) but could overflow, so each program scales its slice of x by a power
of two that puts its largest |x| in [256, 512) as it converts x to fp16 pairs: a half of the
pair sums eight products of at most 15 * 512, below fp16's 65504. The scale is taken off the
float32 sum, exactly. Zero points must be integers (every supported format stores them so).

Measured on an H200 (BENCHMARKS.md eighth run): 34%, 26%, 62% and 52% of the copy bandwidth on
Llama-3.1-8B's qkv, o, gate_up and down at one row, against 28%, 24%, 44% and 38% for the
float32 GEMV. Converting x once per program into a scratch copy saves instructions (2.5
instead of 3.2 per value at 256 columns) but measured slower: the extra round trip and
barrier before the weights' loads cost more.

The largest |x| of a program's rows is found in one load of at most MAX_SPLIT_ROWS rows (the
launcher splits K at least that finely), so that the weights' loads wait for one round trip.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.layers.ops import INTERPRETED
from pagedllm.layers.ops.epilogue import Epilogue, plan_epilogue
from pagedllm.layers.ops.epilogue_kernels import epilogue_columns
from pagedllm.layers.ops.pdl import allow_next_kernel, pdl_launch_options, wait_for_previous_kernel
from pagedllm.layers.ops.split_k import (
    even_split,
    finish_splits,
    k_tile_range,
    split_for,
    split_outputs,
    store_or_merge,
)
from pagedllm.layers.quantization.kernels.int_group import fits_int4_16bit_kernels, tiles_k, whole_k_tile

# The most K rows one program reads: its x is loaded at once (2,048 pairs, 16 per thread).
MAX_SPLIT_ROWS = 4096


def _word_pair_dot_asm() -> str:
    """PTX for two words ($1, $2) of a column against its -(1024 + zero) and -(64 + zero) pairs
    ($3, $4) and each word's four pairs of x ($5-$8 and $9-$12: rows 0/1, 2/3, 4/5, 6/7): the
    float32 sum of the sixteen products. LOP3 (a & b) | c is table 0xEA; 0x2C00 is 1/16 in fp16."""
    lines = ["mov.b32 sixteenth, 0x2C002C00;"]
    for word, x_first in ((1, 5), (2, 9)):
        lines += [
            f"shr.u32 s, ${word}, 8;",
            f"lop3.b32 t0, ${word}, 0x000F000F, 0x64006400, 0xEA;",
            f"lop3.b32 t1, ${word}, 0x00F000F0, 0x64006400, 0xEA;",
            "lop3.b32 t2, s, 0x000F000F, 0x64006400, 0xEA;",
            "lop3.b32 t3, s, 0x00F000F0, 0x64006400, 0xEA;",
            "add.rn.f16x2 t0, t0, $3;",
            "fma.rn.f16x2 t1, t1, sixteenth, $4;",
            "add.rn.f16x2 t2, t2, $3;",
            "fma.rn.f16x2 t3, t3, sixteenth, $4;",
            f"mul.rn.f16x2 acc, t0, ${x_first};" if word == 1 else f"fma.rn.f16x2 acc, t0, ${x_first}, acc;",
        ]
        lines += [f"fma.rn.f16x2 acc, t{pair}, ${x_first + pair}, acc;" for pair in (1, 2, 3)]
    lines += ["mov.b32 {lo, hi}, acc;", "cvt.f32.f16 lo32, lo;", "cvt.f32.f16 hi32, hi;", "add.f32 $0, lo32, hi32;"]
    return ("{\n.reg .b32 s, t0, t1, t2, t3, acc, sixteenth;\n.reg .f16 lo, hi;\n.reg .f32 lo32, hi32;\n"
            + "\n".join(lines) + "\n}")


_WORD_PAIR_DOT_ASM = tl.constexpr(_word_pair_dot_asm())


@triton.jit
def _half(bits):
    """The fp16 in the low 16 bits of each int32, as float32."""
    return (bits & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _round16(value):
    return value.to(tl.float16).to(tl.float32)


@triton.jit
def _lane_dot_interpreted(lane_sum, words, bias_low, bias_high, x01, x23, x45, x67, LANE: tl.constexpr):
    """One half (LANE 0 or 16) of a word's pair sums, added to lane_sum, with integer ops and
    float32 arithmetic rounded to fp16 after each step."""
    shifted = words >> 8
    q01 = _half(((words & 0x000F000F) | 0x64006400) >> LANE) + _half(bias_low >> LANE)
    q23 = _round16(_half(((words & 0x00F000F0) | 0x64006400) >> LANE) * 0.0625 + _half(bias_high >> LANE))
    q45 = _half(((shifted & 0x000F000F) | 0x64006400) >> LANE) + _half(bias_low >> LANE)
    q67 = _round16(_half(((shifted & 0x00F000F0) | 0x64006400) >> LANE) * 0.0625 + _half(bias_high >> LANE))
    lane_sum = _round16(lane_sum + q01 * _half(x01 >> LANE))
    lane_sum = _round16(lane_sum + q23 * _half(x23 >> LANE))
    lane_sum = _round16(lane_sum + q45 * _half(x45 >> LANE))
    return _round16(lane_sum + q67 * _half(x67 >> LANE))


@triton.jit
def _word_pair_dot_interpreted(words_a, words_b, bias_low, bias_high, xa, xb):
    """_WORD_PAIR_DOT_ASM for the interpreter, which has no inline assembly. xa, xb: each
    word's four x pairs."""
    total = tl.zeros(words_a.shape, dtype=tl.float32)
    for half in tl.static_range(2):
        lane_sum = tl.zeros(words_a.shape, dtype=tl.float32)
        lane_sum = _lane_dot_interpreted(lane_sum, words_a, bias_low, bias_high, xa[0], xa[1], xa[2], xa[3], half * 16)
        lane_sum = _lane_dot_interpreted(lane_sum, words_b, bias_low, bias_high, xb[0], xb[1], xb[2], xb[3], half * 16)
        total += lane_sum
    return total


@triton.jit
def _pack_half2(low, high, INTERP: tl.constexpr):
    """Two float32 tensors rounded to an fp16 pair in an int32, `low` in the low half."""
    if INTERP:
        low_bits = low.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        high_bits = high.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return low_bits | (high_bits << 16)
    else:
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [low, high],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _load_words(ptrs, mask_n, EVEN_N: tl.constexpr):
    if EVEN_N:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask_n[None, :], other=0)


@triton.jit
def _x_pairs(x_pairs, shape):
    """The four fp16 x pairs [words, 4] (rows 0/1, 2/3, 4/5, 6/7 of each word) as four tensors
    broadcast to `shape`."""
    # Pairs 0 and 2, 1 and 3; then 0, 2 and 1, 3.
    x_even_pairs, x_odd_pairs = tl.split(tl.reshape(x_pairs, (x_pairs.shape[0], 2, 2)))
    x01, x45 = tl.split(x_even_pairs)
    x23, x67 = tl.split(x_odd_pairs)
    return (tl.broadcast_to(x01[:, None], shape), tl.broadcast_to(x23[:, None], shape),
            tl.broadcast_to(x45[:, None], shape), tl.broadcast_to(x67[:, None], shape))


@triton.jit
def _x_scale(x_pairs_ptr, tile_start, tile_end, BLOCK_K: tl.constexpr, X_PAIRS: tl.constexpr,
             IS_BF16: tl.constexpr):
    """The power of two that puts the largest |x| of this program's tiles [tile_start,
    tile_end) (at most X_PAIRS pairs, loaded at once) in [256, 512), and its inverse."""
    offs_pairs = tile_start * (BLOCK_K // 2) + tl.arange(0, X_PAIRS)
    pairs = tl.load(x_pairs_ptr + offs_pairs, mask=offs_pairs < tile_end * (BLOCK_K // 2), other=0)
    low, high = _unpack_x_pairs(pairs, IS_BF16)
    largest = tl.max(tl.maximum(tl.abs(low), tl.abs(high)))
    # The biased exponent E of the largest |x| (at least 9, so that both powers are normal):
    # 2**(135 - E) brings it to [2**8, 2**9).
    exponent = tl.maximum((largest.to(tl.int32, bitcast=True) >> 23) & 0xFF, 9)
    scale = ((262 - exponent) << 23).to(tl.float32, bitcast=True)
    return scale, ((exponent - 8) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _unpack_x_pairs(pairs, IS_BF16: tl.constexpr):
    """Pairs of consecutive x (two bf16 or fp16 in an int32) as two float32 tensors."""
    if IS_BF16:
        return (pairs << 16).to(tl.float32, bitcast=True), (pairs & -65536).to(tl.float32, bitcast=True)
    else:
        return _half(pairs), _half(pairs >> 16)


@triton.jit
def _scaled_x_pairs(pairs, x_scale, IS_BF16: tl.constexpr, INTERP: tl.constexpr):
    """Pairs of consecutive x times x_scale, as fp16 pairs."""
    low, high = _unpack_x_pairs(pairs, IS_BF16)
    return _pack_half2(low * x_scale, high * x_scale, INTERP)


@triton.jit
def _int4_half2_gemv_kernel(
    x_pairs_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, workspace_ptr, count_ptr,
    positions_ptr, cos_ptr, sin_ptr, stride_cos, rotated_columns, N, K, stride_qk, stride_sg, stride_zg,
    TILES_PER_GROUP: tl.constexpr, SPLIT_K: tl.constexpr, SELF_MERGE: tl.constexpr, EVEN_N: tl.constexpr,
    X_PAIRS: tl.constexpr, IS_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, INTERP: tl.constexpr,
    EPILOGUE: tl.constexpr, ROPE_HALF: tl.constexpr, EPILOGUE_RUN: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """out [N] = x [K] @ W, W interleaved int4 [K / 8, N] with uniform groups of
    TILES_PER_GROUP BLOCK_K tiles (0: one group), K a whole number of tiles; EVEN_N: N too.
    x (read as int32 pairs of 16-bit values, x_pairs_ptr), scales, zeros and out contiguous
    along their last axis. Grid
    (cdiv(N, BLOCK_N), SPLIT_K); split K: workspace [SPLIT_K, N] float32 and count_ptr as in
    ops/split_k.py. EPILOGUE / ROPE_HALF and the rope arguments: as ops/gemv.py's kernel
    (SiLU-and-mul of stacked gate and up columns, or rope of q and k heads)."""
    wait_for_previous_kernel(USE_PDL)
    WORDS: tl.constexpr = BLOCK_K // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, 1)
    offs_n, mask_n, rope_cos, rope_sin = epilogue_columns(
        pid_n, BLOCK_N, N, offs_m, offs_m < 1, positions_ptr, cos_ptr, sin_ptr, stride_cos, rotated_columns,
        out_ptr.dtype.element_ty, EPILOGUE, ROPE_HALF, EPILOGUE_RUN)

    tile_start, tile_end = k_tile_range(K, BLOCK_K, SPLIT_K, pid_k)
    x_scale, x_inverse = _x_scale(x_pairs_ptr, tile_start, tile_end, BLOCK_K, X_PAIRS, IS_BF16)

    # The tile's words in two halves of K, one word of each per column taken together.
    HALF: tl.constexpr = WORDS // 2
    offs_half = tl.arange(0, HALF)
    acc = tl.zeros((HALF, BLOCK_N), dtype=tl.float32)
    # Pointers advanced by one tile per iteration (cheaper than row * stride per tile).
    words_a_ptrs = qweight_ptr + (tile_start * WORDS + offs_half)[:, None] * stride_qk + offs_n[None, :]
    x_a_ptrs = x_pairs_ptr + (tile_start * WORDS + offs_half)[:, None] * 4 + tl.arange(0, 4)[None, :]
    for tile in tl.range(tile_start, tile_end, num_stages=NUM_STAGES):
        if TILES_PER_GROUP == 0:
            group = 0
        else:
            group = tile // TILES_PER_GROUP
        words_a = _load_words(words_a_ptrs, mask_n, EVEN_N)
        words_b = _load_words(words_a_ptrs + HALF * stride_qk, mask_n, EVEN_N)
        if EVEN_N:
            scale = tl.load(scales_ptr + group * stride_sg + offs_n)
            zero = tl.load(zeros_ptr + group * stride_zg + offs_n)
        else:
            scale = tl.load(scales_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0)
            zero = tl.load(zeros_ptr + group * stride_zg + offs_n, mask=mask_n, other=0.0)
        zero = zero.to(tl.float32).to(tl.int32)
        # The fp16 pairs -(1024 + zero) (bits 0xE400 + zero) and -(64 + zero) (0xD400 + 16 zero)
        # in integer ops; the constants are 0xE400E400 and 0xD400D400 as int32.
        bias_low = tl.broadcast_to((zero * 0x10001 - 469703680)[None, :], words_a.shape)
        bias_high = tl.broadcast_to((zero * 0x100010 - 738143232)[None, :], words_a.shape)
        xa = _x_pairs(_scaled_x_pairs(tl.load(x_a_ptrs), x_scale, IS_BF16, INTERP), words_a.shape)
        xb = _x_pairs(_scaled_x_pairs(tl.load(x_a_ptrs + HALF * 4), x_scale, IS_BF16, INTERP), words_a.shape)
        words_a_ptrs += WORDS * stride_qk
        x_a_ptrs += WORDS * 4
        if INTERP:
            sums = _word_pair_dot_interpreted(words_a, words_b, bias_low, bias_high, xa, xb)
        else:
            sums = tl.inline_asm_elementwise(
                _WORD_PAIR_DOT_ASM, "=r" + ",r" * 12,
                [words_a, words_b, bias_low, bias_high, xa[0], xa[1], xa[2], xa[3], xb[0], xb[1], xb[2], xb[3]],
                dtype=tl.float32, is_pure=True, pack=1)
        acc += sums * scale.to(tl.float32)[None, :]

    allow_next_kernel(USE_PDL)
    result = (tl.sum(acc, axis=0) * x_inverse)[None, :]
    store_or_merge(result, out_ptr, workspace_ptr, count_ptr, offs_m, offs_n, offs_m < 1, mask_n, 1, N,
                   0, pid_n, pid_k, SPLIT_K, SELF_MERGE, EPILOGUE, rope_cos, rope_sin)


def supports(m: int, k: int, bits: int, group_size: int, act_order: bool, dtype: torch.dtype) -> bool:
    """Whether a matmul fits this kernel: one row of a layer that
    int_group.fits_int4_16bit_kernels."""
    return m == 1 and fits_int4_16bit_kernels(k, bits, group_size, act_order, dtype)


def default_config(n: int, k: int, group_size: int, device: torch.device) -> dict[str, int]:
    """Tiles, split and pipeline depth for one shape: 256-column tiles (the fewest instructions
    per value: x pairs, scales and zero points are shared by more columns), three stages and
    about two programs per SM were best or within 8% of it on each Llama-3.1-8B shape (H200
    sweep, BENCHMARKS.md eighth run; 1.5 programs per SM was 2% slower end to end)."""
    block_n, block_k = (256 if n >= 2048 else 64), whole_k_tile(k, group_size, 128)
    k_tiles = triton.cdiv(k, block_k)
    split_k = split_for(triton.cdiv(n, block_n), k_tiles, 2, device)
    split_k = even_split(k_tiles, max(split_k, triton.cdiv(k_tiles, MAX_SPLIT_ROWS // block_k)))
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k, "num_warps": 4, "num_stages": 3}


def int4_half2_gemv(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    split_counts: torch.Tensor | None = None, config: dict[str, int] | None = None,
    epilogue: Epilogue | None = None,
) -> torch.Tensor:
    """x [1, K] (bf16/fp16) @ W for the interleaved int4 layout (kernels/int_group.py);
    `split_counts` as in ops/split_k.py (without it a second launch adds the splits).
    `epilogue`: as ops/gemv.py's (split K then needs split_counts)."""
    m, k = x.shape
    n = qweight.shape[1]
    config = config or default_config(n, k, group_size, x.device)
    block_k = config["BLOCK_K"]
    if m != 1 or not tiles_k(k, group_size, block_k):
        raise ValueError(f"one row whose K={k} and groups of {group_size} rows are whole BLOCK_K={block_k} tiles "
                         f"is needed, got {m} rows.")
    x_pairs = x.contiguous().view(torch.int32)
    split_k = config["SPLIT_K"]
    num_tiles = triton.cdiv(n, config["BLOCK_N"])
    # The x pairs one split reads (the kernel finds their largest in one load).
    tiles_per_split = triton.cdiv(k // block_k, split_k)
    if tiles_per_split * block_k > MAX_SPLIT_ROWS:
        raise ValueError(f"SPLIT_K={split_k} leaves {tiles_per_split * block_k} rows of K={k} to one program; at most "
                         f"{MAX_SPLIT_ROWS} are allowed: use SPLIT_K >= {triton.cdiv(k, MAX_SPLIT_ROWS)}.")
    plan = plan_epilogue(epilogue, 1, n, config["BLOCK_N"], placeholder=x_pairs)
    out = torch.empty((1, plan.out_features), device=x.device, dtype=x.dtype)
    splits = split_outputs(out[0], split_k, num_tiles, split_counts, placeholder=qweight, sums_shape=(n,),
                           whole_sums_in_kernel=epilogue is not None)
    _int4_half2_gemv_kernel[(num_tiles, split_k)](
        x_pairs, qweight, scales, zeros, out, splits.workspace, splits.counts, *plan.rope_args,
        n, k, qweight.stride(0), scales.stride(0), zeros.stride(0),
        TILES_PER_GROUP=0 if group_size == -1 else group_size // block_k, EVEN_N=n % config["BLOCK_N"] == 0,
        X_PAIRS=triton.next_power_of_2(tiles_per_split * block_k // 2), IS_BF16=x.dtype == torch.bfloat16,
        SELF_MERGE=splits.self_merge, NUM_STAGES=config["num_stages"], INTERP=INTERPRETED,
        **plan.constexprs, **config,
        **pdl_launch_options(x.device),
    )
    finish_splits(splits, out[0])
    return out
