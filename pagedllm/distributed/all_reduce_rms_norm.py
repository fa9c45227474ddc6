"""The all-reduce of a row-parallel layer's partial sums, the residual add and the RMSNorm after
it, as one Triton kernel per call: at decode sizes with two ranks that replaces a one-shot
all-reduce (9.0 µs median per call on two H200s) and a norm launch (2.1 µs) with one launch
and one one-way trip over NVLink (6.7 µs median), 64 times per step of Llama-3.1-8B.

The exchange is a low-latency ("LL") protocol: every 4-byte word of the payload travels in an
8-byte packet with a 4-byte flag, written straight into each peer's buffer. An aligned 8-byte
store lands whole, so a reader that sees the flag it expects also sees the data, and no barrier
is needed before or after. The flag is the call's number (an "epoch"), counted per row on the
device so that CUDA graph replays keep counting. Each rank's buffer has two slots, used in turn:
a rank can only write epoch e + 2 into a slot after it has read the peer's epoch e + 1, which
the peer sent after it finished reading epoch e from that slot. A reader waits thread by
thread: each re-reads its own packets until their flags arrive (an inline-asm loop), with no
block-wide vote between reads, which cost a barrier per read.

Numerics equal the unfused chain: the partial sums are added in float32 in rank order on every
rank (so the ranks' residual streams stay bit-identical), rounded to the model dtype as the
all-reduce's output is, then added to the residual and normalised as in
layers/ops/fused_rms_norm.py. bf16 only: a word's two bf16 values become float32 by a shift.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.layers.ops import INTERPRETED
from pagedllm.layers.ops.pdl import pdl_launch_options, start_after_previous_kernel


@triton.jit
def _all_reduce_add_rms_norm_kernel(
    x_ptr,
    x_words_ptr,
    residual_ptr,
    weight_ptr,
    buffer_ptrs_ptr,
    epochs_ptr,
    words_per_row,
    region_words,
    eps,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
    INTERPRETED: tl.constexpr,
    USE_PDL: tl.constexpr,
    SPIN_PER_THREAD: tl.constexpr,
):
    """Row r: s = sum over ranks of x[r] (every rank's partial, as bf16); residual[r] =
    bf16(bf16(s) + residual[r]); x[r] = rms_norm(residual[r]) * weight.

    x [rows, 2 * words_per_row] bf16, x_words the same memory as int32 words; residual the
    same shape, contiguous. buffer_ptrs [WORLD] int64: the address of every rank's int64
    exchange buffer, laid out [2 slots][WORLD senders][region_words], row r of a region at
    r * words_per_row. epochs [rows] int32: how many calls each row has made on this rank.
    Grid: (rows,); each program waits for the same row's program on every peer, so rows stay
    well below the SM count (symm_mem_all_reduce.MAX_FUSED_ROWS). SPIN_PER_THREAD (compiled
    kernels, two to four words a thread: `launch_shape`): each thread waits for its own
    packets; else the block votes after each read.
    """
    start_after_previous_kernel(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    epoch = tl.load(epochs_ptr + row) + 1
    tl.store(epochs_ptr + row, epoch)
    slot = (epoch & 1).to(tl.int64)
    cols = tl.arange(0, BLOCK_WORDS)
    mask = cols < words_per_row
    # Columns past the row read column 0 instead: the exchange loads below are not masked.
    cols = tl.where(mask, cols, 0)
    own_words = tl.load(x_words_ptr + row * words_per_row + cols, mask=mask, other=0)
    row_in_region = row * words_per_row + cols
    even = 2 * row_in_region
    odd = even + 1
    # Loaded before the exchange, whose wait they overlap.
    residual_even = tl.load(residual_ptr + even, mask=mask, other=0.0).to(tl.float32)
    residual_odd = tl.load(residual_ptr + odd, mask=mask, other=0.0).to(tl.float32)
    weight_even = tl.load(weight_ptr + 2 * cols, mask=mask, other=0.0).to(tl.float32)
    weight_odd = tl.load(weight_ptr + 2 * cols + 1, mask=mask, other=0.0).to(tl.float32)
    flag = epoch.to(tl.int64) << 32
    packets = (own_words.to(tl.int64) & 0xFFFFFFFF) | flag
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            peer_buffer = tl.load(buffer_ptrs_ptr + peer).to(tl.pointer_type(tl.int64))
            _store_volatile(peer_buffer + (slot * WORLD + RANK) * region_words + row_in_region, packets, mask,
                            INTERPRETED)

    own_buffer = tl.load(buffer_ptrs_ptr + RANK).to(tl.pointer_type(tl.int64))
    sum_even = tl.zeros([BLOCK_WORDS], dtype=tl.float32)
    sum_odd = tl.zeros([BLOCK_WORDS], dtype=tl.float32)
    for sender in tl.static_range(WORLD):
        if sender == RANK:
            words = own_words
        else:
            source = own_buffer + (slot * WORLD + sender) * region_words + row_in_region
            if SPIN_PER_THREAD:
                received = _wait_for_packets(source, epoch + tl.zeros_like(cols))
            else:
                # The interpreter, and rows of fewer than two or more than four words a
                # thread: read every packet, then vote across the block until none is missing.
                received = _load_volatile(source, INTERPRETED)
                waiting = tl.max((((received >> 32).to(tl.int32) != epoch) & mask).to(tl.int32), axis=0)
                while waiting > 0:
                    received = _load_volatile(source, INTERPRETED)
                    waiting = tl.max((((received >> 32).to(tl.int32) != epoch) & mask).to(tl.int32), axis=0)
            words = tl.where(mask, (received & 0xFFFFFFFF).to(tl.int32), 0)
        # Little-endian: a word holds element 2i in its low half, 2i + 1 in its high half.
        sum_even += (words << 16).to(tl.float32, bitcast=True)
        sum_odd += (words & -65536).to(tl.float32, bitcast=True)

    dtype = x_ptr.dtype.element_ty
    summed_even = _round_to_bf16(_round_to_bf16(sum_even) + residual_even)
    summed_odd = _round_to_bf16(_round_to_bf16(sum_odd) + residual_odd)
    tl.store(residual_ptr + even, summed_even.to(dtype), mask=mask)
    tl.store(residual_ptr + odd, summed_odd.to(dtype), mask=mask)
    variance = (tl.sum(summed_even * summed_even, axis=0) + tl.sum(summed_odd * summed_odd, axis=0)) / (
        2 * words_per_row
    )
    inv_rms = tl.rsqrt(variance + eps)
    normed_even = _round_to_bf16(_round_to_bf16(summed_even * inv_rms) * weight_even)
    normed_odd = _round_to_bf16(_round_to_bf16(summed_odd * inv_rms) * weight_odd)
    tl.store(x_ptr + even, normed_even.to(dtype), mask=mask)
    tl.store(x_ptr + odd, normed_odd.to(dtype), mask=mask)


@triton.jit
def _load_volatile(pointers, INTERPRETED: tl.constexpr):
    """A load that is never cached, merged or hoisted out of the wait loop (a plain or even a
    volatile tl.load in a loop that stores nothing may be hoisted as loop-invariant). The
    interpreter has no inline assembly and needs none."""
    if INTERPRETED:
        values = tl.load(pointers, volatile=True)
    else:
        values = tl.inline_asm_elementwise(
            "ld.volatile.global.b64 $0, [$1];", "=l,l", [pointers], dtype=tl.int64, is_pure=False, pack=1
        )
    return values


@triton.jit
def _wait_for_packets(pointers, epochs):
    """Each thread reads its packets (two at a time) until their flags hold `epochs`, with no
    block-wide vote between reads. Columns past the row read column 0's packet, which also
    arrives."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 l0, h0, l1, h1; "
        "WAIT_${:uid}: ld.volatile.global.b64 $0, [$2]; ld.volatile.global.b64 $1, [$3]; "
        "mov.b64 {l0, h0}, $0; mov.b64 {l1, h1}, $1; "
        "setp.ne.b32 p, h0, $4; setp.ne.or.b32 p, h1, $5, p; @p bra WAIT_${:uid}; }",
        "=l,=l,l,l,r,r", [pointers, epochs], dtype=tl.int64, is_pure=False, pack=2,
    )


@triton.jit
def _store_volatile(pointers, values, mask, INTERPRETED: tl.constexpr):
    """An 8-byte store that goes out whole and at once (a packet to a peer)."""
    if INTERPRETED:
        tl.store(pointers, values, mask=mask)
    else:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.volatile.global.b64 [$1], $2; mov.b32 $0, 0; }",
            "=r,l,l,r", [pointers, values, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
        )


@triton.jit
def _round_to_bf16(value):
    """float32 → the nearest bf16 (ties to even), still as float32. Done with integer ops so
    that Triton's interpreter, whose conversion truncates, rounds as the GPU does; the final
    .to(bf16) of the result is then exact on both."""
    bits = value.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


def launch_shape(block_words: int) -> tuple[int, bool]:
    """(num_warps, SPIN_PER_THREAD) for a row of block_words words: four words a thread, up to
    16 warps (Llama-3.1-8B's 2048 words: 2.5 µs per call in a chain of GEMVs, against 2.9 µs
    with the vote loop on 8 warps; BENCHMARKS.md, fifteenth run). The per-thread wait reads two
    packets per asm block, so it needs two or more words a thread; past four (rows of more
    than 2048 words on 16 warps) a thread's asm blocks would wait one after another, which was
    not measured, so those rows keep the vote loop."""
    num_warps = max(1, min(16, block_words // 128))
    words_per_thread = block_words // (32 * num_warps)
    return num_warps, 2 <= words_per_thread <= 4


def all_reduce_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    buffer_ptrs: torch.Tensor, epochs: torch.Tensor, region_words: int, rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place, in one kernel: residual += all_reduce(x); x = rms_norm(residual) * weight.
    Returns (x, residual). x, residual [rows, hidden] contiguous bf16 with an even hidden size;
    buffer_ptrs, epochs and region_words describe the exchange buffers (see the kernel), which
    the caller (symm_mem_all_reduce.py) has checked are large enough for rows * hidden / 2
    words and rows programs."""
    rows, hidden_size = x.shape
    words_per_row = hidden_size // 2
    block_words = triton.next_power_of_2(words_per_row)
    num_warps, spin_per_thread = launch_shape(block_words)
    # The interpreter has no inline assembly: it takes the vote loop.
    spin_per_thread = spin_per_thread and not INTERPRETED
    _all_reduce_add_rms_norm_kernel[(rows,)](
        x, x.view(torch.int32), residual, weight, buffer_ptrs, epochs, words_per_row, region_words, eps,
        RANK=rank, WORLD=buffer_ptrs.numel(), BLOCK_WORDS=block_words, INTERPRETED=INTERPRETED,
        SPIN_PER_THREAD=spin_per_thread, num_warps=num_warps,
        **pdl_launch_options(x.device),
    )
    return x, residual
