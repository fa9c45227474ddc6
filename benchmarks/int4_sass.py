"""Instruction mix of an int4 kernel's main loop, compiled offline for an H100/H200 (sm_90)
with the specializations a real launch gets (16-byte aligned pointers, sizes and row strides
divisible by 16, unit column strides). Needs Triton's bundled ptxas and cuobjdump, no GPU.

    PYTHONPATH=. python3 benchmarks/int4_sass.py [--kernel half2|fma|dot] [--block-n 64] [--stages 3]

half2: the one-row packed-fp16 GEMV (kernels/int4_half2.py); fma: the float32 GEMV
(kernels/triton_wNa16.py, act-order and 8-bit rows); dot: the tensor-core kernel for 2-16
rows (kernels/int4_dot.py). Prints the per-thread instructions of one loop iteration (one K tile of
BLOCK_K rows by BLOCK_N columns) by opcode, and per packed value.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pagedllm.layers.quantization.kernels import int4_dot, int4_half2, triton_wNa16

_FMA_ARGS = [("x_ptr", "*bf16"), ("qweight_ptr", "*i32"), ("scales_ptr", "*bf16"), ("zeros_ptr", "*bf16"),
         ("row_group_ptr", "*i32"), ("out_ptr", "*bf16"), ("workspace_ptr", "*fp32"), ("count_ptr", "*i32"),
         ("N", "i32"), ("K", "i32"), ("group_size", "i32"), ("stride_xk", "i32"), ("stride_qk", "i32"),
         ("stride_qn", "i32"), ("stride_sg", "i32"), ("stride_sn", "i32"), ("stride_zg", "i32"), ("stride_zn", "i32")]
_DOT_ARGS = [("x_ptr", "*bf16"), ("qweight_ptr", "*i32"), ("scales_ptr", "*bf16"), ("zeros_ptr", "*bf16"),
             ("out_ptr", "*bf16"), ("workspace_ptr", "*fp32"), ("count_ptr", "*i32"), ("M", "i32"), ("N", "i32"),
             ("K", "i32"), ("group_size", "i32"), ("stride_xm", "i32"), ("stride_qk", "i32"), ("stride_sg", "i32"),
             ("stride_zg", "i32"), ("stride_om", "i32")]
_HALF2_ARGS = [("x_pairs_ptr", "*i32"), ("qweight_ptr", "*i32"), ("scales_ptr", "*bf16"), ("zeros_ptr", "*bf16"),
               ("out_ptr", "*bf16"), ("workspace_ptr", "*fp32"), ("count_ptr", "*i32"), ("positions_ptr", "*i64"),
               ("cos_ptr", "*fp32"), ("sin_ptr", "*fp32"), ("stride_cos", "i32"), ("rotated_columns", "i32"),
               ("N", "i32"), ("K", "i32"),
               ("stride_qk", "i32"), ("stride_sg", "i32"), ("stride_zg", "i32")]
_DIVISIBLE_BY_16 = {"N", "K", "group_size", "stride_xm", "stride_qk", "stride_sg", "stride_zg", "stride_om"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=["half2", "fma", "dot"], default="half2")
    parser.add_argument("--block-n", type=int, default=64)
    parser.add_argument("--block-k", type=int, default=128)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--warps", type=int, default=4)
    args = parser.parse_args()
    tile = {"SPLIT_K": 8, "SELF_MERGE": True, "BLOCK_N": args.block_n, "BLOCK_K": args.block_k,
            "NUM_STAGES": args.stages}
    if args.kernel == "fma":
        kernel_fn, arg_list = triton_wNa16._int_group_gemv_kernel, _FMA_ARGS
        constants = {"BITS": 4, "HAS_ROW_GROUP": False, "INTERP": False, **tile,
                     "stride_xk": 1, "stride_qn": 1, "stride_sn": 1, "stride_zn": 1}
    elif args.kernel == "half2":
        kernel_fn, arg_list = int4_half2._int4_half2_gemv_kernel, _HALF2_ARGS
        # No epilogue (ops/epilogue.py): the plain GEMV's loop.
        constants = {"INTERP": False, "TILES_PER_GROUP": 1, "EVEN_N": True, "X_PAIRS": 512, "IS_BF16": True,
                     "EPILOGUE": 0, "ROPE_HALF": 64, "EPILOGUE_RUN": 1, **tile}
    else:
        kernel_fn, arg_list = int4_dot._int4_dot_kernel, _DOT_ARGS
        constants = {"BASE": int4_dot._BF16_BASE, "INTERP": False, **tile}
    signature = dict(arg_list)
    signature.update({name: "constexpr" for name in constants if name not in signature})
    attrs = {(index,): [["tt.divisibility", 16]] for index, (name, kind) in enumerate(arg_list)
             if kind.startswith("*") or name in _DIVISIBLE_BY_16}
    source = ASTSource(kernel_fn, signature, constants, attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": args.warps, "num_stages": args.stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([cuobjdump, "-sass", cubin.name], check=True, capture_output=True, text=True).stdout
    lines = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    # The main loop: the longest backward branch.
    branches = [(address, int(target, 16)) for address, text in lines
                if (target := (re.search(r"BRA (0x[0-9a-f]+)", text) or [None, None])[1]) and int(target, 16) < address]
    end, start = max(branches, key=lambda branch: branch[0] - branch[1])
    opcodes = collections.Counter(re.sub(r"^@!?U?P[T0-9]+\s+", "", text).split()[0].split(".")[0]
                                  for address, text in lines if start <= address <= end)
    total = sum(opcodes.values())
    values_per_thread = args.block_k * args.block_n // (32 * args.warps)
    print(f"int4 {args.kernel} kernel, tile {args.block_k} x {args.block_n}, {args.warps} warps, {args.stages} stages: "
          f"{total} instructions per loop iteration per thread, {values_per_thread} packed values each, "
          f"{total / values_per_thread:.1f} per value")
    for opcode, count in opcodes.most_common(16):
        print(f"  {opcode:<8}{count:5d}")


if __name__ == "__main__":
    main()
