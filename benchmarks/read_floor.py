"""The floor under a one-row GEMV (issue 9 item 4): a kernel that only reads the same bytes,
launched as the engine launches its GEMVs (PDL, one launch per layer, in a CUDA graph,
rotating through weight copies so that L2 holds none), against the engine's GEMV on each
Llama-3.1-8B shape, bf16 and fp8 weights. Prints µs per call and the fraction of the
device-to-device copy bandwidth for both, and the GEMV's time over the read's:

    PYTHONPATH=. python3 benchmarks/read_floor.py [--programs-per-sm 2 4 8]

The read sums each 4-byte word into a register per thread: no arithmetic to speak of, so
its time is the fixed cost of a launch in the chain (ramp-up and tail) plus bytes over the
read bandwidth: about the least a kernel that reads the projection's weight in one launch
can take. fp8 rows reach
the GEMV as the engine gives them: quantized by the norm before qkv and gate_up, quantized
in the GEMV for o and down.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from benchmarks.common import graph_seconds_per_call, measure_copy_bandwidth, print_table
from benchmarks.gemv_micro import CALLS_PER_GRAPH, SHAPES, rotated_weights, split_counts_for
from pagedllm.layers.ops.gemv import gemv
from pagedllm.layers.ops.pdl import (
    allow_next_kernel,
    pdl_launch_options,
    wait_for_previous_kernel,
)

_WORDS_PER_BLOCK = 2048


@triton.jit
def _read_kernel(words_ptr, sums_ptr, num_blocks, blocks_per_program, BLOCK: tl.constexpr,
                 NUM_STAGES: tl.constexpr, USE_PDL: tl.constexpr):
    """sums[pid] = the int32 sum of blocks [pid * blocks_per_program, ...) of BLOCK words, up to
    num_blocks: every word read once, in whole aligned blocks (no masks)."""
    wait_for_previous_kernel(USE_PDL)
    pid = tl.program_id(0)
    first = pid * blocks_per_program
    last = tl.minimum(first + blocks_per_program, num_blocks)
    start = words_ptr + first.to(tl.int64) * BLOCK
    total = tl.zeros([BLOCK], dtype=tl.int32)
    for block in tl.range(0, last - first, num_stages=NUM_STAGES):
        total += tl.load(start + block * BLOCK + tl.arange(0, BLOCK))
    allow_next_kernel(USE_PDL)
    tl.store(sums_ptr + pid, tl.sum(total, 0))


def read_seconds(weights: list[torch.Tensor], programs: int) -> float:
    """Seconds per read of one weight's bytes, all of them (each Llama-3.1-8B weight is a whole
    number of blocks)."""
    words = [w.view(torch.int32).reshape(-1) for w in weights]
    if words[0].numel() % _WORDS_PER_BLOCK:
        raise ValueError(f"a weight of {words[0].numel()} words is not a whole number of {_WORDS_PER_BLOCK}-word blocks")
    num_blocks = words[0].numel() // _WORDS_PER_BLOCK
    sums = torch.empty(programs, dtype=torch.int32, device="cuda")
    options = pdl_launch_options(sums.device)

    def read(i: int) -> None:
        _read_kernel[(programs,)](words[i % len(words)], sums, num_blocks, triton.cdiv(num_blocks, programs),
                                  BLOCK=_WORDS_PER_BLOCK, NUM_STAGES=3, num_warps=4, **options)

    return graph_seconds_per_call(read, CALLS_PER_GRAPH, 20)


def gemv_seconds(name: str, weights: list[torch.Tensor], scale: torch.Tensor | None) -> float:
    from pagedllm.layers.quantization.kernels.per_token_quant import per_token_quant

    x = torch.randn(1, weights[0].shape[1], device="cuda", dtype=torch.bfloat16)
    if scale is not None and name in ("qkv", "gate_up"):
        x_q, x_scale = per_token_quant(x, torch.float8_e4m3fn)

        def call(w: torch.Tensor) -> torch.Tensor:
            return gemv(x_q, w, weight_scale=scale, input_scale=x_scale, out_dtype=torch.bfloat16,
                        split_counts=split_counts_for(w))
    else:
        def call(w: torch.Tensor) -> torch.Tensor:
            return gemv(x, w, weight_scale=scale, split_counts=split_counts_for(w))

    return graph_seconds_per_call(lambda i: call(weights[i % len(weights)]), CALLS_PER_GRAPH, 20)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--programs-per-sm", type=int, nargs="+", default=[2, 4, 8],
                        help="programs of the read kernel per SM to try; the fastest is the floor")
    args = parser.parse_args()
    bandwidth = measure_copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = [("measured copy bandwidth", f"{bandwidth / 1e12:.2f} TB/s")]
    for fp8 in (False, True):
        for name, in_features, out_features in SHAPES:
            if fp8 and name == "lm_head":
                continue  # the engine keeps the LM head in bf16
            weights, scale = rotated_weights(out_features, in_features, fp8)
            num_bytes = weights[0].numel() * weights[0].element_size()
            floor, per_sm = min((read_seconds(weights, count * sms), count) for count in args.programs_per_sm)
            engine = gemv_seconds(name, weights, scale)
            rows.append((f"{'fp8' if fp8 else 'bf16'} {name} {in_features}->{out_features} ({num_bytes / 1e6:.1f} MB)", (
                f"read {floor * 1e6:6.2f} us ({num_bytes / floor / bandwidth:6.1%}, {per_sm}/SM)  "
                f"GEMV {engine * 1e6:6.2f} us ({num_bytes / engine / bandwidth:6.1%})  "
                f"GEMV / read {engine / floor:.2f}"
            )))
            del weights
            torch.cuda.empty_cache()
    print_table(f"one-row GEMV against a read of its bytes (the fastest of {args.programs_per_sm} read programs "
                f"per SM), {torch.cuda.get_device_name()}", rows)


if __name__ == "__main__":
    main()
