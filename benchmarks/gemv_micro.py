"""Decode-sized matmuls of Llama-3.1-8B (1-8 rows): cuBLAS (F.linear; torch._scaled_mm for fp8)
against the Triton GEMV of layers/ops/gemv.py, as achieved bandwidth (weight + activation +
output bytes over time) and its fraction of the device-to-device copy bandwidth measured in the
same run. Timed inside CUDA graphs (20 calls per replay, rotating through weight copies so that
no call finds its weight in L2), as the engine runs them.

    PYTHONPATH=. python3 benchmarks/gemv_micro.py [--rows 1 2 4 8] [--fp8]
    PYTHONPATH=. python3 benchmarks/gemv_micro.py --fp8 --quantized-input  # rows quantized before
    PYTHONPATH=. python3 benchmarks/gemv_micro.py --sweep bf16|fp8|fp8q [--json out.json]   # tile search
    PYTHONPATH=. python3 benchmarks/gemv_micro.py --epilogues   # gate_up and qkv with and without theirs
    PYTHONPATH=. python3 benchmarks/gemv_micro.py --activation-costs   # fp8 rows quantized in the GEMV or before
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from benchmarks.common import graph_seconds_per_call, measure_copy_bandwidth, print_table
from pagedllm.layers.ops.gemv import DOT, DOT_SWAPPED, FMA, GemvConfig, default_config, gemv
from pagedllm.layers.ops.split_k import split_count_buffer

# (name, in_features K, out_features N) per Llama-3.1-8B layer, tensor_parallel_size=1.
SHAPES = [
    ("qkv", 4096, 6144),
    ("o", 4096, 4096),
    ("gate_up", 4096, 28672),
    ("down", 14336, 4096),
    ("lm_head", 4096, 128256),
]
# Which dimension each layer splits over ranks: column-parallel layers split N, row-parallel K.
_ROW_PARALLEL = ("o", "down")


def rank_shapes(tensor_parallel_size: int) -> list[tuple[str, int, int]]:
    """SHAPES as one rank of `tensor_parallel_size` holds them."""
    return [(name, k // tensor_parallel_size, n) if name in _ROW_PARALLEL else (name, k, n // tensor_parallel_size)
            for name, k, n in SHAPES]

CALLS_PER_GRAPH = 20
# Weight copies rotated through: enough bytes that L2 (50 MB) holds none of them between calls.
_ROTATION_BYTES = 256 << 20

SWEEP_CONFIGS = {
    "bf16": (
        [GemvConfig(bn, bk, FMA, warps, stages) for bn, bk in [(8, 512), (16, 256), (16, 512), (32, 256), (8, 1024)]
         for warps in (4, 8) for stages in (3, 4)]
        + [GemvConfig(bn, bk, DOT, 4, stages) for bn, bk in [(16, 128), (32, 128), (32, 256), (64, 128)] for stages in (3, 4)]
        + [GemvConfig(bn, bk, DOT_SWAPPED, 4, stages) for bn, bk in [(64, 128), (128, 128), (64, 256)] for stages in (3, 4)]
        # Split K: more programs for the small weights (o: 64 programs of 64 rows).
        + [GemvConfig(bn, bk, inner, 4, stages, split_k=split) for inner, bn, bk, stages in
           [(FMA, 8, 512, 3), (DOT_SWAPPED, 64, 256, 4), (DOT_SWAPPED, 64, 128, 4), (DOT, 32, 256, 4)]
           for split in (2, 4)]
    ),
    "fp8": (
        [GemvConfig(bn, bk, FMA, warps, stages) for bn, bk in [(8, 512), (8, 1024), (16, 512), (32, 256)]
         for warps in (4, 8) for stages in (3, 4)]
        + [GemvConfig(bn, bk, inner, 4, stages, split_k=split) for inner, bn, bk in
           [(DOT_SWAPPED, 64, 128), (DOT_SWAPPED, 64, 256), (DOT_SWAPPED, 128, 128), (DOT, 32, 128), (DOT, 64, 256)]
           for stages in (3, 5) for split in (1, 2, 4)]
    ),
    # fp8 rows quantized by the kernel that produced them (an RMSNorm or SiLU-and-mul): the
    # GEMV's own time only.
    "fp8q": [
        GemvConfig(bn, bk, FMA, warps, stages) for bn, bk in [(16, 512), (32, 256), (32, 512), (8, 1024)]
        for warps in (4, 8) for stages in (3, 4)
    ] + [
        GemvConfig(bn, bk, DOT_SWAPPED, warps, stages, split_k=split)
        for bn, bk, warps, stages in [(64, 256, 4, 5), (64, 128, 4, 8), (128, 128, 4, 6), (32, 256, 4, 8),
                                      (64, 512, 4, 3)]
        for split in (1, 2, 3, 4, 6)
    ],
}


def rotated_weights(out_features: int, in_features: int, fp8: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Copies of one random [out_features, in_features] weight, enough that calls rotating
    through them find none in L2: bf16, or fp8 with its per-channel scales."""
    elem = 1 if fp8 else 2
    copies = max(1, min(8, math.ceil(_ROTATION_BYTES / (out_features * in_features * elem))))
    base = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) / in_features**0.5
    if not fp8:
        return [base] + [base.clone() for _ in range(copies - 1)], None
    scale = (base.float().abs().amax(dim=1) / 448.0).clamp(min=1e-12)
    quantized = (base.float() / scale[:, None]).to(torch.float8_e4m3fn)
    return [quantized] + [quantized.clone() for _ in range(copies - 1)], scale


def _reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None):
    if scale is None:
        return F.linear(x, weight)
    from pagedllm.layers.quantization.kernels.per_token_quant import per_token_quant
    from pagedllm.layers.quantization.kernels.w8a8 import scaled_mm_fp8

    x_q, x_scale = per_token_quant(x, torch.float8_e4m3fn)
    return scaled_mm_fp8(x_q, x_scale, weight, scale, None, x.dtype)


_SPLIT_COUNTS: dict[int, torch.Tensor] = {}


def split_counts_for(weight: torch.Tensor) -> torch.Tensor:
    """One count buffer per output width, as each layer holds its own (made outside graphs)."""
    out_features = weight.shape[0]
    if out_features not in _SPLIT_COUNTS:
        _SPLIT_COUNTS[out_features] = split_count_buffer(out_features, weight.device)
    return _SPLIT_COUNTS[out_features]


def _fused_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, config: GemvConfig | None):
    return gemv(x, weight, weight_scale=scale, config=config, split_counts=split_counts_for(weight))


def _prequantized_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, config: GemvConfig | None):
    from pagedllm.layers.quantization.kernels.per_token_quant import per_token_quant

    x_q, x_scale = per_token_quant(x, torch.float8_e4m3fn)
    return gemv(x_q, weight, weight_scale=scale, input_scale=x_scale, config=config, out_dtype=x.dtype,
                split_counts=split_counts_for(weight))


def _quantized_input_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                          config: GemvConfig | None):
    return gemv(x[0], weight, weight_scale=scale, input_scale=x[1], config=config, out_dtype=torch.bfloat16,
                split_counts=split_counts_for(weight))


def _epilogue_costs(rows: list[int]) -> list[tuple[str, str]]:
    """µs per call of the gate_up GEMV with and without SiLU-and-mul in its epilogue, and of the
    qkv GEMV with and without rope (ops/epilogue.py), bf16 and fp8 rows quantized before, with
    the separate kernel each epilogue replaces timed alone."""
    from pagedllm.layers.ops.epilogue import RopeEpilogue, SiluAndMulEpilogue
    from pagedllm.layers.ops.rotary import apply_rotary
    from pagedllm.layers.ops.silu_and_mul import silu_and_mul
    from pagedllm.layers.quantization.kernels.per_token_quant import per_token_quant
    from pagedllm.layers.rotary_embedding import get_rope

    head, q_size, kv_size = 128, 4096, 1024
    rope = get_rope(head, 8192, {"rope_type": "default", "rope_theta": 500000.0})
    cos, sin = rope.cos_cache.cuda(), rope.sin_cache.cuda()
    table = []
    for fp8 in (False, True):
        for name, in_features, out_features in SHAPES[:3:2]:
            weights, scale = rotated_weights(out_features, in_features, fp8)
            for num_rows in rows:
                x = torch.randn(num_rows, in_features, device="cuda", dtype=torch.bfloat16)
                operand = per_token_quant(x, torch.float8_e4m3fn) if fp8 else (x, None)
                positions = torch.randint(0, 8192, (num_rows,), device="cuda")
                epilogue = (RopeEpilogue(positions, cos, sin, head, q_size + kv_size) if name == "qkv"
                            else SiluAndMulEpilogue())

                def call(w, epilogue=None):
                    return gemv(operand[0], w, weight_scale=scale, input_scale=operand[1], epilogue=epilogue,
                                out_dtype=torch.bfloat16, split_counts=split_counts_for(w))

                plain = graph_seconds_per_call(lambda i: call(weights[i % len(weights)]), CALLS_PER_GRAPH, 20)
                fused = graph_seconds_per_call(lambda i: call(weights[i % len(weights)], epilogue), CALLS_PER_GRAPH, 20)
                out = call(weights[0])
                if name == "qkv":
                    separate = graph_seconds_per_call(lambda i: apply_rotary(
                        positions, out[:, :q_size], out[:, q_size:q_size + kv_size], cos, sin, head, head),
                        CALLS_PER_GRAPH, 20)
                else:
                    separate = graph_seconds_per_call(lambda i: silu_and_mul(out), CALLS_PER_GRAPH, 20)
                table.append((f"{'fp8 ' if fp8 else ''}{name}, M={num_rows}", (
                    f"GEMV {plain * 1e6:.2f} us, with {'rope' if name == 'qkv' else 'SiLU-and-mul'} "
                    f"{fused * 1e6:.2f} us (+{(fused - plain) * 1e6:.2f}); the separate kernel {separate * 1e6:.2f} us"
                )))
            del weights
            torch.cuda.empty_cache()
    return table


def _activation_costs() -> list[tuple[str, str]]:
    """The one-row fp8 GEMV (its default tiles) on o, down and qkv with bf16 rows: activations
    quantized in the kernel per token (a pass for the row's largest value, then a division
    per value), with a static scale (the division only), and rows quantized before (neither):
    where the in-kernel quantization's time goes."""
    from pagedllm.layers.quantization.kernels.per_token_quant import per_token_quant

    bandwidth = measure_copy_bandwidth()
    table = [("measured copy bandwidth", f"{bandwidth / 1e12:.2f} TB/s")]
    for name, in_features, out_features in SHAPES:
        if name not in ("o", "down", "qkv"):
            continue
        weights, scale = rotated_weights(out_features, in_features, fp8=True)
        x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
        static_scale = torch.tensor([0.01], device="cuda")
        x_q, x_scale = per_token_quant(x, torch.float8_e4m3fn)
        variants = {
            "per token in the kernel": lambda w: gemv(x, w, weight_scale=scale),
            "static scale": lambda w: gemv(x, w, weight_scale=scale, input_scale=static_scale),
            "rows quantized before": lambda w: gemv(x_q, w, weight_scale=scale, input_scale=x_scale,
                                                    out_dtype=torch.bfloat16),
        }
        cells = []
        for label, fn in variants.items():
            seconds = graph_seconds_per_call(lambda i, fn=fn: fn(weights[i % len(weights)]), CALLS_PER_GRAPH, 20)
            cells.append(f"{label} {seconds * 1e6:.2f} us ({out_features * in_features / seconds / bandwidth:.1%})")
        table.append((f"fp8 {name}, M=1", ", ".join(cells)))
        del weights
        torch.cuda.empty_cache()
    return table


def _rate(fn, weights: list[torch.Tensor], num_bytes: int) -> float:
    return num_bytes / graph_seconds_per_call(lambda i: fn(weights[i % len(weights)]), CALLS_PER_GRAPH, 20)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=None,
                        help="rows per call (default 1 2 4 8; with --sweep 1 4 8)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="the shapes one rank of this many holds")
    parser.add_argument("--shapes", nargs="+", choices=[name for name, _, _ in SHAPES], default=None,
                        help="only these layers (default: all)")
    parser.add_argument("--fp8", action="store_true", help="fp8 weights (dynamic per-token activations)")
    parser.add_argument("--sweep", choices=sorted(SWEEP_CONFIGS), default=None,
                        help="time every tile of SWEEP_CONFIGS for bf16 or fp8 weights (fp8: also with the "
                             "activations quantized by a separate launch first)")
    parser.add_argument("--quantized-input", action="store_true",
                        help="with --fp8: the rows arrive quantized (by the norm or activation kernel before)")
    parser.add_argument("--json", default=None, help="write the sweep's timings here")
    parser.add_argument("--epilogues", action="store_true",
                        help="gate_up and qkv with and without their epilogues (SiLU-and-mul, rope)")
    parser.add_argument("--activation-costs", action="store_true",
                        help="one-row fp8 o, down and qkv with activations quantized in the kernel, with a static "
                             "scale, and quantized before")
    args = parser.parse_args()
    if args.activation_costs:
        print_table(f"fp8 activation quantization in the GEMV, {torch.cuda.get_device_name()}", _activation_costs())
        return
    if args.epilogues:
        print_table(f"GEMV epilogues, Llama-3.1-8B shapes, {torch.cuda.get_device_name()}",
                    _epilogue_costs(args.rows or [1, 2, 4, 8]))
        return
    # measure_copy_bandwidth counts bytes read + written; a GEMV only reads, so its limit is
    # the same bytes per second of traffic.
    bandwidth = measure_copy_bandwidth()
    rows_out = [("measured copy bandwidth", f"{bandwidth / 1e12:.2f} TB/s")]
    sweep_records = []
    worst = 1.0
    quantized_input = args.sweep == "fp8q" or (args.fp8 and args.quantized_input)
    for fp8 in ((args.sweep in ("fp8", "fp8q"),) if args.sweep else (args.fp8,)):
        for name, in_features, out_features in rank_shapes(args.tensor_parallel_size):
            if args.shapes and name not in args.shapes:
                continue
            weights, scale = rotated_weights(out_features, in_features, fp8)
            for num_rows in args.rows or ((1, 4, 8) if args.sweep else (1, 2, 4, 8)):
                x = torch.randn(num_rows, in_features, device="cuda", dtype=torch.bfloat16)
                num_bytes = weights[0].numel() * weights[0].element_size() + x.numel() * 2 + num_rows * out_features * 2
                label = f"{'fp8 ' if fp8 else ''}{name} {in_features}->{out_features}, M={num_rows}"
                expected = _reference(x, weights[0], scale)
                baseline = _rate(lambda w: _reference(x, w, scale), weights, num_bytes)
                configs = [None]
                if args.sweep:
                    configs = [c for c in SWEEP_CONFIGS[args.sweep] if c.inner != FMA or num_rows == 1]
                variants = [(config, False) for config in configs]
                if args.sweep == "fp8":
                    variants += [(config, True) for config in configs if config.inner != FMA]
                timings = []
                for config, prequantize in variants:
                    fn, operand = (_prequantized_gemv if prequantize else _fused_gemv), x
                    if quantized_input:
                        from pagedllm.layers.quantization.kernels.per_token_quant import per_token_quant

                        fn, operand = _quantized_input_gemv, per_token_quant(x, torch.float8_e4m3fn)
                    got = fn(operand, weights[0], scale, config)
                    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
                    rate = _rate(lambda w: fn(operand, w, scale, config), weights, num_bytes)
                    config = config or default_config(num_rows, out_features, in_features, weights[0].dtype,
                                                      quantized_input=quantized_input)
                    note = " after per_token_quant" if prequantize else " on quantized rows" if quantized_input else ""
                    timings.append((rate, f"{config}{note}"))
                timings.sort(key=lambda item: -item[0])
                best_rate, best_config = timings[0]
                worst = min(worst, max(best_rate, baseline) / bandwidth)
                rows_out.append((label, (
                    f"{'_scaled_mm' if fp8 else 'cuBLAS'} {baseline / bandwidth:.1%}  "
                    f"Triton {best_rate / bandwidth:.1%} ({best_config})"
                )))
                sweep_records.append({
                    "shape": name, "fp8": fp8, "rows": num_rows, "baseline": baseline / bandwidth,
                    "configs": [(rate / bandwidth, config) for rate, config in timings],
                })
            del weights
            torch.cuda.empty_cache()
    rows_out.append(("worst shape, best kernel (target >= 90%)", f"{worst:.1%}"))
    ranks = f", one rank of {args.tensor_parallel_size}" if args.tensor_parallel_size > 1 else ""
    print_table(f"GEMV micro-benchmark, Llama-3.1-8B shapes{ranks}, {torch.cuda.get_device_name()}", rows_out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(sweep_records, f, indent=1)


if __name__ == "__main__":
    main()
