"""Decode-sized matmuls of Llama-3.1-8B (bf16, 1-8 rows): cuBLAS (F.linear) against the split-K
Triton GEMV, as achieved bandwidth (weight + activation bytes over time) and its fraction of
the device-to-device copy bandwidth measured in the same run. Timed inside CUDA graphs
(20 calls per replay), as the engine runs them.

    PYTHONPATH=. python3 benchmarks/gemv_micro.py [--rows 1 2 4 8]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import graph_seconds_per_call, measure_copy_bandwidth, print_table
from pagedllm.layers.ops.gemv import gemv

# (name, in_features K, out_features N) per Llama-3.1-8B layer, tensor_parallel_size=1.
SHAPES = [
    ("qkv", 4096, 6144),
    ("o", 4096, 4096),
    ("gate_up", 4096, 28672),
    ("down", 14336, 4096),
    ("lm_head", 4096, 128256),
]
_CALLS_PER_GRAPH = 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    # measure_copy_bandwidth counts bytes read + written; a GEMV only reads, so its limit is
    # the same bytes per second of traffic.
    bandwidth = measure_copy_bandwidth()
    rows_out = [("measured copy bandwidth", f"{bandwidth / 1e12:.2f} TB/s")]
    worst_triton = 1.0
    for name, in_features, out_features in SHAPES:
        weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) / in_features**0.5
        for num_rows in args.rows:
            x = torch.randn(num_rows, in_features, device="cuda", dtype=torch.bfloat16)
            num_bytes = weight.numel() * 2 + x.numel() * 2 + num_rows * out_features * 2
            torch.testing.assert_close(gemv(x, weight), F.linear(x, weight), rtol=2e-2, atol=2e-2)
            cublas = num_bytes / graph_seconds_per_call(lambda i: F.linear(x, weight), _CALLS_PER_GRAPH, 20)
            triton_rate = num_bytes / graph_seconds_per_call(lambda i: gemv(x, weight), _CALLS_PER_GRAPH, 20)
            worst_triton = min(worst_triton, max(triton_rate, cublas) / bandwidth)
            rows_out.append((
                f"{name} {in_features}->{out_features}, M={num_rows}",
                f"cuBLAS {cublas / 1e12:.2f} TB/s ({cublas / bandwidth:.1%})  "
                f"Triton split-K {triton_rate / 1e12:.2f} TB/s ({triton_rate / bandwidth:.1%})  "
                f"best {'Triton' if triton_rate > cublas else 'cuBLAS'}",
            ))
        del weight
    rows_out.append(("worst shape, best kernel (target >= 90%)", f"{worst_triton:.1%}"))
    print_table(f"GEMV micro-benchmark, Llama-3.1-8B shapes, bf16, {torch.cuda.get_device_name()}", rows_out)


if __name__ == "__main__":
    main()
