"""RMSNorm (alone and with the residual add) quantizing its own output per token to fp8 or int8 gives
exactly what quantizing its plain output gives (the torch expression of
kernels.w8a8.quantize_activation), and the residual stream is unchanged: on the CPU under the
Triton interpreter (a subprocess, so TRITON_INTERPRET=1 is set before Triton is imported) in
float32, and on the GPU in bf16. Then the fp8 linear layer fed such an activation equals the
dequantized reference (GPU)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from triton_interpreter import run_interpreted

_CHECK = """
import itertools

import torch
from pagedllm.layers.ops.fused_rms_norm import fused_add_rms_norm, rms_norm
from pagedllm.layers.quantization.kernels.w8a8 import quantize_activation

FP8 = torch.float8_e4m3fn


def check(quantized, plain, qdtype):
    q, scale, _ = quantize_activation(plain, qdtype, None, None, True, None)
    assert quantized.dtype == plain.dtype and quantized.data.shape == plain.shape
    assert torch.equal(quantized.scale, scale.reshape(-1)), (quantized.scale, scale)
    assert quantized.data.dtype == qdtype
    assert torch.equal(quantized.data.view(torch.uint8), q.view(torch.uint8))


def run(device, dtype):
    torch.manual_seed(0)
    for (rows, hidden), qdtype in itertools.product(((1, 96), (5, 300)), (FP8, torch.int8)):
        x = (torch.randn(rows, hidden, device=device) * 3).to(dtype)
        weight = (torch.rand(hidden, device=device) + 0.5).to(dtype)
        check(rms_norm(x, weight, 1e-6, quantize_to=qdtype), rms_norm(x, weight, 1e-6), qdtype)
        residual = (torch.randn(rows, hidden, device=device)).to(dtype)
        plain, plain_residual = fused_add_rms_norm(x.clone(), residual.clone(), weight, 1e-6)
        quantized, quantized_residual = fused_add_rms_norm(x.clone(), residual.clone(), weight, 1e-6,
                                                           quantize_to=qdtype)
        check(quantized, plain, qdtype)
        assert torch.equal(quantized_residual, plain_residual)
    print("ok")
"""


def test_quantized_outputs_equal_quantizing_the_output_under_the_triton_interpreter():
    script = textwrap.dedent(_CHECK) + "\nrun('cpu', torch.float32)\n"
    run_interpreted(script)


@pytest.mark.gpu
def test_quantized_outputs_equal_quantizing_the_output_on_the_gpu():
    namespace: dict = {}
    exec(textwrap.dedent(_CHECK), namespace)
    namespace["run"]("cuda", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 4, 300])
def test_fp8_layer_fed_a_quantized_activation_equals_the_reference(num_tokens):
    from pagedllm.layers.linear import MergedColumnParallelLinear
    from pagedllm.layers.ops.fused_rms_norm import rms_norm
    from pagedllm.layers.quantization.fp8 import Fp8Config
    from pagedllm.layers.quantization.kernels.w8a8 import fake_quantize_activation

    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            layer = MergedColumnParallelLinear(1024, [2048, 2048], quant_config=Fp8Config.from_config({}))
        finally:
            torch.set_default_dtype(torch.float32)
    for shard in (0, 1):
        layer.weight.weight_loader(layer.weight, torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16), shard)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.quant_method.fused_input_quantization(layer) == torch.float8_e4m3fn
    x = torch.randn(num_tokens, 1024, device="cuda", dtype=torch.bfloat16)
    weight = torch.ones(1024, device="cuda", dtype=torch.bfloat16)
    normed = rms_norm(x, weight, 1e-6)
    out = layer(rms_norm(x, weight, 1e-6, quantize_to=torch.float8_e4m3fn))
    reference = fake_quantize_activation(normed.float(), torch.float8_e4m3fn, None, None, True, None)
    reference = reference @ layer.quant_method.dequantized_weight(layer, torch.float32).T
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    # bf16 output: 8 mantissa bits, relative to the output's largest value.
    assert ((out.float() - reference).abs().max() / reference.abs().max()).item() < 1e-2
