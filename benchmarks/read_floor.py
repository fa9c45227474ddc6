"""The floor under a one-row GEMV (issue 9 item 4): a kernel that only reads the same bytes,
launched as the engine launches its GEMVs (PDL, one launch per layer, in a CUDA graph,
rotating through weight copies so that L2 holds none), against the engine's GEMV on each
Llama-3.1-8B shape, bf16 and fp8 weights. Prints µs per call and the fraction of the
device-to-device copy bandwidth for both, and the GEMV's time over the read's:

    PYTHONPATH=. python3 benchmarks/read_floor.py [--programs-per-sm 4]

The read sums each 4-byte word into a register per thread: no arithmetic to speak of, so
its time is the fixed cost of a launch in the chain (ramp-up and tail) plus bytes over the
read bandwidth, the least any kernel of one launch per projection can take. fp8 rows reach
the GEMV as the engine gives them: quantized by the norm before qkv and gate_up, quantized
in the GEMV for o and down.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from benchmarks.common import graph_seconds_per_call, measure_copy_bandwidth, print_table
from benchmarks.gemv_micro import _CALLS_PER_GRAPH, SHAPES, _counts, _weights
from pagedllm.layers.ops.gemv import gemv
from pagedllm.layers.ops.pdl import (
    allow_next_kernel,
    pdl_launch_options,
    wait_for_previous_kernel,
)

_WORDS_PER_ITERATION = 2048


@triton.jit
def _read_kernel(words_ptr, sums_ptr, words_per_program, BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr,
                 USE_PDL: tl.constexpr):
    """sums[pid] = the int32 sum of words[pid * words_per_program:][:words_per_program]."""
    wait_for_previous_kernel(USE_PDL)
    pid = tl.program_id(0)
    start = words_ptr + pid.to(tl.int64) * words_per_program
    total = tl.zeros([BLOCK], dtype=tl.int32)
    for offset in tl.range(0, words_per_program, BLOCK, num_stages=NUM_STAGES):
        total += tl.load(start + offset + tl.arange(0, BLOCK))
    allow_next_kernel(USE_PDL)
    tl.store(sums_ptr + pid, tl.sum(total, 0))


def read_seconds(weights: list[torch.Tensor], programs: int) -> float:
    """Seconds per read of one weight's bytes (rounded down to whole iterations of every
    program, then scaled back to the whole weight)."""
    words = [w.view(torch.int32).reshape(-1) for w in weights]
    per_program = words[0].numel() // programs // _WORDS_PER_ITERATION * _WORDS_PER_ITERATION
    sums = torch.empty(programs, dtype=torch.int32, device="cuda")
    options = pdl_launch_options(sums.device)

    def read(i: int) -> None:
        _read_kernel[(programs,)](words[i % len(words)], sums, per_program, BLOCK=_WORDS_PER_ITERATION,
                                  NUM_STAGES=3, num_warps=4, **options)

    return graph_seconds_per_call(read, _CALLS_PER_GRAPH, 20) * words[0].numel() / (per_program * programs)


def gemv_seconds(name: str, weights: list[torch.Tensor], scale: torch.Tensor | None) -> float:
    from pagedllm.layers.quantization.kernels.per_token_quant import per_token_quant

    x = torch.randn(1, weights[0].shape[1], device="cuda", dtype=torch.bfloat16)
    if scale is not None and name in ("qkv", "gate_up", "lm_head"):
        x_q, x_scale = per_token_quant(x, torch.float8_e4m3fn)

        def call(w: torch.Tensor) -> torch.Tensor:
            return gemv(x_q, w, weight_scale=scale, input_scale=x_scale, out_dtype=torch.bfloat16,
                        split_counts=_counts(w))
    else:
        def call(w: torch.Tensor) -> torch.Tensor:
            return gemv(x, w, weight_scale=scale, split_counts=_counts(w))

    return graph_seconds_per_call(lambda i: call(weights[i % len(weights)]), _CALLS_PER_GRAPH, 20)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--programs-per-sm", type=int, default=4, help="programs of the read kernel per SM")
    args = parser.parse_args()
    bandwidth = measure_copy_bandwidth()
    programs = args.programs_per_sm * torch.cuda.get_device_properties(0).multi_processor_count
    rows = [("measured copy bandwidth", f"{bandwidth / 1e12:.2f} TB/s")]
    for fp8 in (False, True):
        for name, in_features, out_features in SHAPES:
            if fp8 and name == "lm_head":
                continue  # the engine keeps the LM head in bf16
            weights, scale = _weights(out_features, in_features, fp8)
            num_bytes = weights[0].numel() * weights[0].element_size()
            floor = read_seconds(weights, programs)
            engine = gemv_seconds(name, weights, scale)
            rows.append((f"{'fp8' if fp8 else 'bf16'} {name} {in_features}->{out_features} ({num_bytes / 1e6:.1f} MB)", (
                f"read {floor * 1e6:6.2f} us ({num_bytes / floor / bandwidth:6.1%})  "
                f"GEMV {engine * 1e6:6.2f} us ({num_bytes / engine / bandwidth:6.1%})  "
                f"GEMV / read {engine / floor:.2f}"
            )))
            del weights
            torch.cuda.empty_cache()
    print_table(f"one-row GEMV against a read of its bytes, {args.programs_per_sm} read programs per SM, "
                f"{torch.cuda.get_device_name()}", rows)


if __name__ == "__main__":
    main()
