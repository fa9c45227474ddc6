"""Micro-benchmark of the Triton int4 weight-only GEMM (kernels/triton_wNa16.py;
kernels/int4_half2.py for one 4-bit row, kernels/int4_dot.py for 2-16) on Llama-3.1-8B's linear
shapes, group size 128, bf16 activations.

For each shape and M in (1, 8, 256): the kernel's time, its achieved bandwidth (quantized
bytes: packed weight + scales + zeros, divided by the time), that bandwidth as a fraction of
the device-to-device copy bandwidth measured in the same run, and the bf16 cuBLAS matmul time
of the same shape with its speed-up. Timings are medians of CUDA-graph replays rotating over
enough weight copies to exceed the L2 cache, so weights come from HBM as in a real step.

    PYTHONPATH=. python3 benchmarks/int4_gemm.py [--bits 4|8] [--sweep] [--sweep-rows 1 8] [--prefill]

--prefill compares, per M from 16 to 4096, the Triton GEMM with the dequantize-then-cuBLAS path
(kernels/int_dequant.py) and bf16.

--sweep also times alternative tile/split-K configurations at the --sweep-rows sizes (M <= 8)
and prints the best per shape (to tune `int4_half2.default_config`, `int4_dot.default_config`,
or `_launch_config` for 8 bits). At one row it also times the float32 FMA GEMV.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton

from benchmarks.common import graph_seconds_per_call, measure_copy_bandwidth
from pagedllm.layers.ops.split_k import split_count_buffer, split_for
from pagedllm.layers.quantization.kernels.int4_dot import default_config as int4_dot_default_config
from pagedllm.layers.quantization.kernels.int4_dot import int4_dot_matmul
from pagedllm.layers.quantization.kernels.int4_half2 import default_config as int4_half2_default_config
from pagedllm.layers.quantization.kernels.int4_half2 import int4_half2_gemv
from pagedllm.layers.quantization.kernels import int_dequant
from pagedllm.layers.quantization.kernels.int_group import pack_internal
from pagedllm.layers.quantization.kernels.triton_wNa16 import _launch_config, triton_int_group_matmul

# name -> (input features K, output features N) of Llama-3.1-8B's fused linear layers.
SHAPES = {
    "qkv 4096->6144": (4096, 6144),
    "o 4096->4096": (4096, 4096),
    "gate_up 4096->28672": (4096, 28672),
    "down 14336->4096": (14336, 4096),
}
ROWS = (1, 8, 256)
PREFILL_ROWS = (16, 32, 48, 64, 128, 256, 1024, 4096)
GROUP_SIZE = 128
DTYPE = torch.bfloat16
L2_BYTES = 50 * 2**20


def time_rotating(fn, copies: int, replays: int = 30) -> float:
    """Median seconds per call of fn(i) for i over `copies` weight copies (at least 8 calls per
    graph), so successive calls read from HBM, not L2."""
    return graph_seconds_per_call(lambda i: fn(i % copies), max(copies, 8), replays)


def make_weights(k: int, n: int, bits: int, copies: int):
    groups = k // GROUP_SIZE
    layouts = []
    for _ in range(copies):
        q = torch.randint(0, 2**bits, (k, n), device="cuda", dtype=torch.int32)
        layouts.append((
            pack_internal(q, bits),
            (torch.rand(groups, n, device="cuda") * 1e-3).to(DTYPE),
            torch.full((groups, n), float(2 ** (bits - 1)), device="cuda", dtype=DTYPE),
        ))
    return layouts


def copies_for(num_bytes: int) -> int:
    return max(2, -(-3 * L2_BYTES // num_bytes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-rows", type=int, nargs="+", default=[1, 8], choices=(1, 8))
    parser.add_argument("--prefill", action="store_true",
                        help="prefill sizes: the in-tile Triton GEMM against dequantize + cuBLAS, per M")
    args = parser.parse_args()
    copy_bandwidth = measure_copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth (read + write): {copy_bandwidth / 1e12:.2f} TB/s")
    print(f"int{args.bits} weights, group size {GROUP_SIZE}, {str(DTYPE).removeprefix('torch.')} activations")
    if args.prefill:
        prefill(args.bits)
        return
    header = f"{'shape':<22}{'M':>5}{'int time':>11}{'GB/s':>8}{'of copy':>9}{'bf16 time':>11}{'speed-up':>10}"
    print(header)
    for name, (k, n) in SHAPES.items():
        quant_bytes = k * n * args.bits // 8 + 2 * (k // GROUP_SIZE) * n * 2
        copies = copies_for(quant_bytes)
        layouts = make_weights(k, n, args.bits, copies)
        dense_copies = copies_for(k * n * 2)
        dense = [torch.randn(k, n, device="cuda", dtype=DTYPE) * 0.01 for _ in range(dense_copies)]
        counts = split_count_buffer(n, torch.device("cuda"))
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=DTYPE)
            int_time = time_rotating(
                lambda i: triton_int_group_matmul(x, *layouts[i], args.bits, GROUP_SIZE, split_counts=counts),
                copies)
            dense_time = time_rotating(lambda i: torch.matmul(x, dense[i]), dense_copies)
            bandwidth = quant_bytes / int_time
            print(f"{name:<22}{m:>5}{int_time * 1e6:>9.1f}us{bandwidth / 1e9:>8.0f}"
                  f"{bandwidth / copy_bandwidth:>9.0%}{dense_time * 1e6:>9.1f}us{dense_time / int_time:>9.2f}x")
            if args.sweep and m in args.sweep_rows:
                sweep(x, layouts, copies, args.bits, quant_bytes, copy_bandwidth, k, n)
        del layouts, dense
        torch.cuda.empty_cache()


def prefill(bits: int) -> None:
    """Per shape and M: the Triton GEMM that unpacks inside its tiles (64- and 128-row tiles),
    the dequantize-then-cuBLAS path (kernels/int_dequant.py) and bf16 cuBLAS, as times and as
    fractions of bf16's speed: where DEQUANT_MIN_ROWS should sit."""
    print(f"{'shape':<22}{'M':>6}{'tiles 64':>11}{'tiles 128':>11}{'dequant':>11}{'bf16':>10}"
          f"{'dequant/bf16':>14}   (dequant alone)")
    for name, (k, n) in SHAPES.items():
        quant_bytes = k * n * bits // 8 + 2 * (k // GROUP_SIZE) * n * 2
        copies = copies_for(quant_bytes)
        layouts = make_weights(k, n, bits, copies)
        dense_copies = copies_for(k * n * 2)
        dense = [torch.randn(k, n, device="cuda", dtype=DTYPE) * 0.01 for _ in range(dense_copies)]
        alone = time_rotating(lambda i: int_dequant.dequantize(*layouts[i], bits, GROUP_SIZE), copies)
        for m in PREFILL_ROWS:
            x = torch.randn(m, k, device="cuda", dtype=DTYPE)
            tiled = []
            # _launch_config's two tile shapes at every M: 64 rows (split to about four
            # programs per SM) and 128 rows with eight warps (about two per SM).
            for block_m, warps, per_sm in ((64, 4, 4), (128, 8, 2)):
                tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 128)
                config = {"BLOCK_M": block_m, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": warps, "num_stages": 3,
                          "SPLIT_K": split_for(tiles, k // 64, per_sm, x.device)}
                tiled.append(time_rotating(
                    lambda i, config=config: triton_int_group_matmul(x, *layouts[i], bits, GROUP_SIZE, config=config),
                    copies, replays=10))
            dequant = time_rotating(lambda i: int_dequant.dequantize_matmul(x, *layouts[i], bits, GROUP_SIZE), copies,
                                    replays=10)
            dense_time = time_rotating(lambda i: torch.matmul(x, dense[i]), dense_copies, replays=10)
            print(f"{name:<22}{m:>6}{tiled[0] * 1e6:>9.1f}us{tiled[1] * 1e6:>9.1f}us{dequant * 1e6:>9.1f}us"
                  f"{dense_time * 1e6:>8.1f}us{dense_time / dequant:>13.2f}x   ({alone * 1e6:.1f}us)")
        del layouts, dense
        torch.cuda.empty_cache()


def sweep(x, layouts, copies, bits, quant_bytes, copy_bandwidth, k, n) -> None:
    if bits == 4 and x.shape[0] == 1:
        sweep_half2(x, layouts, copies, quant_bytes, copy_bandwidth, k, n)
        return
    if bits == 4:
        sweep_int4_dot(x, layouts, copies, quant_bytes, copy_bandwidth, k, n)
        return
    m = x.shape[0]
    counts = split_count_buffer(n, x.device)
    grid = ([(1, block_n, split_k, 4, stages) for block_n, split_k, stages
             in itertools.product((64, 128, 256), (1, 2, 4, 8, 16), (3, 5))] if m == 1 else
            [(16, block_n, split_k, 4, 3) for block_n, split_k in itertools.product((64, 128), (2, 4, 8))])
    configs = [{"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 128, "SPLIT_K": split_k, "num_warps": warps,
                "num_stages": stages} for block_m, block_n, split_k, warps, stages in grid]
    results = time_configs(
        lambda i, config: triton_int_group_matmul(x, *layouts[i], bits, GROUP_SIZE, config=config,
                                                  split_counts=counts),
        configs, k, copies)
    print_best(results, m, quant_bytes, copy_bandwidth, _launch_config(m, n, k, GROUP_SIZE, x.device))


def sweep_int4_dot(x, layouts, copies, quant_bytes, copy_bandwidth, k, n) -> None:
    """The tensor-core kernel (kernels/int4_dot.py) that serves 4-bit M <= 16."""
    counts = split_count_buffer(n, x.device)
    configs = [{"BLOCK_N": block_n, "BLOCK_K": 128, "SPLIT_K": split_k, "num_warps": warps, "num_stages": stages}
               for block_n, split_k, stages, warps in itertools.product((64, 128, 256), (1, 2, 4, 8, 16), (3, 5), (4, 8))
               if not (warps == 8 and block_n < 256)]
    results = time_configs(
        lambda i, config: int4_dot_matmul(x, *layouts[i], GROUP_SIZE, split_counts=counts, config=config),
        configs, k, copies)
    print_best(results, x.shape[0], quant_bytes, copy_bandwidth, int4_dot_default_config(n, k, GROUP_SIZE, x.device))


def sweep_half2(x, layouts, copies, quant_bytes, copy_bandwidth, k, n) -> None:
    """The packed-fp16 GEMV (kernels/int4_half2.py) that serves one 4-bit row, then the float32
    FMA GEMV it replaced at that one's launch rule."""
    counts = split_count_buffer(n, x.device)
    grid = ([(block_n, split_k, 3, 4) for block_n in (64, 128, 256) for split_k in (1, 2, 4, 8, 16)]
            + [(256, split_k, stages, 4) for split_k in (2, 4, 8, 16) for stages in (2, 4, 6)]
            + [(256, split_k, 3, 8) for split_k in (2, 4, 8, 16)])
    configs = [{"BLOCK_N": block_n, "BLOCK_K": 128, "SPLIT_K": split_k, "num_warps": warps, "num_stages": stages}
               for block_n, split_k, stages, warps in grid]
    results = time_configs(
        lambda i, config: int4_half2_gemv(x, *layouts[i], GROUP_SIZE, split_counts=counts, config=config),
        configs, k, copies)
    print_best(results, 1, quant_bytes, copy_bandwidth, int4_half2_default_config(n, k, GROUP_SIZE, x.device))
    fma_config = _launch_config(1, n, k, GROUP_SIZE, x.device)
    seconds = time_rotating(
        lambda i: triton_int_group_matmul(x, *layouts[i], 4, GROUP_SIZE, config=fma_config, split_counts=counts),
        copies, replays=10)
    print(f"    FMA kernel M=1: {seconds * 1e6:7.1f}us {quant_bytes / seconds / copy_bandwidth:5.0%} of copy")


def time_configs(run, configs, k, copies) -> list[tuple[float, dict[str, int]]]:
    """(seconds, config) of run(weight copy, config) for each config whose splits each get a
    K tile; a config the compiler or the launcher rejects is reported and skipped."""
    results = []
    for config in configs:
        if config["SPLIT_K"] > k // config["BLOCK_K"]:
            continue
        try:
            seconds = time_rotating(lambda i, config=config: run(i, config), copies, replays=10)
        except Exception as error:  # noqa: BLE001 - a rejected config is skipped
            print(f"    skipped {config}: {type(error).__name__}")
            continue
        results.append((seconds, config))
    return results


def print_best(results, m, quant_bytes, copy_bandwidth, default) -> None:
    """The two best configurations, then the best of each other tile width."""
    results.sort(key=lambda item: item[0])
    widths = {config["BLOCK_N"] for _, config in results[:2]}
    shown = results[:2]
    for seconds, config in results[2:]:
        if config["BLOCK_N"] not in widths:
            widths.add(config["BLOCK_N"])
            shown.append((seconds, config))
    for seconds, config in shown:
        print(f"    sweep M={m}: {seconds * 1e6:7.1f}us {quant_bytes / seconds / copy_bandwidth:5.0%} of copy  {config}")
    print(f"    default: {default}")


if __name__ == "__main__":
    main()
