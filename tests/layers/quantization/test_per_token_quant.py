"""The Triton per-token quantization kernel under the Triton interpreter (a subprocess with
TRITON_INTERPRET=1, read when Triton compiles the kernel): int8 values and every scale equal
the torch reference exactly. (The interpreter's own fp32→fp8 conversion mis-rounds values
just below a power of two, so fp8 bits are checked on the GPU, tests/gpu/test_quantization_gpu.py.)"""

from __future__ import annotations

from triton_interpreter import run_interpreted

SCRIPT = """
import torch
from pagedllm.layers.quantization.kernels.per_token_quant import per_token_quant
from pagedllm.layers.quantization.kernels.w8a8 import FP8_DTYPE, quantize_activation
torch.manual_seed(0)
x = torch.randn(5, 300) * 3
x[2] = 0.0  # an all-zero token keeps a positive scale
q, scale = per_token_quant(x, torch.int8)
ref_q, ref_scale, _ = quantize_activation(x, torch.int8, None, None, True, None)
assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)
_, fp8_scale = per_token_quant(x, FP8_DTYPE)
assert torch.equal(fp8_scale, quantize_activation(x, FP8_DTYPE, None, None, True, None)[1])
print("ok")
"""


def test_per_token_quant_kernel_matches_torch_in_the_interpreter() -> None:
    run_interpreted(SCRIPT)
